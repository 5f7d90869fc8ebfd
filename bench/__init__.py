"""Benchmarks of the covid-spark pipeline: `make bench` (bench/run.py) and `make bench-demo` (bench/demo.py)."""
