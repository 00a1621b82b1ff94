"""Reproducible speed measurements: every figure is a ratio against a baseline measured in the same
run. `python -m benchmarks NAME` (or `make bench` for all) writes benchmarks/results/NAME.json and
refreshes NAME's section of BENCHMARKS.md."""
