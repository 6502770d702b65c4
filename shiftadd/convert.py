"""Replace the nn.Conv2d / nn.Linear layers of a model by shift, adder or shift-add layers.

Follows DeepShift's ``convert_to_shift`` (layers are taken from the last one backwards,
``depth`` of them, optionally initialised from the trained weights) and AdderNet's
recipe (the first convolution and the classifier stay multiplicative by default; DeepShift
converts those too: pass ``skip_first=False, skip_last=False``).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .nn import AdderConv2d, AdderLinear, ShiftAddConv2d, ShiftConv2d, ShiftLinear

TARGETS = ("shift", "adder", "shiftadd")
_SHIFT_KW = ("mode", "weight_bits", "act_bits", "rounding")
_ADDER_KW = ("eta", "grad_mode", "accumulate")


def _candidates(model: nn.Module):
    """([(parent, attribute name), ...], layer) of every nn.Conv2d / nn.Linear, in module
    order (depth-first, as model.modules() lists them); a layer used in several places is
    listed once, with all of them.  Exact types only: subclasses may carry other semantics."""
    out, index, walked = [], {}, set()
    if type(model) in (nn.Conv2d, nn.Linear):  # the model is itself one layer (no place: it is returned)
        return [([], model)]

    def walk(parent):
        if id(parent) in walked:  # a shared block: its attributes were recorded once, for all its uses
            return
        walked.add(id(parent))
        for name, child in parent._modules.items():  # named_children() would skip a second use
            if child is None:
                continue
            if type(child) in (nn.Conv2d, nn.Linear):
                if id(child) not in index:
                    index[id(child)] = len(out)
                    out.append(([], child))
                out[index[id(child)]][0].append((parent, name))
            else:
                walk(child)

    walk(model)
    return out


def _factory(m: nn.Module) -> dict:
    return {"device": m.weight.device, "dtype": m.weight.dtype}


def _conv_args(m: nn.Conv2d) -> tuple:
    return (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)


def _make(m: nn.Module, to: str, from_weights: bool, kw: dict) -> nn.Module:
    shift_kw = {k: kw[k] for k in _SHIFT_KW if k in kw}
    adder_kw = {k: kw[k] for k in _ADDER_KW if k in kw}
    has_bias = m.bias is not None
    if isinstance(m, nn.Conv2d):
        if to == "shift":
            new = ShiftConv2d(*_conv_args(m), bias=has_bias, padding_mode=m.padding_mode, **shift_kw, **_factory(m))
            shift_part = new
        elif to == "adder":
            new = AdderConv2d(*_conv_args(m), bias=has_bias, padding_mode=m.padding_mode, **adder_kw, **_factory(m))
            shift_part = None
        else:
            sk = {("shift_mode" if k == "mode" else k): v for k, v in shift_kw.items()}
            new = ShiftAddConv2d(*_conv_args(m), bias=has_bias, padding_mode=m.padding_mode, **sk, **adder_kw,
                                 **_factory(m))
            shift_part = new.shift
    else:  # nn.Linear
        if to == "adder":
            new = AdderLinear(m.in_features, m.out_features, bias=has_bias, **adder_kw, **_factory(m))
            shift_part = None
        else:  # shift, and the classifier of a shift-add net (ShiftAddNet uses a shift FC)
            new = ShiftLinear(m.in_features, m.out_features, bias=has_bias, **shift_kw, **_factory(m))
            shift_part = new
    if from_weights:
        with torch.no_grad():
            if shift_part is not None:
                shift_part.load_float_weight(m.weight)
            elif to == "adder":
                new.weight.copy_(m.weight)
            if has_bias:
                target = new.adder if isinstance(new, ShiftAddConv2d) else new
                if target.bias is not None:
                    target.bias.copy_(m.bias)
    new.train(m.training)
    return new


def convert(model: nn.Module, to: str = "shift", skip_first: bool = True, skip_last: bool = True,
            from_weights: bool = True, depth: Optional[int] = None, layers: Iterable[str] = ("conv", "linear"),
            **layer_kwargs) -> tuple:
    """Replace nn.Conv2d / nn.Linear layers of `model` in place.

    to: "shift" (ShiftConv2d / ShiftLinear), "adder" (AdderConv2d / AdderLinear) or
        "shiftadd" (ShiftAddConv2d; linear layers become ShiftLinear).
    skip_first / skip_last: keep the first and the last eligible layer (the stem
        convolution and the classifier) multiplicative, as AdderNet does.
    from_weights: initialise from the trained weights (shift Q: copied; shift PS:
        P = round(log2 |w|), S = sign(w); adder: copied; biases copied).
    depth: convert at most this many layers, counting from the last one backwards
        (DeepShift's shift_depth); None converts all.
    layers: which kinds to convert, a subset of ("conv", "linear").
    layer_kwargs: passed to the new layers: mode, weight_bits, act_bits, rounding
        (shift); eta, grad_mode (adder).

    Returns (model, number of layers replaced); a model that is itself an nn.Conv2d /
    nn.Linear is the first and the last layer: with skip_first=False and skip_last=False
    it is returned converted.
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    layers = tuple(layers)
    bad = [k for k in layers if k not in ("conv", "linear")]
    if bad:
        raise ValueError(f"layers must be a subset of ('conv', 'linear'), got {layers!r}")
    unknown = set(layer_kwargs) - set(_SHIFT_KW) - set(_ADDER_KW)
    if unknown:
        raise TypeError(f"unknown layer arguments {sorted(unknown)}; accepted: {_SHIFT_KW + _ADDER_KW}")
    if depth is not None and depth < 0:
        raise ValueError(f"depth must be >= 0 or None, got {depth}")
    cands = _candidates(model)
    chosen = list(range(len(cands)))
    if skip_first and chosen:
        chosen = chosen[1:]
    if skip_last and chosen and chosen[-1] == len(cands) - 1:
        chosen = chosen[:-1]
    kinds = {"conv": nn.Conv2d, "linear": nn.Linear}
    chosen = [i for i in chosen if any(type(cands[i][1]) is kinds[k] for k in layers)]
    if depth is not None:
        chosen = chosen[max(0, len(chosen) - depth):] if depth else []
    for i in chosen:
        places, child = cands[i]
        new = _make(child, to, from_weights, layer_kwargs)
        if not places:  # the model itself
            return new, 1
        for parent, name in places:  # a shared layer stays shared
            setattr(parent, name, new)
    return model, len(chosen)
