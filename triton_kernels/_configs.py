"""Which launch configurations the Triton kernels autotune over (environment, read at import):

* default: every configuration of a kernel's list;
* ``SHIFTADD_TRITON_AUTOTUNE=0``: the first only (the test suite sets it: its random
  shapes would each be autotuned);
* ``SHIFTADD_TRITON_CONFIG=i``: configuration i of every list (modulo its length), so
  that a test can run each configuration of every kernel (tests/test_cuda.py).
"""

import os

import torch

AUTOTUNE = os.environ.get("SHIFTADD_TRITON_AUTOTUNE", "1") != "0"
FORCED = os.environ.get("SHIFTADD_TRITON_CONFIG", "").strip()
MAX_CONFIGS = 8  # the longest list (the packed linear's); SHIFTADD_TRITON_CONFIG=0..7 covers every config


def num_sms(device) -> int:
    """Multiprocessors of a CUDA device (split heuristics); 4 under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose(full: list) -> list:
    if FORCED:
        return [full[int(FORCED) % len(full)]]
    return full if AUTOTUNE else full[:1]
