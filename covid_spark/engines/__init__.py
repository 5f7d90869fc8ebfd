"""Engines: start the train stage's ranks on the Spark executors; they know nothing of training.

- ``base``: the ``Launcher`` protocol and the environment every rank gets.
- ``horovod``: ``horovod.spark.run`` over Gloo (pinned stack): launcher and rank context.
- ``tfdistribute``: ``MultiWorkerMirroredStrategy`` in Spark barrier tasks (both stacks): launcher,
  barrier task, rank process, rank context.
- ``registry``: ``ENGINES`` by name and ``resolve_engine`` (``auto``; refuses an engine the stack lacks).
"""
