"""Evaluation maths: metrics, comparisons and explanations, with no Spark and no file layout.

- ``metrics``: classification metrics, ROC/PR curves, bootstrap intervals, calibration.
- ``compare``: ``python -m covid_spark.evaluation.compare``: metrics files side by side, paired.
- ``explain``: Grad-CAM heatmaps and overlays for Keras classifiers (imports TensorFlow).
"""
