"""ShiftAddAug: train a tiny multiplication-free net as the sub-network of a wider
multiplicative net, then keep only the tiny net.

Every layer holds one weight of the wide net's size.  The tiny net uses its first
channels with its own (multiplication-free) operator; the wide net uses a larger slice
with an ordinary convolution.  Each step trains the tiny net and one wide net whose width
multiple is drawn from ``width_mults`` (NetAug style; ShiftAddAug uses 2.2-3.2):
``loss = CE(tiny) + CE(wide) + 10 * KL``.  The tiny adder and shift weights see the
shared weight through a learned piecewise-linear remap, and the KL term keeps the remapped
adder weights Laplacian (as hetero sharing in :mod:`shiftadd.nas.supernet`), so sharing
with the multiplicative net does not pull them toward a convolution's distribution.
BatchNorms are separate per net and per wide width.  AdderNet's eta scaling is off on
the shared weights (see :mod:`shiftadd.nas.supernet`).  :meth:`AugNet.extract` returns the
tiny net alone (a :class:`~shiftadd.nas.net.GeneNet`, shift layers in DeepShift-Q mode),
computing exactly what the tiny path computes.

ShiftAddAug's search is two-stage (TinyNAS-like); here the ``shiftaddaug`` preset finds
the tiny net with the ordinary evolutionary search and augmentation applies to its
retraining (``shiftadd retrain --augment``).
"""

from __future__ import annotations

import math
import random
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .net import GeneNet
from .space import SearchSpace
from .supernet import KL_WEIGHT, PiecewiseRemap, apply_op, laplace_kl

WIDTH_MULTS = (2.2, 2.7, 3.2)


class AugLayer(nn.Module):
    def __init__(self, op, c_in, c_out, wide_in, wide_out, k, stride, mults, weight_bits=5, eta=None):
        super().__init__()
        self.op, self.k, self.stride, self.c_in, self.c_out = op, k, stride, c_in, c_out
        self.weight_bits, self.eta = weight_bits, eta
        self.residual = stride == 1 and c_in == c_out
        if op == "skip":
            return
        self.weight = nn.Parameter(nn.init.kaiming_normal_(torch.empty(wide_out, wide_in, k, k), nonlinearity="relu"))
        if op == "shiftadd":
            self.adder_weight = nn.Parameter(torch.randn(c_out, c_out, k, k))
        self.remap = PiecewiseRemap() if op in ("adder", "shift", "shiftadd") else None
        self.bn = nn.BatchNorm2d(c_out)
        self.wide_bns = nn.ModuleList(nn.BatchNorm2d(math.ceil(c_out * m)) for m in mults)

    def tiny_weight(self):
        w = self.weight[:self.c_out, :self.c_in]
        return self.remap(w, self.weight) if self.remap is not None else w

    def forward_tiny(self, x):
        if self.op == "skip":
            return x
        y = apply_op(self.op, x, self.tiny_weight(), self.stride, self.weight_bits, self.eta,
                     getattr(self, "adder_weight", None))
        y = F.relu(self.bn(y))
        return y + x if self.residual else y

    def forward_wide(self, x, mi: int, c_out: int):
        """The multiplicative wide layer: conv on the [c_out, x channels] slice."""
        if self.op == "skip":
            return x
        y = F.conv2d(x, self.weight[:c_out, :x.shape[1]], None, self.stride, self.k // 2)
        y = F.relu(self.wide_bns[mi](y))
        return y + x if (self.stride == 1 and x.shape[1] == c_out) else y

    def kl_loss(self):
        if self.op != "adder":
            return None
        w = self.weight[:self.c_out, :self.c_in]
        return laplace_kl(self.remap(w, self.weight), self.remap.log_slope(w, self.weight))


class AugNet(nn.Module):
    """A gene's tiny net inside a wide multiplicative net of `max(width_mults)` times its width."""

    def __init__(self, space: SearchSpace, gene: dict, width_mults: Sequence[float] = WIDTH_MULTS,
                 weight_bits: int = 5, eta: Optional[float] = None):
        super().__init__()
        self.space, self.gene = space, space.validate(gene)
        self.mults = tuple(width_mults)
        top = max(self.mults)
        wide = lambda c: math.ceil(c * top)  # noqa: E731
        self.stem_weight = nn.Parameter(nn.init.kaiming_normal_(torch.empty(wide(space.stem), space.in_channels, 3, 3),
                                                                nonlinearity="relu"))
        self.stem_bn = nn.BatchNorm2d(space.stem)
        self.stem_wide_bns = nn.ModuleList(nn.BatchNorm2d(math.ceil(space.stem * m)) for m in self.mults)
        layers, c_in = [], space.stem
        self.widths = []
        for slot, l in zip(space.layer_plan(), self.gene["layers"]):
            c_out = self.gene["widths"][slot.stage]
            layers.append(AugLayer(l["op"], c_in, c_out, wide(c_in), wide(c_out), l["k"], slot.stride, self.mults,
                                   weight_bits, eta))
            self.widths.append(c_out)
            c_in = c_out
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(wide(c_in), space.num_classes)

    def forward_tiny(self, x):
        x = F.relu(self.stem_bn(F.conv2d(x, self.stem_weight[:self.space.stem], None, 1, 1)))
        for layer in self.layers:
            x = layer.forward_tiny(x)
        x = x.mean((2, 3))
        return F.linear(x, self.fc.weight[:, :x.shape[1]], self.fc.bias)

    def forward_wide(self, x, mi: int):
        m = self.mults[mi]
        c = math.ceil(self.space.stem * m)
        x = F.relu(self.stem_wide_bns[mi](F.conv2d(x, self.stem_weight[:c], None, 1, 1)))
        for layer, w in zip(self.layers, self.widths):
            x = layer.forward_wide(x, mi, math.ceil(w * m))
        x = x.mean((2, 3))
        return F.linear(x, self.fc.weight[:, :x.shape[1]], self.fc.bias)

    forward = forward_tiny

    def kl_loss(self):
        terms = [t for t in (layer.kl_loss() for layer in self.layers) if t is not None]
        return torch.stack(terms).mean() if terms else self.fc.weight.new_zeros(())

    @torch.no_grad()
    def extract(self) -> GeneNet:
        """The tiny net alone, with the tiny path's (remapped) weights and statistics."""
        net = GeneNet(self.space, self.gene, mode="q", weight_bits=self.layers[0].weight_bits if self.layers else 5)
        net.stem[0].weight.copy_(self.stem_weight[:self.space.stem])
        net.stem[1].load_state_dict(self.stem_bn.state_dict())
        for src, dst in zip(self.layers, net.layers):
            if src.op == "skip":
                continue
            w = src.tiny_weight()
            if src.op == "shiftadd":
                dst.conv.shift.weight.copy_(w)
                dst.conv.adder.weight.copy_(src.adder_weight)
            else:
                dst.conv.weight.copy_(w)
            dst.bn.load_state_dict(src.bn.state_dict())
        net.fc.weight.copy_(self.fc.weight[:, :net.fc.in_features])
        net.fc.bias.copy_(self.fc.bias)
        return net


def train_augmented(space: SearchSpace, gene: dict, splits, epochs: int = 30, batch_size: int = 64, lr: float = 0.05,
                    weight_decay: float = 5e-4, seed: int = 0, width_mults=WIDTH_MULTS, device="cpu",
                    log=print, wide: bool = True) -> tuple:
    """Trains the tiny net of `gene` with ShiftAddAug; returns (tiny GeneNet, history).

    wide=False is the ablation: the same tiny net, parametrisation, remap and optimiser,
    without the wide net's loss (the tiny net "trained directly")."""
    from ..data import make_loaders
    from ..train import cosine_factor, evaluate

    torch.manual_seed(seed)
    rng = random.Random(seed)
    dev = torch.device(device)
    net = AugNet(space, gene, width_mults).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    loaders = make_loaders(splits, batch_size, seed)
    history = []
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * cosine_factor(epoch, epochs)
        loaders.set_epoch(epoch)
        net.train()
        t0, tot, n = time.time(), 0.0, 0
        for x, y in loaders.train:
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(net.forward_tiny(x), y) + KL_WEIGHT * net.kl_loss()
            if wide:
                loss = loss + F.cross_entropy(net.forward_wide(x, rng.randrange(len(net.mults))), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, n = tot + loss.item(), n + 1
        net.eval()
        _, val_acc = evaluate(net, loaders.val, dev)
        history.append({"epoch": epoch + 1, "loss": tot / max(1, n), "val_acc": val_acc, "seconds": time.time() - t0})
        log(f"{'augment' if wide else 'direct'} epoch {epoch + 1}/{epochs} loss {tot / max(1, n):.3f} "
            f"tiny val acc {val_acc:.4f}")
    tiny = net.extract().to(dev).eval()
    return tiny, history
