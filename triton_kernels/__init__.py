"""Triton kernels of shiftadd, installed as ``shiftadd._triton`` (the top-level name
``triton_kernels`` belongs to the Triton project).  Imports only torch and triton.

``FAMILIES`` maps each operator family (see shiftadd/_ops.py) to its launcher; the
launchers take the op schema's arguments and are registered as
``shiftadd::triton_<family>`` with ``torch.library.triton_op``.
"""

from .adder import FAMILIES as _ADDER_FAMILIES
from .shift import FAMILIES as _SHIFT_FAMILIES

FAMILIES = {**_ADDER_FAMILIES, **_SHIFT_FAMILIES}
