"""Preprocess stage: image files → decoded 3-channel arrays → a Petastorm dataset per split."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from typing import Iterable, Iterator

from covid_spark.config import CLASSES
from covid_spark.sources import discover
from covid_spark.splits import SPLITS, assign_splits
from covid_spark.storage import HadoopFS, atomic_directory, to_url

logger = logging.getLogger(__name__)

# 256-bit difference hashes: at 64 bits many unrelated chest X-rays lie within a few bits of
# each other, and near-duplicate groups chain across hundreds of images (seen on cxr3).
HASH_SIZE = 16

# Test hook: when set to a file path that does not exist yet, the first Python worker to
# decode creates it and dies, so a test can show that Spark's task retry loses nothing.
FAIL_ONCE_ENV = "COVID_SPARK_FAIL_ONCE"


def read_and_decode(path: str, size: int, max_pixels: int) -> tuple:
    """Return ``(image, dhash, error)`` for one file; exactly one of image/error is None."""
    from covid_spark.images import ImageRejected, decode_image, dhash

    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None, None, "file not found"
    except OSError as exc:
        return None, None, f"cannot read file: {exc.strerror or exc}"
    try:
        image = decode_image(data, size=size, max_pixels=max_pixels)
    except ImageRejected as exc:
        return None, None, exc.reason
    except Exception as exc:  # noqa: BLE001 - one odd file must never kill the job
        return None, None, f"cannot decode: {type(exc).__name__}: {exc}"
    return image, dhash(image, hash_size=HASH_SIZE), None


def decode_partition(records: Iterable[dict], size: int, max_pixels: int) -> Iterator[dict]:
    """mapPartitions body: decode each record's file, keep the record, add image/dhash/error."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    for record in records:
        image, digest, error = read_and_decode(record["path"], size, max_pixels)
        yield dict(record, image=image, dhash=digest, error=error)


def split_images(good: list[dict], cfg: dict, duplicates: list[list[str]]) -> dict[str, str]:
    """Split name per path: patient-wise and stratified, or leave-one-source-out.

    With ``holdout_source`` set, every image of that source goes to test and the others are
    split into train and val only (a shortcut check: does the model work on a source it never
    saw?). Duplicate groups that straddle the held-out source are dropped from train/val.
    """
    holdout = cfg.get("holdout_source") or ""
    rest = [m for m in good if m["source"] != holdout] if holdout else good
    if holdout and len(rest) == len(good):
        known = sorted({m["source"] for m in good})
        raise ValueError(f"preprocess.holdout_source {holdout!r} matches no image; sources: {known}")
    test_fraction = 0.0 if holdout else float(cfg["test_fraction"])
    splits = assign_splits([m["path"] for m in rest], [m["label"] for m in rest],
                           [m["patient_id"] for m in rest], float(cfg["val_fraction"]), test_fraction,
                           int(cfg["seed"]), linked=duplicates)
    split_of = dict(zip((m["path"] for m in rest), splits))
    if holdout:
        held = {m["path"] for m in good if m["source"] == holdout}
        split_of.update({p: "test" for p in held})
        for group in duplicates:  # a copy of a held-out image must not be trained on
            if held & set(group):
                split_of.update({p: "test" for p in group})
    return split_of


def _count(rows: Iterable[dict], key: str) -> dict[str, int]:
    return dict(sorted(Counter(r[key] for r in rows).items()))


def _num_files(rows: int, rows_per_group: int, min_groups: int) -> int:
    return max(1, min(rows, max(min_groups, math.ceil(rows / rows_per_group))))


def preprocess(spark, input_location: str, output: str, config: dict, overwrite: bool = False) -> dict:
    """Run the whole stage and return the summary written to ``<output>/_summary.json``.

    Raises:
        FileNotFoundError / ValueError: bad input location, manifest or class names
            (before anything is written).
        FileExistsError: ``output`` exists and ``overwrite`` is false.
    """
    from petastorm.etl.dataset_metadata import materialize_dataset
    from petastorm.unischema import dict_to_spark_row
    from pyspark import StorageLevel

    from covid_spark.images import group_duplicates
    from covid_spark.schema import XraySchema

    started = time.time()
    cfg = config["preprocess"]
    size, max_pixels = int(cfg["image_size"]), int(cfg["max_pixels"])
    url = to_url(output)
    sc = spark.sparkContext
    with atomic_directory(spark, url, overwrite) as tmp_url:  # refuses an existing output first
        inventory = discover(input_location, skip_unknown=bool(cfg["skip_unknown_classes"]))
        records = inventory.records
        # Few, large tasks: every Python task pays a fixed start cost (on Python 3.11 PySpark's
        # importlib.invalidate_caches() re-reads pyspark.zip, ~80 ms), see docs/performance.md.
        slices = max(1, min(len(records), max(2 * sc.defaultParallelism, len(records) // 1000)))
        sc.setJobDescription(f"decode {len(records)} images")
        decoded = (sc.parallelize(records, slices)
                   .mapPartitions(lambda part: decode_partition(part, size, max_pixels))
                   .persist(StorageLevel.MEMORY_AND_DISK))
        table = None
        try:
            meta = decoded.map(lambda r: {k: v for k, v in r.items() if k != "image"}).collect()
            good = [m for m in meta if m["error"] is None]
            rejected = [{"path": m["path"], "reason": m["error"]} for m in meta if m["error"] is not None]
            duplicates = group_duplicates({m["path"]: m["dhash"] for m in good},
                                          max_distance=int(cfg["duplicate_distance"]))
            split_of = split_images(good, cfg, duplicates)
            for m in good:
                m["split"] = split_of[m["path"]]
            split_bc = sc.broadcast(split_of)

            def to_row(r):
                return dict_to_spark_row(XraySchema, {
                    "image": r["image"], "label": CLASSES.index(r["label"]),
                    "label_name": r["label"], "patient_id": r["patient_id"] or "",
                    "source": r["source"] or "", "path": r["path"], "split": split_bc.value[r["path"]]})

            # Encode every good image once into a JVM-cached table; each split's write then
            # filters and shuffles it without another pass through Python.
            table = spark.createDataFrame(decoded.filter(lambda r: r["error"] is None).map(to_row),
                                          XraySchema.as_spark_schema()).persist(StorageLevel.MEMORY_AND_DISK)
            row_groups = {}
            for split in SPLITS:
                n_rows = sum(1 for m in good if m["split"] == split)
                if n_rows == 0:
                    logger.warning("split %s is empty: nothing written for it", split)
                    continue
                files = _num_files(n_rows, int(cfg["rows_per_row_group"]), int(cfg["min_row_groups"]))
                split_url = f"{tmp_url}/{split}"
                sc.setJobDescription(f"write {split} split ({n_rows} rows, {files} row groups)")
                # One file per row group: a large block size keeps each file a single group.
                with materialize_dataset(spark, split_url, XraySchema, row_group_size_mb=1024):
                    (table.filter(table["split"] == split)
                     .repartition(files).write.mode("error").parquet(split_url))
                row_groups[split] = files
        finally:
            if table is not None:
                table.unpersist()
            decoded.unpersist()
        summary = {
            "dataset": url,
            "input": input_location,
            "classes": list(CLASSES),
            "image_size": size,
            "inputs": inventory.inputs,
            "written": len(good),
            "rejected": rejected,
            "skipped": inventory.skipped,
            "duplicates": duplicates,
            "duplicate_label_conflicts": [g for g in duplicates
                                          if len({m["label"] for m in good if m["path"] in set(g)}) > 1],
            "per_class": _count(good, "label"),
            "per_split": {s: sum(1 for m in good if m["split"] == s) for s in SPLITS},
            "per_split_class": {s: _count([m for m in good if m["split"] == s], "label") for s in SPLITS},
            "per_source": _count(good, "source"),
            "patients_per_split": {s: len({m["patient_id"] or m["path"] for m in good if m["split"] == s})
                                   for s in SPLITS},
            "row_groups": row_groups,
            "config": cfg,
            "seconds": round(time.time() - started, 1),
        }
        if summary["inputs"] != summary["written"] + len(rejected) + len(inventory.skipped):
            raise RuntimeError("internal error: input counts do not reconcile")  # never expected
        HadoopFS(spark, tmp_url).write_text(f"{tmp_url}/_summary.json", json.dumps(summary, indent=2) + "\n")
    logger.info("preprocess: %d inputs = %d written + %d rejected + %d skipped; per split %s; "
                "%d duplicate group(s); %.1f s", summary["inputs"], summary["written"], len(rejected),
                len(inventory.skipped), summary["per_split"], len(duplicates), summary["seconds"])
    return summary


def read_summary(spark_or_none, dataset: str) -> dict:
    """Read ``<dataset>/_summary.json`` (local path or URL).

    Raises:
        FileNotFoundError: the dataset has no summary (not made by the preprocess job).
    """
    url = to_url(dataset).rstrip("/")
    if url.startswith("file://"):
        path = url[len("file://"):] + "/_summary.json"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: is {dataset} a dataset written by jobs/preprocess.py?")
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    fs = HadoopFS(spark_or_none, url)
    if not fs.exists(url + "/_summary.json"):
        raise FileNotFoundError(f"{url}/_summary.json not found: is {dataset} a dataset written by jobs/preprocess.py?")
    return json.loads(fs.read_text(url + "/_summary.json"))
