"""End-to-end training and search time, fast kernels versus the reference ops.
Usage: python benchmarks/bench_nas.py [--device cpu|cuda] [--data-dir CIFAR10_DIR]
(same as `shiftadd bench nas`; the code lives in shiftadd/bench/nas.py)."""

import sys

from shiftadd.bench.nas import main

if __name__ == "__main__":
    sys.exit(main())
