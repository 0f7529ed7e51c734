"""Benchmarks of every rule side by side: memory, speed and accuracy (``manlearn bench``).

Each part appends JSON rows (with machine, versions, date, commit) to a results file;
:mod:`manlearn.bench.report` turns the files into the tables and PNG plots of BENCHMARKS.md.
"""
from .common import ALL_METHODS, environment, parse_method, read_rows

__all__ = ["ALL_METHODS", "environment", "parse_method", "read_rows"]
