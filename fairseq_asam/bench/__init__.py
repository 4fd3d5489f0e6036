"""Benchmarks behind `scripts/benchmark.py` / `make bench` (issue: ASAM at the cost floor of two passes)."""
