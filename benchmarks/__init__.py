"""Reproducible speed / memory benchmarks of scMMGPT; `make bench` runs `benchmarks/run.py`."""
