"""Preprocess stage, on the driver: image files → decoded 3-channel arrays → a Petastorm dataset per split.

Two passes, neither of which holds more than one Parquet row group of images in memory:

1. **Stage** (executors, ``mapPartitions``): each task reads and decodes its files, writes the good
   images straight to one staged Parquet file with pyarrow (no Python→JVM row conversion, no cache),
   and returns only small metadata per file: label, patient, source, perceptual hash, error.
2. The driver groups near-duplicates (banded hash search) and assigns patient-wise splits from that
   metadata alone.
3. **Distribute** (executors, one task per core): each task reads its share of the staged files row
   group by row group and moves every row into its split's dataset, without decoding again; the
   driver then writes Petastorm's metadata from the row-group counts the tasks return.

A grey image (three equal channels) is stored with one channel (see ``schema.py``). What runs on
the executors is in ``covid_spark.stages.preprocess_tasks``.

Staged files are named per task attempt, and only the files of successful attempts (the ones whose
metadata reached the driver) are read, so a retried task neither loses nor repeats a row. Split files
are written to a temporary name and renamed, so a retried distribute task replaces its own output.
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import pickle
import time
import uuid
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.data.dataset import split_url, write_summary
from covid_spark.data.duplicates import HASH_SIZE, group_duplicates
from covid_spark.data.fileindex import EXCLUDED, REJECTED, WRITTEN, write_index
from covid_spark.data.splits import SPLITS, assign_splits
from covid_spark.data.storage import HadoopFS, atomic_directory, to_url
from covid_spark.errors import ConfigError
from covid_spark.inputs.dicom import Pseudonyms, require_no_patient_ids
from covid_spark.inputs.sources import Record, count_per_input, discover
from covid_spark.inputs.views import ViewFilter
from covid_spark.lungs.framing import Framing
from covid_spark.stages.preprocess_tasks import (
    Staged, StagedFiles, distribute_files, stage_images, stage_partition)

logger = logging.getLogger(__name__)

STAGE_TASK_IMAGES = 5000  # images per first-pass task (rounded to a whole number of tasks per core)
STAGING = "_staging"  # inside the temporary output; ignored by Parquet readers, deleted at the end


def write_petastorm_metadata(spark, split_url: str, row_groups_per_file: dict[str, int]) -> None:
    """Petastorm's dataset metadata (the pickled Unischema and the row groups per file) for one split.

    The same two entries ``materialize_dataset`` writes, but from counts the writers returned,
    instead of a Spark job that opens every file's footer again (one task per file).
    """
    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY, load_row_groups
    from petastorm.fs_utils import FilesystemResolver
    from petastorm.utils import add_to_dataset_metadata

    from covid_spark.data.schema import XraySchema  # imports Petastorm: only when this runs

    resolver = FilesystemResolver(split_url, spark.sparkContext._jsc.hadoopConfiguration(),
                                  user=spark.sparkContext.sparkUser())
    fs, path = resolver.filesystem(), resolver.get_dataset_path()
    dataset = pq.ParquetDataset(path, filesystem=fs, validate_schema=False)
    add_to_dataset_metadata(dataset, UNISCHEMA_KEY, pickle.dumps(XraySchema))
    add_to_dataset_metadata(dataset, ROW_GROUPS_PER_FILE_KEY, json.dumps(row_groups_per_file))
    load_row_groups(pq.ParquetDataset(path, filesystem=fs, validate_schema=False))  # raises if unreadable


def split_images(good: Sequence[Staged], cfg: dict, duplicates: list[list[str]]) -> list[str]:
    """Split name per image of ``good`` (in its order): patient-wise and stratified, or leave-one-source-out.

    With ``holdout_source`` set, every image of that source goes to test and the others are
    split into train and val only (a shortcut check: does the model work on a source it never
    saw?). Duplicate groups that straddle the held-out source are dropped from train/val.
    """
    holdout = cfg["holdout_source"]
    paths, labels, patients, sources = ([] for _ in range(4))
    for m in good:  # one pass (good may make its tuples as it is read: StagedFiles)
        paths.append(m.path)
        labels.append(m.label)
        patients.append(m.patient_id)
        sources.append(m.source)
    rest = [i for i, source in enumerate(sources) if source != holdout] if holdout else range(len(paths))
    if holdout and len(rest) == len(paths):
        raise ConfigError(f"preprocess.holdout_source {holdout!r} matches no image; sources: {sorted(set(sources))}")
    test_fraction = 0.0 if holdout else cfg["test_fraction"]
    splits = ["test"] * len(paths)
    assigned = assign_splits([paths[i] for i in rest], [labels[i] for i in rest], [patients[i] for i in rest],
                             cfg["val_fraction"], test_fraction, cfg["seed"], linked=duplicates)
    for i, split in zip(rest, assigned):
        splits[i] = split
    if holdout:
        index = {p: i for i, p in enumerate(paths)}
        for group in duplicates:  # a copy of a held-out image must not be trained on
            if any(sources[index[p]] == holdout for p in group):
                for p in group:
                    splits[index[p]] = "test"
    return splits


def count_values(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def _count_within(pairs: Iterable[tuple]) -> dict:
    """``{group: {value: count}}`` of (group, value) pairs, both levels sorted; one pass."""
    nested: dict = {}
    for (group, value), count in Counter(pairs).items():
        nested.setdefault(group, {})[value] = count
    return {group: dict(sorted(counts.items())) for group, counts in sorted(nested.items())}


def _num_row_groups(rows: int, rows_per_group: int, min_groups: int) -> int:
    """Row groups wanted for a split: groups of ``rows_per_group``, but at least ``min_groups``."""
    return max(1, min(rows, max(min_groups, math.ceil(rows / rows_per_group))))


def _absolute(location: str) -> str:
    """A local input as an absolute path (``file://`` dropped); other URLs as given."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    return location if "://" in location else os.path.abspath(location)


def read_inventory(locations: list[str], cfg: dict) -> tuple[list[Record], list, list, ViewFilter, Pseudonyms]:
    """The input files to read, in a seeded shuffle (so every staged file, and every row group, mixes
    classes and sources), with what was skipped by name and the per-input counts."""
    inventory = discover(locations, skip_unknown=cfg["skip_unknown_classes"])
    views = ViewFilter.parse(cfg["views"])
    pseudonyms = Pseudonyms.from_env()
    if pseudonyms.salt is None:
        require_no_patient_ids(r.path for r in inventory.records)
    order = np.random.default_rng(cfg["seed"]).permutation(len(inventory.records))
    return [inventory.records[i] for i in order], inventory.skipped, inventory.per_input, views, pseudonyms


def stage_files(sc, records: list[Record], cfg: dict, staging: str, views, pseudonyms,
                release: bool = False, local: bool = False) -> StagedFiles:
    """First pass on the executors; the per-file results in path order. With ``release``, empties
    ``records`` once Spark holds them; ``local`` runs the pass in this process instead, into one staged
    file (a small increment: no Spark job to schedule, no records to serialise).

    Few, large tasks, a whole number per core: every Python task pays a fixed start cost (on Python
    3.11 PySpark's importlib.invalidate_caches() re-reads pyspark.zip, ~60-80 ms), and an odd last
    task would run alone. Memory does not grow with a task's size (streamed). Each task returns its
    results as one :class:`StagedFiles` (columns, not a tuple per file), and on the driver (``release``)
    the input records are dropped once ``parallelize`` has copied them to the JVM, before the results arrive.
    """
    size, max_pixels, found = cfg["image_size"], cfg["max_pixels"], len(records)
    framing = Framing(cfg["border_crop"], cfg["lung_crop"], cfg["lung_crop_margin"])
    if local:
        name = f"stage-local-{uuid.uuid4().hex[:12]}.parquet"
        return StagedFiles.of(sorted(m._replace(file=name) if m.row >= 0 else m for m in stage_images(
            records, size, max_pixels, f"{staging}/{name}", views=views, pseudonyms=pseudonyms, framing=framing)))
    cores = max(1, sc.defaultParallelism)
    slices = max(1, min(found, cores * math.ceil(found / (STAGE_TASK_IMAGES * cores))))
    sc.setJobDescription(f"decode and stage {found} images")
    rdd = sc.parallelize(records, slices)  # serialises the records to the JVM now
    if release:
        records.clear()
    staged = StagedFiles.concat(rdd.mapPartitionsWithIndex(lambda i, part: [StagedFiles.of(
        stage_partition(i, part, size, max_pixels, staging, views, pseudonyms, framing))]).collect())
    if len(staged) != found:
        raise RuntimeError(f"internal error: {len(staged)} results for {found} input files")
    return staged.sorted_by_path()


def _row_group_sizes(per_split: Counter, cfg: dict, quiet: bool = False) -> dict[str, int]:
    """Rows per row group of each non-empty split, so that each has at least ``min_row_groups``."""
    group_rows = {}
    for split in SPLITS:
        if per_split[split] == 0:
            if not quiet:
                logger.warning("split %s is empty: nothing written for it", split)
            continue
        groups = _num_row_groups(per_split[split], cfg["rows_per_row_group"], cfg["min_row_groups"])
        group_rows[split] = max(1, per_split[split] // groups)
    return group_rows


def distribute_rows(spark, good: Sequence[Staged], splits: list[str], cfg: dict, tmp_url: str,
                staging: str, prefix: str = "part", existing: dict[str, dict[str, int]] | None = None,
                local: bool = False) -> dict[str, int]:
    """Second pass on the executors, then Petastorm's metadata per split; returns row groups per split.

    One distribute task per core (each a few staged files): the pass moves bytes, and every task costs
    a fixed start; one output file per split per task, named ``<prefix>-<n>.parquet``. ``existing``
    (an increment's files already in place: ``{split: {file: row groups}}``) joins the metadata;
    ``local`` runs the tasks in this process instead (a small increment: no Spark job to start).
    """
    sc = spark.sparkContext
    group_rows = _row_group_sizes(Counter(splits), cfg, quiet=existing is not None)
    rows_of: dict[str, tuple[list[int], list[str]]] = {}  # staged file: its rows and their splits
    for m, split in zip(good, splits):
        rows, names = rows_of.setdefault(m.file, ([], []))
        rows.append(m.row)
        names.append(split)
    tasks = [([], f"{prefix}-{number:05d}.parquet")
             for number in range(min(1 if local else max(1, sc.defaultParallelism), len(rows_of)))]
    for number, name in enumerate(sorted(rows_of)):
        rows, names = rows_of.pop(name)
        order = sorted(range(len(rows)), key=rows.__getitem__)
        if [rows[i] for i in order] != list(range(len(rows))):
            raise RuntimeError(f"internal error: staged file {name} rows are not 0..{len(rows) - 1}")
        tasks[number % len(tasks)][0].append((f"{staging}/{name}", [names[i] for i in order]))
    split_urls = {s: split_url(tmp_url, s) for s in SPLITS}
    sc.setJobDescription(f"distribute {len(good)} rows into {len(group_rows)} splits")
    if local:
        written = [w for t in tasks for w in distribute_files(t[0], split_urls, group_rows, t[1], staging)]
    else:
        written = (sc.parallelize(tasks, max(1, len(tasks)))
                   .flatMap(lambda t: distribute_files(t[0], split_urls, group_rows, t[1], staging))
                   .collect()) if tasks else []
    row_groups = {}
    for split in SPLITS:
        files = dict((existing or {}).get(split, {}))
        files.update({name: n for s, name, n in written if s == split})
        if files:
            write_petastorm_metadata(spark, split_urls[split], files)
            row_groups[split] = sum(files.values())
    return row_groups


def index_row(m: Staged, split: str = "") -> dict:
    """The file-index row (``data.fileindex``) of one staged file."""
    status = WRITTEN if m.error is None else EXCLUDED if m.excluded else REJECTED
    return {"path": m.path, "status": status, "reason": m.error or "", "label": m.label, "source": m.source,
            "listed_patient_id": m.listed_patient_id, "listed_view": m.listed_view, "patient_id": m.patient_id,
            "view": m.view, "dhash": "" if m.dhash is None else format(m.dhash, f"0{HASH_SIZE * HASH_SIZE // 4}x"),
            "split": split, "size": m.size, "mtime_ns": m.mtime_ns, "digest": m.digest}


def increment(kind: str, added: Sequence[Staged], splits: Sequence[str], rejected: Sequence[dict],
              **counts) -> dict:
    """One entry of the summary's ``increments``: when, what kind, what was added (per class, source
    and split) and rejected, and the other ``counts`` given (replaced, removed, unchanged, ...)."""
    return {"kind": kind, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "added": len(added), **counts, "rejected": len(rejected),
            "added_per_class": count_values(m.label for m in added),
            "added_per_source": count_values(m.source for m in added), "added_per_split": count_values(splits),
            "rejected_per_source": count_values(r.get("source", "") for r in rejected)}


def build_summary(url: str, locations: list[str], cfg: dict, good: Sequence[Staged], splits: list[str],
             rejected: list[dict], skipped: list, per_input, duplicates: list[list[str]],
             row_groups: dict[str, int]) -> dict:
    """The dataset's ``_summary.json``: what was read, written, rejected and skipped, and the counts."""
    grouped = {p for group in duplicates for p in group}
    label_of = {m.path: m.label for m in good if m.path in grouped}
    per_split = Counter(splits)
    excluded = [s for s in skipped if s.get("excluded_by_view")]
    return {
        "dataset": url,
        "input": [_absolute(loc) for loc in locations],
        "classes": list(CLASSES),
        "image_size": cfg["image_size"],
        "inputs": len(good) + len(rejected) + len(skipped),
        "written": len(good),
        "rejected": [{"path": r["path"], "reason": r["reason"]} for r in rejected],
        "skipped": [{k: v for k, v in s.items() if k != "excluded_by_view"} for s in skipped],
        "per_input": count_per_input(per_input, written=({"input": m.input} for m in good), rejected=rejected,
                                     excluded_by_view=excluded),
        "duplicates": duplicates,
        "duplicate_label_conflicts": [g for g in duplicates if len({label_of[p] for p in g}) > 1],
        "per_class": count_values(m.label for m in good),
        "per_split": {s: per_split[s] for s in SPLITS},
        "per_split_class": {s: count_values(m.label for m, t in zip(good, splits) if t == s) for s in SPLITS},
        "per_source": count_values(m.source for m in good),
        "per_view": count_values(m.view or "unknown" for m in good),
        "per_source_class": _count_within((m.source, m.label) for m in good),
        "per_input_source": [_count_within((m.input, m.source) for m in good).get(i, {})
                             for i in range(len(locations))],
        "patient_ids_per_source": {src: by_id.get("yes", 0) for src, by_id in
                                   _count_within((m.source, "yes" if m.patient_id else "no") for m in good).items()},
        "patients_per_split": {s: len({m.patient_id or m.path for m, t in zip(good, splits) if t == s})
                               for s in SPLITS},
        "row_groups": row_groups,
        "config": cfg,
    }


def return_freed_memory() -> None:
    """Hand the driver's freed heap pages back to the system (glibc's ``malloc_trim``), so that what one step
    built and dropped (the listed records, the grouping's temporaries) does not stay in the resident size under
    the next step's peak. Does nothing where the C library has no ``malloc_trim`` (macOS, musl)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def preprocess(spark, input_locations: str | Sequence[str], output: str, config: dict,
               overwrite: bool = False) -> dict:
    """Run the whole stage and return the summary it writes into ``output`` (``dataset.write_summary``).

    Args:
        input_locations: one input (manifest CSV, folder with ``manifest.csv``, folder per class)
            or a list of them, read as one collection (duplicates are found across them).

    Raises:
        FileNotFoundError / InputError / ConfigError: bad input location, manifest, class names or
            config (before anything is written).
        FileExistsError: ``output`` exists and ``overwrite`` is false.
    """
    started = time.time()
    locations = [input_locations] if isinstance(input_locations, str) else list(input_locations)
    cfg = config["preprocess"]
    url = to_url(output)
    phases = {}

    def phase(name: str) -> None:
        phases[name] = time.time() - started - sum(phases.values())
        return_freed_memory()

    with atomic_directory(spark, url, overwrite) as tmp_url:  # refuses an existing output first
        records, skipped, per_input, views, pseudonyms = read_inventory(locations, cfg)
        phase("discover")
        staging = f"{tmp_url}/{STAGING}"
        staged = stage_files(spark.sparkContext, records, cfg, staging, views, pseudonyms, release=True)
        del records  # the driver keeps only the small per-file results from here on
        phase("stage")
        written = [error is None for error in staged.column("error")]
        good = staged.where(written)
        failed = staged.where([not w for w in written])
        rejected = [{"path": m.path, "reason": m.error, "input": m.input, "source": m.source} for m in failed
                    if not m.excluded]
        skipped = skipped + [{"path": m.path, "reason": m.error, "input": m.input, "excluded_by_view": True}
                             for m in failed if m.excluded]
        duplicates = group_duplicates((good.column("path"), good.hashes()), max_distance=cfg["duplicate_distance"])
        splits = split_images(good, cfg, duplicates)
        phase("group_and_split")
        row_groups = distribute_rows(spark, good, splits, cfg, tmp_url, staging)
        HadoopFS(spark, tmp_url).delete(staging)
        split_of = iter(splits)  # good's rows are staged's written rows, in the same (path) order
        write_index(tmp_url, (index_row(m, next(split_of) if w else "") for m, w in zip(staged, written)))
        phase("distribute")
        summary = build_summary(url, locations, cfg, good, splits, rejected, skipped, per_input, duplicates, row_groups)
        summary["increments"] = [increment("full", good, splits, rejected)]
        summary["seconds"] = round(time.time() - started, 1)
        summary["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
        write_summary(tmp_url, summary)
    logger.info("preprocess: %d inputs = %d written + %d rejected + %d skipped; per split %s; "
                "%d duplicate group(s); %.1f s", summary["inputs"], summary["written"], len(rejected),
                len(summary["skipped"]), summary["per_split"], len(duplicates), summary["seconds"])
    return summary
