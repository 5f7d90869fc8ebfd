"""Tracking and serving: what leaves a run for other tools, from the driver only.

- ``tracker``: optional MLflow tracking, one MLflow run per run dir, each stage's outputs logged once.
- ``store``: the tracking URI a config resolves to, artifact roots, a one-try probe.
- ``values``: params, metrics and digests computed from the run dir's files without MLflow.
- ``serving``: the servable SavedModel export (``python -m covid_spark.tracking.serving RUN_DIR``).
"""
