"""Benchmarks of the shiftadd kernels against the references and against what users run
today (the AdderNet unfold implementation, torch.cdist, cuBLAS/cuDNN or oneDNN
multiplication layers).  ``shiftadd bench`` and ``benchmarks/bench_*.py`` print the
tables; ``pytest benchmarks --benchmark-only`` runs the same cases under pytest-benchmark.
Every ratio is measured in the same run, on the same device and dtype.
"""
