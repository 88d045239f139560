"""Benchmarks (`python -m bench.peak`, `bench.train_step`, `bench.sample`, `bench.compile`, `bench.memory`).

Installed with the `bench` extra; never part of the default test run. See bench/README.md.
"""
