"""Benchmarks of the covid-spark pipeline, each figure against its baseline measured in the same run.

Entry points: ``run`` (`make bench`), ``demo`` (`make bench-demo`), ``xl`` (`make bench-xl`),
``predict_bench``, ``dup_bench`` and ``treemem`` (``python -m bench.<name>``). Measurements:
``preprocess_bench``, ``train_bench`` (training and reading), ``predict_bench``, ``dup_bench``. Shared: ``harness``
(paths, Spark session, machine facts, spawned processes, saving, tables, the goals and their verdicts),
``monitors`` (memory and CPU samplers), ``inputs`` (benchmark inputs made from a source).
"""
