"""Does a classifier learn the disease or the hospital? Checks that need only numpy and scikit-learn.

Nothing here imports TensorFlow or Spark: callers hand in arrays (features,
predictions, Grad-CAM maps, lung masks) and get plain numbers and words back.

Modules:

- ``probe``    :func:`source_probe`: within each class, can a linear probe on the model's features tell
               which source (hospital, collection) an image came from, better than guessing the
               class's majority source?
- ``masking``  controls: :func:`remove_lungs` (lung fields blacked out) and :func:`keep_only_lungs`
               (all but the lungs blacked out), for re-scoring a classifier on altered images.
- ``cam``      :func:`cam_energy_in_mask`: the share of each Grad-CAM map's energy inside the lungs;
               :func:`energy_by_group` averages it per class and per source.
- ``verdict``  :func:`verdict`: the three measurements above turned into a plain-words verdict, with
               the thresholds as named constants.
"""
from covid_spark.audit.cam import cam_energy_in_mask, energy_by_group
from covid_spark.audit.masking import keep_only_lungs, remove_lungs
from covid_spark.audit.probe import source_probe
from covid_spark.audit.verdict import Verdict, verdict

__all__ = ["Verdict", "cam_energy_in_mask", "energy_by_group", "keep_only_lungs", "remove_lungs",
           "source_probe", "verdict"]
