"""Model zoo: CIFAR ResNet-20/32/56 and VGG-small, each in four variants.

    model = build_model("resnet20", variant="adder", num_classes=10, in_channels=1)

Variants (:data:`VARIANTS`):

* ``"conv"``: ordinary nn.Conv2d / nn.Linear;
* ``"shift"``: DeepShift — every conv and linear layer (stem and classifier included,
  as DeepShift's from-scratch runs convert all layers) is a ShiftConv2d / ShiftLinear,
  mode "ps" by default (``mode="q"`` for DeepShift-Q), ``weight_bits=5``;
* ``"adder"``: AdderNet — the first conv and the classifier stay multiplicative, every
  other conv (1x1 shortcut convs included) is an AdderConv2d followed by a BatchNorm2d;
* ``"shiftadd"``: ShiftAddNet — as "adder" but with ShiftAddConv2d (a PS shift conv then
  an adder conv), followed by a BatchNorm2d.

``multiplicative_ends`` overrides whether the stem conv and the classifier stay
nn.Conv2d / nn.Linear (default: False for "shift", True for "adder" / "shiftadd").
Other keyword arguments go to the layers (:mod:`shiftadd.models.layers`): ``mode``,
``weight_bits``, ``act_bits``, ``rounding`` (shift) and ``eta``, ``grad_mode`` (adder).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .layers import OPS, make_conv, make_linear
from .resnet_cifar import ResNetCifar
from .vgg import VGG, VGG_SMALL

VARIANTS = OPS
MODELS = ("resnet20", "resnet32", "resnet56", "vgg_small")
_DEPTH = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


def build_model(name: str, variant: str = "conv", num_classes: int = 10, in_channels: int = 3,
                width: float = 1.0, multiplicative_ends: Optional[bool] = None, **layer_kwargs) -> nn.Module:
    """Build model `name` (one of :data:`MODELS`) in `variant` (one of :data:`VARIANTS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if multiplicative_ends is None:
        multiplicative_ends = variant in ("adder", "shiftadd")
    ends = "conv" if multiplicative_ends else variant
    head = ends if ends != "shiftadd" else "shift"
    stem = ends
    # check the layer kwargs once, whatever the variant uses
    make_linear("shiftadd", 1, 1, **layer_kwargs)
    common = dict(num_classes=num_classes, in_channels=in_channels, width=width, op=variant, stem_op=stem,
                  head_op=head, layer_kwargs=layer_kwargs)
    if name in _DEPTH:
        return ResNetCifar(_DEPTH[name], **common)
    return VGG(VGG_SMALL, **common)


__all__ = ["build_model", "MODELS", "VARIANTS", "make_conv", "make_linear", "ResNetCifar", "VGG"]
