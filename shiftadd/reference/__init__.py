"""Pure-PyTorch references of every shiftadd operator (registered as the ``ref_*`` ops).

They run on any device and in float64, follow the papers' rules exactly, and keep
temporaries bounded; the optimized backends never import them, the tests compare
every backend against them.
"""

from .adder import (
    adder_conv2d,
    adder_conv2d_fp16x2,
    adder_conv2d_grad_input,
    adder_conv2d_grad_weight,
    adder_linear,
    adder_linear_fp16x2,
    adder_linear_grad_input,
    adder_linear_grad_weight,
    adder_linear_int8,
)
from .shift import (
    decode_pot,
    quantize_pot_ps,
    quantize_pot_q,
    round_to_fixed,
    shift_linear_int,
    shift_linear_packed,
    shift_range,
)

__all__ = [
    "adder_linear", "adder_linear_grad_input", "adder_linear_grad_weight",
    "adder_conv2d", "adder_conv2d_grad_input", "adder_conv2d_grad_weight", "adder_linear_int8",
    "adder_linear_fp16x2", "adder_conv2d_fp16x2",
    "quantize_pot_q", "quantize_pot_ps", "round_to_fixed", "shift_range",
    "shift_linear_packed", "shift_linear_int", "decode_pot",
]
