"""Shift quantizers and layers versus the reference and the multiplication layer.
Usage: python benchmarks/bench_shift.py [--device cpu|cuda] [--quick]
(same as `shiftadd bench shift`; the cases live in shiftadd/bench/shift.py)."""

import sys

from shiftadd.bench.shift import main

if __name__ == "__main__":
    sys.exit(main())
