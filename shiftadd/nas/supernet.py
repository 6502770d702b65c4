"""Weight-sharing supernet over a :class:`~shiftadd.nas.space.SearchSpace`.

Each searchable layer holds, for the largest width and kernel of its slot, the weights of
every candidate operator, shared according to ``share``:

* ``none``: each operator has its own weight;
* ``naive``: one latent weight W, used as is by conv, shift and adder;
* ``hetero`` (ShiftAddNAS): one latent W; conv uses it directly, adder and shift through
  a learned piecewise-linear remap (:class:`PiecewiseRemap`), and a distribution-matching
  loss pulls the remapped adder weights toward Laplace(0, 2) (AdderNet weights are
  Laplacian), ``loss = CE + 10 * KL``.

A subnet (a gene) uses the first ``width`` output channels, the centre ``k x k`` of the
kernel, and a BatchNorm of its own per operator (sliced to the width).  Before a subnet
is scored its BatchNorm statistics are recalibrated on training batches
(:func:`shiftadd.nn._common.recalibrate_bn`).  The shift operator is DeepShift-Q on the
(remapped) latent weight; the shiftadd operator is a shift conv on the shared weight
followed by an adder conv with a weight of its own.  The stem conv and the classifier are multiplicative.

AdderNet's adaptive gradient scaling (eta) is off by default here: it sets every adder
step to a fixed size, which suits an adder layer that owns its weight but, on a weight
shared with conv and shift, overrides their updates (on digits the hetero KL term then
diverges: measured 29 after 400 steps with eta 0.2 against -1.1 without).  Retrained
stand-alone nets use eta = 0.2 as AdderNet does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as SF
from .space import SearchSpace

SHARES = ("none", "naive", "hetero")
WEIGHTED_OPS = ("conv", "shift", "adder")  # operators whose weight can be shared
LAPLACE_SCALE = 2.0
KL_WEIGHT = 10.0


class PiecewiseRemap(nn.Module):
    """Monotone piecewise-linear map of a weight tensor (ShiftAddNAS heterogeneous sharing).

    ``bins`` equal-width bins over [min W, max W] of the latent weight (detached); bin b is
    stretched by a learnable scale s_b in [e^-3, e^3] (initially 1: the identity) and the pieces
    are joined so the map is continuous, then shifted so that 0 maps to 0 (a uniform
    stretch then scales the weights about zero):
        raw(w)   = sum_{j<b} s_j * width + s_b * (w - left_b),  b = bin of w
        remap(w) = raw(w) - raw(0)
    Every weight falls in a bin, the maximum included (ShiftAddNAS's strict `<` dropped
    it from the last bin).  This continuous, zero-anchored form and the change-of-variables
    KL (:func:`laplace_kl`) are this package's reading of ShiftAddNAS's description; its
    released code may scale each bin's weights in place (w * s_b), which is discontinuous
    at the bin edges.
    """

    LOG_SCALE_BOUND = 3.0  # scales stay in [e^-3, e^3]: an unbounded exp parametrisation diverges under SGD

    def __init__(self, bins: int = 100):
        super().__init__()
        self.bins = bins
        self.log_scale_raw = nn.Parameter(torch.zeros(bins))

    @property
    def log_scale(self) -> torch.Tensor:
        b = self.LOG_SCALE_BOUND
        return b * torch.tanh(self.log_scale_raw / b)

    def _grid(self, latent: torch.Tensor):
        lo, hi = latent.detach().min(), latent.detach().max()
        return lo, ((hi - lo) / self.bins).clamp_min(1e-12)

    def bin_index(self, w: torch.Tensor, lo: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        return ((w.detach() - lo) / width).floor().clamp_(0, self.bins - 1).long()

    @staticmethod
    def _take(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """v[b] through gather: the backward of v[b] (index_put_ with accumulate) adds with
        atomics on the CPU, in an order that changes from run to run; gather's does not."""
        return v.gather(0, b.reshape(-1)).view(b.shape)

    def _raw(self, w, lo, width, scale, starts):
        b = self.bin_index(w, lo, width)
        return self._take(starts, b) + self._take(scale, b) * (w - (lo + b * width))

    def forward(self, w: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        lo, width = self._grid(latent)
        scale = self.log_scale.exp()
        starts = torch.cat([scale.new_zeros(1), torch.cumsum(scale * width, 0)[:-1]])
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        return self._raw(w, lo, width, scale, starts) - self._raw(zero, lo, width, scale, starts)

    def log_slope(self, w: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """log d remap / dw at each weight (for the change-of-variables entropy)."""
        lo, width = self._grid(latent)
        return self._take(self.log_scale, self.bin_index(w, lo, width))


def laplace_kl(remapped: torch.Tensor, log_slope: torch.Tensor, scale: float = LAPLACE_SCALE) -> torch.Tensor:
    """KL(p_remapped || Laplace(0, scale)) up to the latent's own entropy (a constant for
    the remap): with y = remap(w), H(p_y) = H(p_w) + E[log remap'(w)], so
        KL = -H(p_y) - E[log q(y)] = const - E[log remap'(w)] + log(2 scale) + E|y| / scale."""
    return math.log(2 * scale) + remapped.abs().mean() / scale - log_slope.mean()


def _crop(w: torch.Tensor, k: int) -> torch.Tensor:
    kmax = w.shape[-1]
    if k == kmax:
        return w
    o = (kmax - k) // 2
    return w[..., o:o + k, o:o + k]


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, c: int) -> torch.Tensor:
    """BatchNorm over the first c channels of a wider BatchNorm (its statistics are
    updated through views); momentum=None is the cumulative average, as in nn.BatchNorm2d."""
    if bn.training and bn.momentum is None:
        bn.num_batches_tracked += 1
        factor = 1.0 / float(bn.num_batches_tracked)
    else:
        factor = bn.momentum or 0.0
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], bn.training,
                        factor, bn.eps)


def apply_op(op: str, x: torch.Tensor, w: torch.Tensor, stride: int, weight_bits: int, eta: Optional[float],
             adder_w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The convolution of one searchable operator with 'same' padding (no BN): conv; shift
    (DeepShift-Q of w); adder; shiftadd (shift with w, then an adder conv with adder_w)."""
    pad = w.shape[-1] // 2
    if op == "conv":
        return F.conv2d(x, w, None, stride, pad)
    if op in ("shift", "shiftadd"):
        y = SF.shift_conv2d(x, w, None, stride, pad, mode="q", weight_bits=weight_bits)
        if op == "shift":
            return y
        return SF.adder_conv2d(y, SF.adaptive_grad_scale(adder_w, eta), None, 1, adder_w.shape[-1] // 2)
    if op == "adder":
        return SF.adder_conv2d(x, SF.adaptive_grad_scale(w, eta), None, stride, pad)
    raise ValueError(f"unknown operator {op!r}")


class MixedLayer(nn.Module):
    """One searchable layer: every candidate operator of the slot, sharing weights."""

    def __init__(self, c_in: int, c_out: int, kmax: int, stride: int, ops: tuple, share: str,
                 weight_bits: int = 5, eta: Optional[float] = None):
        super().__init__()
        if share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {share!r}")
        self.c_in, self.c_out, self.kmax, self.stride, self.share = c_in, c_out, kmax, stride, share
        self.ops = tuple(ops)
        self.weight_bits, self.eta = weight_bits, eta
        shape = (c_out, c_in, kmax, kmax)
        users = [o for o in self.ops if o in WEIGHTED_OPS or o == "shiftadd"]
        if share == "none":
            self.weights = nn.ParameterDict({o: nn.Parameter(self._init(shape, o)) for o in users})
        elif users:
            self.latent = nn.Parameter(self._init(shape, "conv"))
        if "shiftadd" in self.ops:  # the adder half of a shift-add block has its own weight
            self.shiftadd_adder = nn.Parameter(torch.randn(c_out, c_out, kmax, kmax))
        self.remaps = nn.ModuleDict()
        if share == "hetero":
            for o in ("adder", "shift"):
                if o in self.ops or (o == "shift" and "shiftadd" in self.ops):
                    self.remaps[o] = PiecewiseRemap()
        self.bns = nn.ModuleDict({o: nn.BatchNorm2d(c_out) for o in self.ops if o != "skip"})

    @staticmethod
    def _init(shape, op):
        w = torch.empty(shape)
        if op == "adder":
            return nn.init.normal_(w)
        return nn.init.kaiming_normal_(w, nonlinearity="relu")

    # ----------------------------------------------------------------------------------

    def view(self, op: str, c_out: int, c_in: int, k: int) -> torch.Tensor:
        """The weight an operator uses for this width and kernel (remapped under hetero)."""
        key = "shift" if op == "shiftadd" else op
        if self.share == "none":
            full = self.weights[op]
        else:
            full = self.latent
        w = _crop(full[:c_out, :c_in], k)
        if key in self.remaps:
            w = self.remaps[key](w, full)
        return w

    def branch(self, x: torch.Tensor, op: str, k: int, c_out: int) -> torch.Tensor:
        """op -> BN -> ReLU (+ residual where shapes agree); skip is the identity."""
        if op == "skip":
            return x
        c_in = x.shape[1]
        wa = _crop(self.shiftadd_adder[:c_out, :c_out], k) if op == "shiftadd" else None
        y = apply_op(op, x, self.view(op, c_out, c_in, k), self.stride, self.weight_bits, self.eta, wa)
        y = F.relu(_bn(y, self.bns[op], c_out))
        if self.stride == 1 and c_in == c_out:
            y = y + x
        return y

    def forward(self, x: torch.Tensor, op: str, k: int, c_out: int) -> torch.Tensor:
        return self.branch(x, op, k, c_out)

    def kl_loss(self) -> Optional[torch.Tensor]:
        """The hetero distribution-matching term of this layer, None without an adder remap
        (only the adder copy is pulled toward Laplace(0, 2): shift weights are clamped to
        [-1, 1] by the quantizer, where that target would saturate them)."""
        if "adder" not in self.remaps:
            return None
        r = self.remaps["adder"]
        return laplace_kl(r(self.latent, self.latent), r.log_slope(self.latent, self.latent))


class Supernet(nn.Module):
    """All subnets of a search space in one module; ``forward(x, gene)`` runs one."""

    def __init__(self, space: SearchSpace, share: str = "hetero", weight_bits: int = 5, eta: Optional[float] = None):
        super().__init__()
        self.space, self.share = space, share
        self.stem = nn.Conv2d(space.in_channels, space.stem, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(space.stem)
        kmax = max(space.kernels)
        maxw = space.max_widths()
        layers, c_in = [], space.stem
        for slot in space.layer_plan():
            layers.append(MixedLayer(c_in, maxw[slot.stage], kmax, slot.stride, space.ops, share, weight_bits, eta))
            c_in = maxw[slot.stage]
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(maxw[-1], space.num_classes)

    def forward(self, x: torch.Tensor, gene: dict) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        for slot, layer, l in zip(self.space.layer_plan(), self.layers, gene["layers"]):
            x = layer(x, l["op"], l["k"], gene["widths"][slot.stage])
        x = x.mean((2, 3))
        c = x.shape[1]
        return F.linear(x, self.fc.weight[:, :c], self.fc.bias)

    def kl_loss(self) -> torch.Tensor:
        """Mean of the layers' distribution-matching terms (0 without hetero sharing)."""
        terms = [t for t in (layer.kl_loss() for layer in self.layers) if t is not None]
        return torch.stack(terms).mean() if terms else self.fc.weight.new_zeros(())

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE, plus KL_WEIGHT * the distribution-matching term under hetero sharing."""
        ce = F.cross_entropy(logits, target)
        return ce + KL_WEIGHT * self.kl_loss() if self.share == "hetero" else ce
