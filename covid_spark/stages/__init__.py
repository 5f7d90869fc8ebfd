"""Stages: what the jobs run. Each stage's driver code and the code Spark ships to executors or
ranks live in separate modules; no stage imports another (the pipeline runs them all).

- ``preprocess`` (driver) and ``preprocess_tasks`` (executors): image files → a Petastorm dataset per split.
- ``train`` (driver) and ``train_rank`` (each rank): training through an engine; checkpoints, ``--resume``.
- ``evaluate``: a trained model on one split → its metrics file.
- ``predict`` (driver) and ``predict_tasks`` (executors): batch inference over new images.
- ``report``: a run's figures, Grad-CAM gallery, HTML report and model card.
- ``crossval``: patient-grouped k-fold cross-validation over train + val, in one process.
- ``pipeline``: every stage under one run id, skipping what did not change.
"""
