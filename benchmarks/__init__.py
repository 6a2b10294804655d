"""EASE speed benchmarks: `python benchmarks/run.py [--quick]` (see run.py and README, Speed)."""
