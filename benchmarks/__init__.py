"""Micro-benchmarks of gckd_ray components (run with ``python -m benchmarks.<name>``)."""
