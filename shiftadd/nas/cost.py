"""Cost models for the NAS driver: analytic energy and a measured latency lookup table.

Energy (45 nm, Horowitz, ISSCC 2014)
------------------------------------
Compute energy only, from per-operation figures at 45 nm (:data:`ENERGY_PJ`, each entry
``(value_pJ, source)``) times the elementary operations each layer performs.  The MACs of
every layer are counted by one forward pass with hooks (``layer_costs``):

* ``nn.Conv2d``, :class:`~shiftadd.nn.AdderConv2d`, :class:`~shiftadd.nn.ShiftConv2d`:
  ``N * Cout * Ho * Wo * (Cin / groups) * kh * kw``;
* ``nn.Linear``, :class:`~shiftadd.nn.AdderLinear`, :class:`~shiftadd.nn.ShiftLinear`:
  ``N * out * in`` (every leading dimension counts as batch);
* :class:`~shiftadd.nn.ShiftAddConv2d` is counted as its two parts, ``<name>.shift`` and
  ``<name>.adder``;
* a module called twice is counted twice (one entry per call, ``call`` = 1, 2, ...);
* identity / skip connections, residual additions written as ``x + y`` in ``forward``,
  biases, and every other module type cost nothing.  BatchNorm, ReLU-family activations and
  pooling are ignored by default (as the papers do); with ``count_aux=True`` they are counted
  per element: BatchNorm = 1 mult + 1 add (inference affine), ReLU/ReLU6/LeakyReLU/Hardtanh =
  1 add (a comparison), max/avg pooling = 1 add per window element read (adaptive pooling:
  per input element).

Per-MAC recipes (:data:`CONVENTIONS`):

* ``"paper"`` (default; AdderNet/ShiftAddNet accounting): conv and linear = mult + add;
  adder = 2 add (subtract-abs, accumulate); shift = shift + add.
* ``"shiftaddnas_code"``: what ShiftAddNAS's released energy script charges: one unit per
  MAC (conv/linear = mult, adder = add, shift = shift).  That script also treats the adder
  layers' data as on-chip (no DRAM/buffer traffic); this model charges no data movement for
  any layer in either convention, so that part has no separate effect here.

Precision ``fp32`` (default), ``int32`` or ``int8`` picks the column.  Shifts have a
32-bit figure (used for fp32 and int32) and an 8-bit one.

Latency
-------
``profile_latency`` measures the forward latency of each candidate op (``conv``, ``shift``,
``adder``, ``shiftadd``, ``skip``; the package's own layers, bias off, padding k//2) for each
:class:`LayerConfig` on the current device, and keeps the medians in a :class:`LatencyTable`
cached as JSON per device and package version (see :func:`latency_cache_path`).
``skip`` is an identity and exists only for ``in_ch == out_ch`` and stride 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import __version__
from .. import nn as snn
from .._cli import int_min
from .._timing import measure

# ----------------------------------------------------------------------------------------
# energy constants
# ----------------------------------------------------------------------------------------

_HOROWITZ = "Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm"
_SHIFTADD = "ShiftAddNet (You et al., NeurIPS 2020) Table 1 / ShiftAddNAS (ICML 2022), 45 nm"

#: energy of one elementary operation, pJ, with its source: ENERGY_PJ[(unit, precision)]
ENERGY_PJ: Dict[Tuple[str, str], Tuple[float, str]] = {
    ("mult", "fp32"): (3.7, _HOROWITZ + ", FP32 multiply"),
    ("mult", "int32"): (3.1, _HOROWITZ + ", 32-bit integer multiply"),
    ("mult", "int8"): (0.2, _HOROWITZ + ", 8-bit integer multiply"),
    ("add", "fp32"): (0.9, _HOROWITZ + ", FP32 add"),
    ("add", "int32"): (0.1, _HOROWITZ + ", 32-bit integer add"),
    ("add", "int8"): (0.03, _HOROWITZ + ", 8-bit integer add"),
    ("shift", "fp32"): (0.13, _SHIFTADD + ", 32-bit shift (no FP32 figure; the 32-bit one is used)"),
    ("shift", "int32"): (0.13, _SHIFTADD + ", 32-bit shift"),
    ("shift", "int8"): (0.024, _SHIFTADD + ", 8-bit shift"),
}

PRECISIONS = ("fp32", "int32", "int8")
UNITS = ("mult", "add", "shift")

#: elementary operations per MAC of each layer kind, per convention
CONVENTIONS: Dict[str, Dict[str, Dict[str, int]]] = {
    "paper": {
        "conv": {"mult": 1, "add": 1},
        "linear": {"mult": 1, "add": 1},
        "adder": {"add": 2},
        "shift": {"shift": 1, "add": 1},
    },
    "shiftaddnas_code": {
        "conv": {"mult": 1},
        "linear": {"mult": 1},
        "adder": {"add": 1},
        "shift": {"shift": 1},
    },
}

#: elementary operations per element of the auxiliary layers (count_aux=True), any convention
AUX_RECIPES: Dict[str, Dict[str, int]] = {
    "bn": {"mult": 1, "add": 1},
    "act": {"add": 1},
    "pool": {"add": 1},
}


def unit_energy(unit: str, precision: str = "fp32") -> float:
    """pJ of one ``unit`` ("mult", "add", "shift") at ``precision``."""
    _check_precision(precision)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    return ENERGY_PJ[(unit, precision)][0]


def mac_energy(op: str, precision: str = "fp32", convention: str = "paper") -> float:
    """pJ per MAC of a layer kind ("conv", "linear", "adder", "shift") — or per element
    of an auxiliary kind ("bn", "act", "pool")."""
    recipe = _recipe(op, convention)
    _check_precision(precision)
    return sum(n * ENERGY_PJ[(u, precision)][0] for u, n in recipe.items())


def _check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_convention(convention):
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")


def _recipe(op, convention):
    _check_convention(convention)
    if op in AUX_RECIPES:
        return AUX_RECIPES[op]
    try:
        return CONVENTIONS[convention][op]
    except KeyError:
        raise ValueError(f"unknown op kind {op!r}") from None


# ----------------------------------------------------------------------------------------
# per-layer MAC counting
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerConfig:
    """One conv layer configuration of a search space: channels, square kernel, stride,
    input height/width, batch and groups (padding is kernel // 2)."""

    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    h: int
    w: int
    batch: int = 1
    groups: int = 1

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LayerConfig.{f.name} must be a positive int, got {v!r}")
        if self.in_ch % self.groups or self.out_ch % self.groups:
            raise ValueError(f"in_ch ({self.in_ch}) and out_ch ({self.out_ch}) must be divisible by groups "
                             f"({self.groups})")

    @classmethod
    def coerce(cls, obj) -> "LayerConfig":
        """A LayerConfig from itself, a dict of its fields, or a sequence
        ``(in_ch, out_ch, kernel, stride, h, w[, batch[, groups]])``."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, dict):
            names = {f.name for f in fields(cls)}
            unknown = set(obj) - names
            if unknown:
                raise ValueError(f"unknown LayerConfig keys {sorted(unknown)}; expected {sorted(names)}")
            return cls(**{k: _as_int(v, k) for k, v in obj.items()})
        if isinstance(obj, (list, tuple)) and 6 <= len(obj) <= 8:
            return cls(*(_as_int(v, "entry") for v in obj))
        raise TypeError(f"cannot make a LayerConfig from {obj!r}: give a LayerConfig, a dict of "
                        "in_ch/out_ch/kernel/stride/h/w[/batch/groups], or a 6-8 int sequence")

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self):
        s = f"{self.in_ch}->{self.out_ch} k{self.kernel} s{self.stride} @{self.h}x{self.w} n{self.batch}"
        return s + (f" g{self.groups}" if self.groups != 1 else "")


def _as_int(v, name):
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"LayerConfig {name} must be an int, got {v!r}")
    return v


@dataclass
class LayerCost:
    """Cost of one call of one layer.

    ``op``: "conv", "linear" (multiplicative), "adder", "shift", or with ``count_aux``
    "bn", "act", "pool".  ``macs``: MACs of the call (elements processed, for the
    auxiliary kinds).  ``units``: elementary operations charged ({"mult": n, "add": n,
    "shift": n}).  ``params``: deployed weights + bias of the module (a DeepShift-PS weight
    counts once, not as shift + sign), repeated on every call; count ``call == 1`` entries
    for a model total.  ``config``: the :class:`LayerConfig` of a conv-type layer when its
    geometry fits one (square kernel, equal strides, dilation 1, padding k//2), else None;
    ``(c.op, c.config)`` pairs feed :meth:`LatencyTable.estimate`.
    """

    name: str
    op: str
    module: str
    macs: int
    energy_pj: float
    params: int
    call: int = 1
    units: Dict[str, int] = field(default_factory=dict)
    config: Optional[LayerConfig] = None
    precision: str = "fp32"
    convention: str = "paper"

    @property
    def energy_uj(self) -> float:
        return self.energy_pj * 1e-6


_CONV_TYPES = (snn.AdderConv2d, snn.ShiftConv2d, nn.Conv2d)
_ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
_POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.MaxPool1d, nn.AvgPool1d)
_ADAPTIVE_POOL_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


def _op_kind(m: nn.Module, count_aux: bool) -> Optional[str]:
    # shiftadd types first: they are not nn.Conv2d/nn.Linear subclasses today, but keep it safe
    if isinstance(m, (snn.AdderConv2d, snn.AdderLinear)):
        return "adder"
    if isinstance(m, (snn.ShiftConv2d, snn.ShiftLinear)):
        return "shift"
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if count_aux:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "bn"
        if isinstance(m, _ACT_TYPES):
            return "act"
        if isinstance(m, _POOL_TYPES + _ADAPTIVE_POOL_TYPES):
            return "pool"
    return None


def _param_count(m: nn.Module, kind: str) -> int:
    if kind == "shift":
        p, _ = m._params()
        return p.numel() + (m.bias.numel() if m.bias is not None else 0)
    return sum(p.numel() for p in m.parameters(recurse=False))


def _conv_config(m, x: torch.Tensor, n: int) -> Optional[LayerConfig]:
    kh, kw = m.kernel_size
    if kh != kw or m.stride[0] != m.stride[1] or tuple(m.dilation) != (1, 1):
        return None
    pad = m.padding
    if pad == "same":
        pad = (kh // 2, kw // 2) if kh % 2 else None
    elif pad == "valid":
        pad = (0, 0)
    if pad != (kh // 2, kw // 2):
        return None
    return LayerConfig(int(m.in_channels), int(m.out_channels), int(kh), int(m.stride[0]), int(x.shape[-2]),
                       int(x.shape[-1]), int(n), int(m.groups))


def _count(m: nn.Module, kind: str, x: torch.Tensor, out: torch.Tensor) -> Tuple[int, Optional[LayerConfig]]:
    """(MACs or elements, LayerConfig or None) of one call."""
    if kind in ("conv", "adder", "shift") and isinstance(m, _CONV_TYPES):
        cout, ho, wo = out.shape[-3:]
        n = out.numel() // (cout * ho * wo) if out.numel() else 0
        kh, kw = m.kernel_size
        macs = n * cout * ho * wo * (m.in_channels // m.groups) * kh * kw
        return int(macs), _conv_config(m, x, n)
    if kind in ("linear", "adder", "shift"):  # linear layers of the three families
        return int(out.numel()) * int(m.in_features), None
    if kind == "bn" or kind == "act":
        return int(out.numel()), None
    if kind == "pool":
        if isinstance(m, _ADAPTIVE_POOL_TYPES):
            return int(x.numel()), None
        k = m.kernel_size
        window = math.prod(k) if isinstance(k, (tuple, list)) else k ** (out.dim() - 2 if out.dim() >= 3 else 1)
        return int(out.numel()) * int(window), None
    raise AssertionError(kind)


def _example_input(model: nn.Module, input_shape: Sequence[int], batch: int) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros((batch, *(int(s) for s in input_shape)), device=device, dtype=dtype)


def layer_costs(model: nn.Module, input_shape: Sequence[int], precision: str = "fp32", convention: str = "paper",
                *, batch: int = 1, count_aux: bool = False) -> List[LayerCost]:
    """Per-call costs of every counted layer of ``model``, in execution order.

    ``input_shape``: one sample's shape, without the batch dimension (e.g. ``(3, 32, 32)``);
    a zero input of shape ``(batch, *input_shape)`` on the model's device and dtype is run
    once in eval mode under ``torch.no_grad`` (the model's train/eval mode is restored).
    """
    _check_precision(precision)
    _check_convention(convention)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    records: List[LayerCost] = []
    calls: Dict[int, int] = {}
    handles = []

    def make_hook(name: str, kind: str):
        def hook(m, inputs, output):
            x = inputs[0] if inputs else None
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                return
            calls[id(m)] = calls.get(id(m), 0) + 1
            macs, cfg = _count(m, kind, x, out)
            units = {u: n * macs for u, n in _recipe(kind, convention).items()}
            energy = sum(cnt * ENERGY_PJ[(u, precision)][0] for u, cnt in units.items())
            records.append(LayerCost(name=name, op=kind, module=type(m).__name__, macs=macs, energy_pj=energy,
                                     params=_param_count(m, kind), call=calls[id(m)], units=units, config=cfg,
                                     precision=precision, convention=convention))
        return hook

    for name, m in model.named_modules():
        kind = _op_kind(m, count_aux)
        if kind is not None:
            handles.append(m.register_forward_hook(make_hook(name or type(m).__name__, kind)))
    was_training = model.training
    try:
        x = _example_input(model, input_shape, batch)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def model_energy(model: nn.Module, input_shape: Sequence[int], precision: str = "fp32", convention: str = "paper",
                 *, count_aux: bool = False) -> float:
    """Compute energy of one inference (batch 1), in microjoules."""
    costs = layer_costs(model, input_shape, precision, convention, batch=1, count_aux=count_aux)
    return sum(c.energy_pj for c in costs) * 1e-6


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def energy_table(model: Union[nn.Module, Sequence[LayerCost]], input_shape: Optional[Sequence[int]] = None,
                 precision: str = "fp32", convention: str = "paper", *, count_aux: bool = False) -> str:
    """A per-layer text table (layer, op, MACs, energy uJ, share %), per-op subtotals and
    the total, for ``model`` at batch 1 — or for a list of :class:`LayerCost` already
    computed (``input_shape``, ``precision``, ``convention`` are then taken from it).
    Columns are separated by at least two spaces."""
    if isinstance(model, nn.Module):
        if input_shape is None:
            raise ValueError("energy_table(model, input_shape): input_shape is required for a model")
        costs = layer_costs(model, input_shape, precision, convention, batch=1, count_aux=count_aux)
    else:
        costs = list(model)
        if costs:
            precision, convention = costs[0].precision, costs[0].convention
    total_pj = sum(c.energy_pj for c in costs)
    total_macs = sum(c.macs for c in costs if c.op not in AUX_RECIPES)
    params = sum(c.params for c in costs if c.call == 1)

    def share(e):
        return 100.0 * e / total_pj if total_pj > 0 else 0.0

    rows = []
    for c in costs:
        name = c.name if c.call == 1 else f"{c.name} (call {c.call})"
        rows.append([name, c.op, _fmt_int(c.macs), f"{c.energy_uj:.6f}", f"{share(c.energy_pj):.2f}"])
    sub = []
    kinds = []
    for c in costs:
        if c.op not in kinds:
            kinds.append(c.op)
    for k in kinds:
        e = sum(c.energy_pj for c in costs if c.op == k)
        m = sum(c.macs for c in costs if c.op == k)
        sub.append([f"subtotal {k}", k, _fmt_int(m), f"{e * 1e-6:.6f}", f"{share(e):.2f}"])
    total = ["total", "", _fmt_int(total_macs), f"{total_pj * 1e-6:.6f}", "100.00" if total_pj > 0 else "0.00"]
    header = ["layer", "op", "MACs", "energy uJ", "share %"]
    allrows = [header] + rows + sub + [total]
    widths = [max(len(r[i]) for r in allrows) for i in range(5)]

    def line(r):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [r[i].rjust(widths[i]) for i in (2, 3, 4)]
        return "  ".join(cells).rstrip()

    sep = "-" * len(line(header))
    recipe = ", ".join(f"{k} = " + " + ".join((f"{n} " if n > 1 else "") + u for u, n in r.items())
                       for k, r in CONVENTIONS[convention].items())
    units = ", ".join(f"{u} {ENERGY_PJ[(u, precision)][0]} pJ" for u in UNITS)
    out = [f"energy per inference (batch 1), precision {precision}, convention {convention!r}",
           f"per MAC: {recipe}; {units} (45 nm; see shiftadd.nas.cost.ENERGY_PJ)",
           line(header), sep] + [line(r) for r in rows] + [sep] + [line(r) for r in sub] + [line(total)]
    if any(c.op in AUX_RECIPES for c in costs):
        out.append("MACs of bn/act/pool rows are elements processed; the total counts the MAC layers only")
    out.append(f"parameters: {_fmt_int(params)}")
    return "\n".join(out)


def _parse_ints(s: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 3,32,32, got {s!r}") from None


def _parse_width(s: str):
    try:
        return int(s)
    except ValueError:
        return float(s)


def saved_input_shape(obj) -> Optional[tuple]:
    """(C, H, W) of one input of the model in a loaded model.pt of `shiftadd train` (its
    meta) or of a NAS retrain (its space); None when it does not record it."""
    meta = obj.get("meta", obj) if isinstance(obj, dict) else {}
    if isinstance(meta.get("space"), dict):
        sp = meta["space"]
        if "in_channels" in sp and "image_size" in sp:
            return (sp["in_channels"], sp["image_size"], sp["image_size"])
    if "in_channels" in meta and meta.get("image_size"):
        return (meta["in_channels"], meta["image_size"], meta["image_size"])
    return None


def _load_model_file(path: str) -> nn.Module:
    """A saved nn.Module, a zoo model.pt of `shiftadd train`, or a NAS model.pt (gene + space)."""
    return _model_from_file_object(torch.load(path, map_location="cpu", weights_only=False), path)


def _model_from_file_object(obj, path: str) -> nn.Module:
    """:func:`_load_model_file` of what torch.load read from `path`."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        if isinstance(obj.get("model"), nn.Module):
            return obj["model"]
        meta = obj.get("meta", obj)
        if "gene" in meta and "space" in meta:
            from .net import GeneNet
            from .space import SearchSpace

            state = obj.get("state_dict", obj.get("model"))
            kwargs = meta.get("layer_kwargs", obj.get("layer_kwargs"))
            if kwargs is None:  # saved before the layer kwargs were: PS layers have sign / shift tensors
                ps = state is not None and any(k.endswith((".sign", ".shift")) for k in state)
                kwargs = {"mode": "ps" if ps else "q"}
            net = GeneNet(SearchSpace.from_dict(meta["space"]), meta["gene"], **kwargs)
            if state is not None:
                net.load_state_dict(state)
            return net.eval()
        if meta.get("model") is not None:
            from ..train import model_from_saved

            return model_from_saved(obj, path)
    raise ValueError(f"{path}: expected a saved nn.Module, a model.pt of `shiftadd train` or of a NAS retrain; "
                     f"got {type(obj).__name__}")


def main_energy(argv: Optional[Sequence[str]] = None, builder: Optional[Callable[..., nn.Module]] = None) -> int:
    """``shiftadd energy``: per-layer energy table of a model.

    ``--model`` is a model name given to ``builder`` (default
    ``shiftadd.models.build_model(name, variant=, num_classes=, in_channels=[, width=])``,
    imported only when needed) or a path to a model saved with ``torch.save(model, path)``
    (unpickled in full: load only files you trust).  Returns the exit status.
    """
    p = argparse.ArgumentParser(prog="shiftadd energy", description="Per-layer compute energy of one inference "
                                "(batch 1) from 45 nm per-operation figures (Horowitz, ISSCC 2014).")
    p.add_argument("--model", required=True,
                   help="model name (shiftadd.models.build_model) or path to a saved model .pt")
    p.add_argument("--variant", default="conv",
                   help="model variant given to build_model (e.g. conv, adder, shift, shiftadd)")
    p.add_argument("--input", type=_parse_ints, default=None,
                   help="one sample's shape C,H,W (default: what a saved model.pt records, else 3,32,32)")
    p.add_argument("--classes", type=int_min(1), default=10, help="number of classes (default 10)")
    p.add_argument("--width", type=_parse_width, default=None,
                   help="width given to build_model (its default if absent)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--convention", choices=tuple(CONVENTIONS), default="paper")
    p.add_argument("--count-aux", action="store_true", help="also count BatchNorm, ReLU and pooling (per element)")
    p.add_argument("--json", metavar="FILE", help="also write the per-layer costs as JSON")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    if os.path.isfile(a.model) or a.model.endswith((".pt", ".pth")):
        obj = torch.load(a.model, map_location="cpu", weights_only=False)
        model = _model_from_file_object(obj, a.model)
        source = a.model
        if a.input is None:
            a.input = saved_input_shape(obj)
    else:
        if builder is None:
            try:
                from ..models import build_model as builder
            except ImportError as e:
                p.error(f"cannot build {a.model!r}: shiftadd.models.build_model is unavailable ({e})")
        kw = {"variant": a.variant, "num_classes": a.classes, "in_channels": a.input[0]}
        if a.width is not None:
            kw["width"] = a.width
        model = builder(a.model, **kw)
        source = f"{a.model} ({a.variant}, {a.classes} classes)"
    a.input = a.input or (3, 32, 32)
    costs = layer_costs(model, a.input, a.precision, a.convention, count_aux=a.count_aux)
    print(f"model: {source}, input {'x'.join(map(str, a.input))}")
    print(energy_table(costs))
    if a.json:
        data = {"model": source, "input": list(a.input), "precision": a.precision, "convention": a.convention,
                "total_uj": sum(c.energy_pj for c in costs) * 1e-6,
                "layers": [{"name": c.name, "op": c.op, "module": c.module, "call": c.call, "macs": c.macs,
                            "energy_uj": c.energy_uj, "params": c.params, "units": c.units,
                            "config": c.config.as_dict() if c.config else None} for c in costs]}
        Path(a.json).write_text(json.dumps(data, indent=1))
    return 0


# ----------------------------------------------------------------------------------------
# latency
# ----------------------------------------------------------------------------------------

LATENCY_OPS = ("conv", "shift", "adder", "shiftadd", "skip")
CACHE_FORMAT = 1

#: ResNet-20 (widths 16/32/64, 3x3) layer configurations, batch 1
DIGITS_SHAPES = (  # 1x8x8 digits
    LayerConfig(1, 16, 3, 1, 8, 8), LayerConfig(16, 16, 3, 1, 8, 8), LayerConfig(16, 32, 3, 2, 8, 8),
    LayerConfig(32, 32, 3, 1, 4, 4), LayerConfig(32, 64, 3, 2, 4, 4), LayerConfig(64, 64, 3, 1, 2, 2),
)
CIFAR_SHAPES = (  # 3x32x32 CIFAR
    LayerConfig(3, 16, 3, 1, 32, 32), LayerConfig(16, 16, 3, 1, 32, 32), LayerConfig(16, 32, 3, 2, 32, 32),
    LayerConfig(32, 32, 3, 1, 16, 16), LayerConfig(32, 64, 3, 2, 16, 16), LayerConfig(64, 64, 3, 1, 8, 8),
)
DEFAULT_SHAPES = DIGITS_SHAPES + CIFAR_SHAPES
PRESETS = {"default": DEFAULT_SHAPES, "digits": DIGITS_SHAPES, "cifar": CIFAR_SHAPES}


def skip_applies(config: LayerConfig) -> bool:
    """Whether the identity ``skip`` op exists for ``config`` (same channels, stride 1)."""
    return config.in_ch == config.out_ch and config.stride == 1


def build_op(op: str, config) -> nn.Module:
    """The module whose latency the table records for ``op`` at ``config``."""
    c = LayerConfig.coerce(config)
    pad = c.kernel // 2
    if op == "conv":
        return nn.Conv2d(c.in_ch, c.out_ch, c.kernel, c.stride, pad, groups=c.groups, bias=False)
    if op == "shift":
        return snn.ShiftConv2d(c.in_ch, c.out_ch, c.kernel, c.stride, pad, groups=c.groups, bias=False)
    if op == "adder":
        return snn.AdderConv2d(c.in_ch, c.out_ch, c.kernel, c.stride, pad, groups=c.groups, bias=False)
    if op == "shiftadd":
        return snn.ShiftAddConv2d(c.in_ch, c.out_ch, c.kernel, c.stride, pad, groups=c.groups, bias=False)
    if op == "skip":
        if not skip_applies(c):
            raise ValueError(f"op 'skip' is an identity: it needs in_ch == out_ch and stride 1, got {c}")
        return nn.Identity()
    raise ValueError(f"unknown op {op!r}; expected one of {LATENCY_OPS}")


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_key(device=None) -> str:
    """Names the device a latency table was measured on: the CPU model and torch's thread
    count, or the CUDA device name and SM count; plus the forced backend
    (SHIFTADD_BACKEND / use_backend) and a missing compiled extension, which change the
    figures."""
    d = torch.device(device) if device is not None else _default_device()
    if d.type == "cuda":
        idx = d.index if d.index is not None else torch.cuda.current_device()
        prop = torch.cuda.get_device_properties(idx)
        key = f"cuda {prop.name} ({prop.multi_processor_count} SMs)"
    elif d.type == "cpu":
        key = f"cpu {_cpu_model()} ({torch.get_num_threads()} threads)"
    else:
        key = d.type
    from .. import _dispatch

    if _dispatch.forced_backend() != "auto":
        key += f" backend={_dispatch.forced_backend()}"
    if _dispatch._C is None:
        key += " no-extension"
    return key


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_")[:120]


def latency_cache_dir(cache_dir=None) -> Path:
    """``cache_dir`` if given; else ``$SHIFTADD_CACHE_DIR/latency``; else
    ``$XDG_CACHE_HOME/shiftadd/latency`` (``~/.cache/shiftadd/latency``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("SHIFTADD_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "latency"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "shiftadd" / "latency"


def latency_cache_path(device=None, cache_dir=None, version: str = __version__) -> Path:
    """``<cache dir>/<device key>-<shiftadd version>.json`` (see :func:`latency_cache_dir`)."""
    return latency_cache_dir(cache_dir) / f"{_slug(device_key(device))}-{version}.json"


def _time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over ``repeats`` calls after ``warmup`` calls: CUDA events on a
    GPU, perf_counter on the CPU."""
    return measure(fn, device, warmup=warmup, reps=repeats)


def measure_op(op: str, config, device=None, warmup: int = 3, repeats: int = 10) -> float:
    """Median forward seconds of ``build_op(op, config)`` on ``device`` (eval mode, no_grad,
    a random float32 input; the global RNG state is left as it was)."""
    c = LayerConfig.coerce(config)
    d = torch.device(device) if device is not None else _default_device()
    with torch.random.fork_rng(devices=[d] if d.type == "cuda" else []):
        torch.manual_seed(0)
        mod = build_op(op, c).to(d).eval()
        x = torch.randn(c.batch, c.in_ch, c.h, c.w, device=d)
        with torch.no_grad():
            return float(_time_call(lambda: mod(x), d, warmup, repeats))


class LatencyTable:
    """Measured forward latency (seconds) per (op, :class:`LayerConfig`) on one device.

    ``lookup(op, config)`` returns an entry; a missing one is measured now (and the file at
    ``path`` rewritten) when ``measure`` is true, else raises KeyError.  Measuring also
    requires the table's ``device_key`` to be this machine's.  ``measurements`` counts the
    entries this object measured.
    """

    def __init__(self, device=None, *, entries: Optional[Dict[Tuple[str, LayerConfig], float]] = None,
                 path=None, key: Optional[str] = None, version: str = __version__, measure: bool = True,
                 warmup: int = 3, repeats: int = 10):
        self.device = torch.device(device) if device is not None else _default_device()
        self.device_key = key if key is not None else device_key(self.device)
        self.version = version
        self.entries: Dict[Tuple[str, LayerConfig], float] = dict(entries or {})
        self.path = Path(path) if path is not None else None
        self.measure = measure
        self.warmup, self.repeats = warmup, repeats
        self.measurements = 0

    def __len__(self):
        return len(self.entries)

    def __contains__(self, item):
        op, config = item
        return (op, LayerConfig.coerce(config)) in self.entries

    def _measure(self, op: str, c: LayerConfig) -> float:
        here = device_key(self.device)
        if here != self.device_key:
            raise KeyError(f"latency table was measured on {self.device_key!r}, this is {here!r}: "
                           f"cannot measure {op!r} at {c} into it")
        t = measure_op(op, c, self.device, self.warmup, self.repeats)
        self.entries[(op, c)] = t
        self.measurements += 1
        return t

    def lookup(self, op: str, config) -> float:
        """Seconds of one forward of ``op`` at ``config``."""
        if op not in LATENCY_OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {LATENCY_OPS}")
        c = LayerConfig.coerce(config)
        t = self.entries.get((op, c))
        if t is not None:
            return t
        if op == "skip" and not skip_applies(c):
            raise ValueError(f"op 'skip' is an identity: it needs in_ch == out_ch and stride 1, got {c}")
        if not self.measure:
            raise KeyError(f"no latency entry for op {op!r} at {c} ({c.as_dict()}) in the table for "
                           f"{self.device_key!r}, shiftadd {self.version}; measuring is disabled: profile it first "
                           "(profile_latency / shiftadd profile-latency) or allow measuring")
        t = self._measure(op, c)
        if self.path is not None:
            self.save()
        return t

    def estimate(self, layers: Iterable) -> float:
        """Sum of the lookups of ``layers``: (op, config) pairs, or objects with ``.op``
        and ``.config`` such as :class:`LayerCost` (their config must not be None)."""
        total = 0.0
        for item in layers:
            if isinstance(item, (tuple, list)) and len(item) == 2:
                op, config = item
            else:
                op, config = getattr(item, "op"), getattr(item, "config")
                if config is None:
                    raise ValueError(f"{getattr(item, 'name', item)!r} ({op}) has no LayerConfig: "
                                     "the latency table holds conv-type layers only")
            total += self.lookup(op, config)
        return total

    # ---- persistence
    def to_json(self) -> Dict[str, Any]:
        return {"format": CACHE_FORMAT, "device_key": self.device_key, "version": self.version,
                "torch": torch.__version__, "timer": "cuda events" if self.device.type == "cuda" else "perf_counter",
                "warmup": self.warmup, "repeats": self.repeats,
                "entries": [dict(op=op, **c.as_dict(), seconds=t) for (op, c), t in sorted(
                    self.entries.items(), key=lambda kv: (kv[0][0], tuple(kv[0][1].as_dict().values())))]}

    def save(self, path=None) -> Path:
        """Write the table as JSON (atomically) to ``path`` or ``self.path``."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("LatencyTable.save: no path")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @staticmethod
    def check_file(path, device=None, version: str = __version__) -> Optional[str]:
        """Why the cache file at ``path`` cannot serve ``device`` and ``version`` (None if it can)."""
        path = Path(path)
        if not path.is_file():
            return f"{path} does not exist"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{path} is unreadable ({e})"
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return f"{path} has format {data.get('format') if isinstance(data, dict) else None!r}, not {CACHE_FORMAT}"
        here = device_key(device)
        if data.get("device_key") != here:
            return f"{path} was measured on {data.get('device_key')!r}, not {here!r}"
        if data.get("version") != version:
            return f"{path} is for shiftadd {data.get('version')!r}, not {version!r}"
        return None

    @classmethod
    def load(cls, path, device=None, *, measure: bool = True, warmup: int = 3, repeats: int = 10
             ) -> Optional["LatencyTable"]:
        """The table cached at ``path`` if it was measured on this ``device`` with this
        shiftadd version; None if missing, unreadable, foreign or stale."""
        if cls.check_file(path, device) is not None:
            return None
        data = json.loads(Path(path).read_text())
        entries = {}
        try:
            for e in data["entries"]:
                e = dict(e)
                op, t = e.pop("op"), float(e.pop("seconds"))
                entries[(op, LayerConfig.coerce(e))] = t
        except (KeyError, TypeError, ValueError):
            return None
        return cls(device, entries=entries, path=path, key=data["device_key"], version=data["version"],
                   measure=measure, warmup=warmup, repeats=repeats)

    def to_text(self) -> str:
        """The table with one row per config and one column (milliseconds) per op."""
        ops = [o for o in LATENCY_OPS if any(k[0] == o for k in self.entries)]
        configs = sorted({c for _, c in self.entries}, key=lambda c: (c.h * c.w, c.in_ch, c.out_ch, c.stride,
                                                                      c.kernel, c.batch, c.groups), reverse=True)
        head = ["config (in->out k s @HxW n)"] + [f"{o} ms" for o in ops]
        rows = [[str(c)] + [f"{self.entries[(o, c)] * 1e3:.4f}" if (o, c) in self.entries else "-" for o in ops]
                for c in configs]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

        def line(r):
            return "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(r))])

        out = [f"latency per forward, {self.device_key}, shiftadd {self.version}, torch {torch.__version__} "
               f"(median of {self.repeats} after {self.warmup} warm-up)", line(head), "-" * len(line(head))]
        return "\n".join(out + [line(r) for r in rows])

    def __repr__(self):
        return f"LatencyTable({len(self)} entries, {self.device_key!r}, shiftadd {self.version})"


def profile_latency(ops: Sequence[str] = LATENCY_OPS, shapes: Optional[Iterable] = None, device=None, *,
                    cache_dir=None, use_cache: bool = True, measure: bool = True, refresh: bool = False,
                    warmup: int = 3, repeats: int = 10, verbose: bool = False) -> LatencyTable:
    """Latency table of ``ops`` at ``shapes`` (LayerConfigs, dicts or tuples; default
    :data:`DEFAULT_SHAPES`) on ``device`` (default: CUDA if available, else CPU).

    With ``use_cache`` the table cached for this device and shiftadd version
    (:func:`latency_cache_path`) is loaded, only the missing entries are measured, and the
    file is rewritten when something was measured; a foreign, stale or unreadable file is
    ignored (and replaced).  ``refresh`` ignores the cache and re-measures everything.
    ``measure=False`` measures nothing: the returned table holds what the cache had and its
    lookups of missing entries raise KeyError.  ``skip`` is measured only where it applies
    (:func:`skip_applies`).
    """
    for op in ops:
        if op not in LATENCY_OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {LATENCY_OPS}")
    d = torch.device(device) if device is not None else _default_device()
    configs = [LayerConfig.coerce(s) for s in (DEFAULT_SHAPES if shapes is None else shapes)]
    path = latency_cache_path(d, cache_dir) if use_cache else None
    table = None
    if use_cache and not refresh:
        table = LatencyTable.load(path, d, measure=measure, warmup=warmup, repeats=repeats)
        if verbose:
            why = LatencyTable.check_file(path, d)
            print(f"latency cache: {'using ' + str(path) if table is not None else why}", file=sys.stderr)
    if table is None:
        table = LatencyTable(d, path=path, measure=measure, warmup=warmup, repeats=repeats)
    table.measure = measure
    if not measure:
        return table
    before = table.measurements
    for c in configs:
        for op in ops:
            if op == "skip" and not skip_applies(c):
                continue
            if (op, c) not in table.entries:
                table._measure(op, c)
    if path is not None and (table.measurements > before or not path.exists()):
        table.save()
    return table


def _read_config_file(path: str) -> Tuple[List[LayerConfig], Optional[List[str]]]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or give a .json file")
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    ops = None
    if isinstance(data, dict):
        ops = data.get("ops")
        data = data.get("configs", data.get("shapes"))
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a list of configs or {{'configs': [...], 'ops': [...]}}")
    return [LayerConfig.coerce(c) for c in data], ops


def main_profile_latency(argv: Optional[Sequence[str]] = None) -> int:
    """``shiftadd profile-latency``: measure the latency table, print it, save the cache."""
    p = argparse.ArgumentParser(prog="shiftadd profile-latency",
                                description="Measure the forward latency of each candidate op per layer config "
                                            "on this device and cache it.")
    p.add_argument("--configs", metavar="FILE", help="JSON/YAML: a list of {in_ch,out_ch,kernel,stride,h,w[,batch,"
                   "groups]} (or 6-8 int lists), or {'configs': [...], 'ops': [...]}")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="built-in configs when no --configs: ResNet-20 layers at 8x8 (digits), 32x32 (cifar) or both")
    p.add_argument("--batch", type=int_min(1), default=None, help="override the batch of every config")
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(LATENCY_OPS)}")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--cache-dir", default=None, help="directory of the cache files (default $SHIFTADD_CACHE_DIR/"
                   "latency or ~/.cache/shiftadd/latency)")
    p.add_argument("--refresh", action="store_true", help="ignore the cache, re-measure everything")
    p.add_argument("--no-save", action="store_true", help="do not read or write the cache")
    p.add_argument("--warmup", type=int_min(0), default=3)
    p.add_argument("--repeats", type=int_min(1), default=10)
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    file_ops = None
    if a.configs:
        configs, file_ops = _read_config_file(a.configs)
    else:
        configs = list(PRESETS[a.preset])
    if a.batch is not None:
        configs = [LayerConfig(**{**c.as_dict(), "batch": a.batch}) for c in configs]
    ops = tuple(a.ops.split(",")) if a.ops else tuple(file_ops or LATENCY_OPS)
    bad = [o for o in ops if o not in LATENCY_OPS]
    if bad:
        p.error(f"unknown ops {bad}; choose from {LATENCY_OPS}")
    t0 = time.perf_counter()
    table = profile_latency(ops, configs, a.device, cache_dir=a.cache_dir, use_cache=not a.no_save,
                            refresh=a.refresh, warmup=a.warmup, repeats=a.repeats, verbose=True)
    print(table.to_text())
    print(f"\n{table.measurements} entries measured in {time.perf_counter() - t0:.1f} s"
          + (f"; cache: {table.path}" if table.path is not None else "; not saved"))
    return 0


__all__ = [
    "ENERGY_PJ", "PRECISIONS", "CONVENTIONS", "AUX_RECIPES", "unit_energy", "mac_energy", "LayerCost", "LayerConfig",
    "layer_costs", "model_energy", "energy_table", "main_energy", "LATENCY_OPS", "DEFAULT_SHAPES", "DIGITS_SHAPES",
    "CIFAR_SHAPES", "LatencyTable", "profile_latency", "measure_op", "build_op", "skip_applies", "device_key",
    "latency_cache_dir", "latency_cache_path", "main_profile_latency",
]
