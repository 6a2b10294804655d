"""EASE speed benchmarks: `python benchmarks/run.py [--quick]` (see run.py and docs/speed.md)."""
