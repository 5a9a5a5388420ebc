"""Benchmarks of smsgate against bare baselines on the same machine and database (``python -m bench``).

The package also holds the pieces the chaos runs (``python -m chaos``) reuse: :mod:`bench.support` (scratch
databases, child processes, free ports) and :mod:`bench.loadgen` (the HTTP load generator).
"""
