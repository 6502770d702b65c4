"""Layer factory: one place that maps an operator name to a conv / linear layer.

    make_conv(op, in_ch, out_ch, kernel_size, stride=1, padding=None, **kw)
    make_linear(op, in_f, out_f, bias=True, **kw)

``op`` is one of :data:`OPS`:

* ``"conv"``     -> :class:`torch.nn.Conv2d` / :class:`torch.nn.Linear` (multiplicative);
* ``"shift"``    -> :class:`shiftadd.nn.ShiftConv2d` / :class:`~shiftadd.nn.ShiftLinear`
  (DeepShift; ``mode="ps"`` by default, ``weight_bits=5``);
* ``"adder"``    -> :class:`shiftadd.nn.AdderConv2d` / :class:`~shiftadd.nn.AdderLinear`
  (AdderNet; put a BatchNorm after it);
* ``"shiftadd"`` -> :class:`shiftadd.nn.ShiftAddConv2d` (ShiftAddNet: shift conv then adder
  conv); its linear layer is a :class:`~shiftadd.nn.ShiftLinear`, as :func:`shiftadd.convert`.

Keyword arguments (one dict can be shared by every op, so a NAS can pass the same
settings to whatever op it samples):

* geometry, passed to every op: ``dilation``, ``groups``, ``bias`` (conv default False);
* shift settings, used by "shift" and "shiftadd", ignored by the others: ``mode``,
  ``weight_bits``, ``act_bits``, ``rounding``;
* adder settings, used by "adder" and "shiftadd", ignored by the others: ``eta``,
  ``grad_mode``.

Anything else raises TypeError.
"""

from __future__ import annotations

from torch import nn

from ..nn import AdderConv2d, AdderLinear, ShiftAddConv2d, ShiftConv2d, ShiftLinear

OPS = ("conv", "shift", "adder", "shiftadd")
SHIFT_KW = ("mode", "weight_bits", "act_bits", "rounding")
ADDER_KW = ("eta", "grad_mode")
GEOMETRY_KW = ("dilation", "groups", "bias")


def _split_kw(op: str, kw: dict, allowed_geometry=GEOMETRY_KW):
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    unknown = set(kw) - set(SHIFT_KW) - set(ADDER_KW) - set(allowed_geometry)
    if unknown:
        raise TypeError(f"unknown layer arguments {sorted(unknown)}; accepted: "
                        f"{list(allowed_geometry) + list(SHIFT_KW) + list(ADDER_KW)}")
    geo = {k: kw[k] for k in allowed_geometry if k in kw}
    shift = {k: kw[k] for k in SHIFT_KW if k in kw} if op in ("shift", "shiftadd") else {}
    adder = {k: kw[k] for k in ADDER_KW if k in kw} if op in ("adder", "shiftadd") else {}
    return geo, shift, adder


def make_conv(op: str, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding=None,
              **kw) -> nn.Module:
    """A 2-D convolution layer of kind `op` (bias off unless ``bias=True``; padding
    ``kernel_size // 2`` (times the dilation) unless given)."""
    geo, shift, adder = _split_kw(op, kw)
    geo.setdefault("bias", False)
    if padding is None:
        padding = (kernel_size // 2) * geo.get("dilation", 1)
    args = (in_ch, out_ch, kernel_size, stride, padding)
    if op == "conv":
        return nn.Conv2d(*args, **geo)
    if op == "shift":
        return ShiftConv2d(*args, **geo, **shift)
    if op == "adder":
        return AdderConv2d(*args, **geo, **adder)
    if "mode" in shift:
        shift["shift_mode"] = shift.pop("mode")
    return ShiftAddConv2d(*args, **geo, **shift, **adder)


def make_linear(op: str, in_f: int, out_f: int, bias: bool = True, **kw) -> nn.Module:
    """A linear layer of kind `op` (bias on by default, as nn.Linear)."""
    _, shift, adder = _split_kw(op, kw, allowed_geometry=())
    if op == "conv":
        return nn.Linear(in_f, out_f, bias=bias)
    if op == "adder":
        return AdderLinear(in_f, out_f, bias=bias, **adder)
    return ShiftLinear(in_f, out_f, bias=bias, **shift)  # shift, and a shift-add net's classifier


def is_adder_like(m: nn.Module) -> bool:
    """True for a layer whose output is an adder output (needs a BatchNorm after it)."""
    return isinstance(m, (AdderConv2d, AdderLinear, ShiftAddConv2d))
