"""Lung fields: a small U-Net segmenter, its training job, inference, and crops to the lungs.

The masks let a classifier be cropped to the lungs, and let an audit (:mod:`covid_spark.audit`) ask whether it looks at them.

Modules, each importing only those above it:

- ``masks``         pure functions on masks: binarize, Dice, :func:`lung_box`, :func:`mask_summary`,
                    :func:`crop_to_box`. No TensorFlow.
- ``model``         :func:`make_segmenter` (the pure Keras builder) and the portable ``.npz`` weight
                    format (:func:`save_weights_npz`, :func:`load_weights_npz`).
- ``segment``       inference: :func:`prepare` (grey, resize, contrast stretch) and :func:`segment`,
                    which loads the shipped weights lazily once per process (safe in Spark executors).
- ``data``          the edge that reads ``../shared/data/lung-masks`` and its images, and the
                    patient-wise held-out split.
- ``train``         ``python -m covid_spark.lungs.train``: trains, writes weights + a JSON of held-out Dice.
- ``contact_sheet`` ``python -m covid_spark.lungs.contact_sheet``: masks overlaid on images of every source.

``weights/`` holds the shipped weights (``unet128.npz``) and the record of how they were made
(``unet128.json``). See ``docs/lungs.md``.

TensorFlow is imported only inside functions (when a model is built or loaded), so importing this
package stays cheap; a process (driver or Spark executor) loads TensorFlow on its first ``segment`` call.
"""
from covid_spark.lungs.masks import LungBox, binarize, crop_to_box, dice, lung_box, mask_summary
from covid_spark.lungs.segment import load_model, prepare, segment

__all__ = ["LungBox", "binarize", "crop_to_box", "dice", "load_model", "lung_box", "mask_summary",
           "prepare", "segment"]
