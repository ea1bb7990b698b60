"""Benchmarks for stagetx, each beside a baseline measured in the same run (``python -m bench.run``)."""
