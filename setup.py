"""Build hook for setuptools; everything is declared in pyproject.toml.

Kept so that `pip install --no-build-isolation -e .` works with older pip/setuptools front ends.
"""

from setuptools import setup

setup()
