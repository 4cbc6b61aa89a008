"""Benchmarks (pytest-benchmark). Not part of the test run: `make bench-suite`.

Figures that are not a time per call (bytes per key, sweep pauses) are printed and
stored in each benchmark's `extra_info`, so `--benchmark-json` keeps them.
"""
