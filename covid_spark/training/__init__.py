"""Training: what every way of training shares, knowing nothing of Spark or the engines.

- ``job``: ``TrainJob``, the frozen, versioned job description every rank receives.
- ``core``: ``fit_model`` and its callbacks (schedule, best weights, epoch log, checkpoint), the
  ``Distribution`` protocol an engine's rank context meets (imports TensorFlow).
- ``tfdata``: the train split as a tf.data pipeline with on-line augmentation.
- ``weights``: class weights from the train split's counts.
"""
