"""Benchmarks of the covid-spark pipeline, each figure against its baseline measured in the same run: the entry
points, what each measures and the shared modules are in docs/performance.md ("How to run", "The code")."""
