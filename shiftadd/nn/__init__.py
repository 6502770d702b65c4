from .adder import (AdderConv2d, AdderConv2dInt8, AdderLinear, AdderLinearInt8, fake_quantize_adders,
                    quantize_adders_int8, renormalize_eta_grads)
from .shift import ShiftConv2d, ShiftLinear
from .packed import PackedShiftConv2d, PackedShiftLinear, pack_model
from .shiftadd import ShiftAddConv2d
from ._common import recalibrate_bn
__all__ = ["AdderConv2d", "AdderLinear", "AdderLinearInt8", "AdderConv2dInt8", "quantize_adders_int8",
           "fake_quantize_adders", "recalibrate_bn", "renormalize_eta_grads", "ShiftConv2d", "ShiftLinear",
           "ShiftAddConv2d", "PackedShiftLinear", "PackedShiftConv2d", "pack_model"]
