"""Repository scripts (demo, benchmarks' runner, studies, plots); importable from the repository root.

Not part of the installed package: run them from a clone, e.g. ``python -m scripts.demo`` or
``python scripts/toy_example.py``.
"""
