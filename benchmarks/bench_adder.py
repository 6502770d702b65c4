"""Adder kernels versus the reference, AdderNet's unfold, torch.cdist and the
multiplication layer.  Usage: python benchmarks/bench_adder.py [--device cpu|cuda] [--quick]
(same as `shiftadd bench adder`; the cases live in shiftadd/bench/adder.py)."""

import sys

from shiftadd.bench.adder import main

if __name__ == "__main__":
    sys.exit(main())
