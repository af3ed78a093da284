"""Benchmarks: each ``bench_<name>.py`` module has ``main() -> None`` printing its figures
and ratios against a baseline measured in the same run. Run with ``nox -s bench [-- name ...]``.
"""
