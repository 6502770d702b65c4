"""pytest-benchmark runs of the benchmark cases: `pytest benchmarks --benchmark-only`
(outside the default test run, whose testpaths is tests/)."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


def cuda_synced(fn):
    """Wraps fn so each timed call waits for the GPU."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
