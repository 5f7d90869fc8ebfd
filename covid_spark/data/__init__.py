"""Data: the stored dataset and run directory, and the driver-side maths over image metadata.

- ``schema``: the Petastorm schema of the dataset (imports Petastorm and Spark types).
- ``dataset``: the dataset contract: ``_summary.json``, split locations, split readers.
- ``storage``: atomic writes of files and directories, on local disk or any Hadoop filesystem URL.
- ``rundir``: the run (model) directory: every artefact's path, and the provenance in ``run.json``.
- ``duplicates``: difference hashes and near-duplicate grouping (banded search, union-find).
- ``splits``: patient-wise, label-stratified train/val/test assignment, deterministic for a seed.
"""
