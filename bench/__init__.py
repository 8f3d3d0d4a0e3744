"""Benchmarks: run each from the repository root as ``python -m bench.NAME`` (speed, alignment quality against
classical aligners, the solve's settings, training losses, the defect detector). Results: ``bench/RESULTS.md``."""
