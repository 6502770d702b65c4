"""shiftadd: fast multiplication-less neural-network operators for PyTorch.

Adder (AdderNet, L1-distance) and shift (DeepShift, power-of-two) layers as registered
PyTorch operators with compiled CPU/CUDA kernels, Triton kernels and pure-PyTorch
references; drop-in ``nn`` modules; model conversion.

    import shiftadd
    y = shiftadd.adder_conv2d(x, w, padding=1)
    layer = shiftadd.nn.AdderConv2d(16, 32, 3, padding=1)
    model, n = shiftadd.convert(model, to="adder")

Backend choice: see :mod:`shiftadd._dispatch` (``shiftadd.use_backend``,
``SHIFTADD_BACKEND``); ``python -m shiftadd.info`` prints what serves which device.
"""

__version__ = "0.1.0"

from . import _ops  # noqa: F401  (defines every schema before the extension registers kernels)
from . import _dispatch
from ._dispatch import BackendUnavailable, explain, use_backend
from .functional import (
    adder_conv2d,
    adder_linear,
    adder_linear_int8,
    quantize_pot,
    round_to_fixed,
    shift_conv2d,
    shift_linear,
    shift_linear_int,
    shift_linear_packed,
)
from .packed import PackedPoT, pack_pot, unpack_pot

_dispatch.warn_once_if_degraded()

from . import nn  # noqa: E402
from .convert import convert  # noqa: E402
from .nn.packed import pack_model  # noqa: E402

__all__ = [
    "adder_linear", "adder_conv2d", "shift_linear", "shift_conv2d", "quantize_pot", "round_to_fixed",
    "use_backend", "explain", "BackendUnavailable", "convert", "nn", "__version__",
    "pack_pot", "unpack_pot", "PackedPoT", "pack_model", "shift_linear_packed", "shift_linear_int",
    "adder_linear_int8",
]
