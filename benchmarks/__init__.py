"""Benchmarks behind ``scripts/benchmark.py`` / ``make bench``: SAM/ASAM against their base optimizers.

Repository code, not part of the installed package; run from the repository root.
"""
