"""Preprocess stage, one increment: bring an existing dataset up to date with its grown inputs.

``jobs/preprocess.py --append`` on a dataset the preprocess stage wrote. Steps:

1. **Compare** the inputs with the dataset's file index (``data.fileindex``): a file not in it is
   new; a file whose manifest row (label, source, patient id, view) changed, or whose size or
   modification time changed *and* whose SHA-256 differs, is changed; a file whose stat changed
   but whose bytes did not is unchanged; an indexed file no longer listed is removed.
2. **Stage** only the new and changed files, with the preprocess stage's own first pass
   (``preprocess.stage_files``: decode, dHash, staged Parquet; on the executors, or in this process
   for a few hundred files).
3. **Split**: every row already in the dataset keeps its split; the duplicate groups are those a full
   run finds (the stored groups extended by the new hashes when no stored row goes, else every hash
   grouped again); a new image joins the split of its
   patient or duplicate group, else of the patient or path it replaces, else a keyed hash of its
   unit decides (``data.splits.extend_splits``): independent of arrival order and batch.
4. **Write a new version** beside the dataset (``<dataset>.tmp-<tag>``): unchanged Parquet files are
   hard-linked (copied on filesystems without links), files that lose rows are rewritten without
   them, new rows go to new files ``part-a<increment>-<n>.parquet``; Petastorm's metadata, the
   file index and ``_summary.json`` (with one more ``increments`` entry) are written for the whole.
5. **Swap** the new version into place (``storage.swap_directory``: one atomic rename on a local
   disk). A failed or killed increment leaves the dataset as it was (and perhaps a ``.tmp-`` sibling).

Same config as the dataset: the stored ``preprocess`` config is used, and a flag that contradicts
it is refused (changing it means a full preprocess).
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Sequence

from covid_spark.data.dataset import has_summary, read_summary, split_url, write_summary
from covid_spark.data.duplicates import extend_groups, group_duplicates
from covid_spark.data.fileindex import REJECTED, WRITTEN, fingerprint, read_index, stat_key, write_index
from covid_spark.data.splits import SPLITS, extend_splits
from covid_spark.data.storage import HadoopFS, link_or_copy, swap_directory, to_url
from covid_spark.errors import ConfigError, DatasetError
from covid_spark.inputs.sources import Record
from covid_spark.stages.preprocess import (
    STAGING, Staged, build_summary, count_values, distribute_rows, increment, index_row, preprocess, read_inventory,
    stage_files)

logger = logging.getLogger(__name__)

# Test hook: set to a step name ("stage", "write") and the process dies there (os._exit),
# as a killed job would, so a test can show that the dataset is left as it was.
FAIL_ENV = "COVID_SPARK_FAIL_APPEND"
# New and changed files up to this many are decoded in the driver process (no Spark job to schedule;
# not with a lung crop, whose segmentation model the executors' workers hold).
LOCAL_STAGE_FILES = 500
# New rows up to this many are distributed in the driver process (no second Spark job to start).
LOCAL_DISTRIBUTE_ROWS = 5000
# Keys that decide what a row holds or where it goes: an increment must use the dataset's own.
FIXED_KEYS = ("image_size", "max_pixels", "views", "duplicate_distance", "val_fraction", "test_fraction",
              "seed", "holdout_source", "skip_unknown_classes", "rows_per_row_group", "border_crop", "lung_crop",
              "lung_crop_margin")


@dataclass
class Changes:
    """The inputs compared with the file index."""
    to_read: list[Record] = field(default_factory=list)    # records of new and changed files
    changed: set[str] = field(default_factory=set)         # paths among them that the index holds
    kept: list[dict] = field(default_factory=list)         # index rows of unchanged files
    removed: list[dict] = field(default_factory=list)      # index rows of files no longer listed
    restated: int = 0                                      # stat changed, same bytes: kept


def _die_at(step: str) -> None:
    if os.environ.get(FAIL_ENV) == step:
        logger.error("%s=%s: dying here, as a killed job would", FAIL_ENV, step)
        os._exit(3)


def check_fixed_keys(stored: dict, given: dict) -> None:
    """Refuse a flag given for the increment that contradicts the dataset's stored config.

    Raises:
        ConfigError: naming the key, the dataset's value and the value given.
    """
    for key, value in given.items():
        if value is not None and key in FIXED_KEYS and stored.get(key) != value:
            raise ConfigError(f"preprocess.{key}: the dataset was written with {stored.get(key)!r}, "
                              f"--append was given {value!r}; an increment keeps the dataset's config "
                              "(run a full preprocess into a new dataset to change it)")


def _listing_changed(record: Record, row: dict) -> bool:
    return (record.label, record.source, record.patient_id, record.view) != (
        row["label"], row["source"], row["listed_patient_id"], row["listed_view"])


def compare(records: list[Record], index: dict[str, dict]) -> Changes:
    """Sort the listed records into new, changed and unchanged files, and find removed ones.

    Only files whose size or modification time changed are read (hashed, in a few threads);
    the rest are trusted from the index.
    """
    changes, suspects = Changes(), []
    for record in records:
        row = index.get(record.path)
        if row is None:
            changes.to_read.append(record)
        elif _listing_changed(record, row):
            changes.to_read.append(record)
            changes.changed.add(record.path)
        elif stat_key(record.path) == (row["size"], row["mtime_ns"]):
            row["input"] = record.input  # the index row read for this comparison: filled in, not copied
            changes.kept.append(row)
        else:
            suspects.append((record, row))
    with ThreadPoolExecutor(max_workers=4) as pool:
        prints = list(pool.map(lambda pair: fingerprint(pair[0].path), suspects))
    for (record, row), (size, mtime_ns, digest) in zip(suspects, prints):
        if digest and digest == row["digest"]:
            changes.kept.append(dict(row, input=record.input, size=size, mtime_ns=mtime_ns))
            changes.restated += 1
        else:
            changes.to_read.append(record)
            changes.changed.add(record.path)
    listed = {r.path for r in records}
    changes.removed = [row for path, row in index.items() if path not in listed]
    return changes


def staged_from_row(row: dict) -> Staged:
    """A kept written row as the preprocess stage's per-file result (no staged file: it stays where it is)."""
    return Staged(row["path"], row["label"], row["patient_id"], row["source"], row["input"], int(row["dhash"], 16),
                  None, None, -1, row["view"], False, row["size"], row["mtime_ns"], row["digest"],
                  row["listed_patient_id"], row["listed_view"])


def plan_splits(kept: list[Staged], known: list[str], new: list[Staged], cfg: dict, remembered: dict[str, str],
                stored_groups: list[list[str]] | None = None) -> tuple[list[list[str]], list[str], list[dict]]:
    """Duplicate groups over every row, and the split of each new row (``kept`` keep ``known``).

    ``stored_groups``, when given, are the duplicate groups of ``kept`` alone: only the new rows' hashes are
    then searched (``duplicates.extend_groups``), with the same result as grouping every row again.
    """
    good = kept + new
    if stored_groups is None:
        duplicates = group_duplicates({m.path: m.dhash for m in good}, max_distance=cfg["duplicate_distance"])
    else:
        duplicates = extend_groups(stored_groups, {m.path: m.dhash for m in kept}, {m.path: m.dhash for m in new},
                                   max_distance=cfg["duplicate_distance"])
    holdout = cfg["holdout_source"]
    splits, conflicts = extend_splits(
        [m.path for m in good], [m.patient_id for m in good], known + [""] * len(new), cfg["val_fraction"],
        0.0 if holdout else cfg["test_fraction"], cfg["seed"], linked=duplicates, remembered=remembered)
    if holdout:  # as preprocess.split_images: the held-out source, and copies of it, are test only
        held = {m.path for m in good if m.source == holdout}
        held |= {p for group in duplicates if held.intersection(group) for p in group}
        splits = [s if i < len(kept) or m.path not in held else "test" for i, (m, s) in enumerate(zip(good, splits))]
    return duplicates, splits[len(kept):], conflicts


def _split_files(url: str, split: str) -> list[str]:
    """The Parquet files of one split (names), as readers see them."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(split_url(url, split))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.is_file and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith(("_", ".")))


def carry_files(url: str, tmp_url: str, drop: set[str]) -> dict[str, dict[str, int]]:
    """Put the dataset's Parquet files into the new version: linked as they are, or rewritten without the
    rows of ``drop`` (paths) where they hold some. Returns row groups per file per split."""
    import pyarrow.compute as pc
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    carried: dict[str, dict[str, int]] = {}
    drop_array = None
    for split in SPLITS:
        for name in _split_files(url, split):
            src, dst = f"{split_url(url, split)}/{name}", f"{split_url(tmp_url, split)}/{name}"
            fs, src_path = pafs.FileSystem.from_uri(src)
            with fs.open_input_file(src_path) as handle:
                parquet = pq.ParquetFile(handle)
                groups = parquet.metadata.num_row_groups
                if drop and drop.intersection(parquet.read(columns=["path"]).column("path").to_pylist()):
                    import pyarrow as pa

                    drop_array = drop_array if drop_array is not None else pa.array(sorted(drop), pa.string())
                    _, dst_path = pafs.FileSystem.from_uri(dst)
                    fs.create_dir(os.path.dirname(dst_path), recursive=True)
                    groups = 0
                    with pq.ParquetWriter(dst_path, parquet.schema_arrow, filesystem=fs) as writer:
                        for g in range(parquet.metadata.num_row_groups):
                            table = parquet.read_row_group(g)
                            table = table.filter(pc.invert(pc.is_in(table.column("path"), value_set=drop_array)))
                            if len(table):
                                writer.write_table(table, row_group_size=len(table))
                                groups += 1
                    if not groups:
                        fs.delete_file(dst_path)
                        continue
                else:
                    link_or_copy(src, dst)
            carried.setdefault(split, {})[name] = groups
    return carried


@contextmanager
def _locked(url: str):
    """One increment at a time on a local dataset (an advisory lock the kernel drops with the process)."""
    path = url[len("file://"):] if url.startswith("file://") else None
    if path is None:
        yield
        return
    with open(f"{path}.append-lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"{path} is being appended to by another process", dataset=path) from None
        yield


def _read_changes(spark, url: str, tmp_url: str, locations: list[str], cfg: dict):
    """Steps 1 and 2: the inventory, its changes against the index, and the staged new and changed files."""
    index = read_index(url)
    records, skipped, per_input, views, pseudonyms = read_inventory(locations, cfg)
    changes = compare(records, index)
    local = len(changes.to_read) <= LOCAL_STAGE_FILES and not cfg["lung_crop"]
    staged = list(stage_files(spark.sparkContext, changes.to_read, cfg, f"{tmp_url}/{STAGING}", views, pseudonyms,
                              local=local)) if changes.to_read else []
    return index, changes, staged, skipped, per_input


def _split_step(old: dict, index: dict[str, dict], changes: Changes, staged: list[Staged], cfg: dict):
    """Step 3: the kept rows and their splits, the new rows, the paths whose rows go, the duplicate groups
    and the new rows' splits and conflicts. The stored groups are extended when no stored row goes."""
    kept = [staged_from_row(r) for r in changes.kept if r["status"] == WRITTEN]
    new = [m for m in staged if m.error is None]
    gone = [index[p] for p in changes.changed] + changes.removed
    remembered = {k: r["split"] for r in gone if r["status"] == WRITTEN for k in (r["patient_id"], r["path"]) if k}
    known = [r["split"] for r in changes.kept if r["status"] == WRITTEN]
    drop = {r["path"] for r in gone if r["status"] == WRITTEN}
    stored_groups = old.get("duplicates") if not drop and len(kept) == old["written"] else None
    duplicates, new_splits, conflicts = plan_splits(kept, known, new, cfg, remembered, stored_groups)
    return kept, known, new, drop, duplicates, new_splits, conflicts


def _summary_lists(changes: Changes, staged: list[Staged], skipped: list) -> tuple[list[dict], list[dict]]:
    """Rejected and skipped entries of the whole dataset: the kept index rows' and this increment's."""
    rejected = [{"path": r["path"], "reason": r["reason"], "input": r["input"], "source": r["source"]}
                for r in changes.kept if r["status"] == REJECTED]
    rejected += [{"path": m.path, "reason": m.error, "input": m.input, "source": m.source}
                 for m in staged if m.error is not None and not m.excluded]
    excluded = [{"path": r["path"], "reason": r["reason"], "input": r["input"], "excluded_by_view": True}
                for r in changes.kept if r["status"] not in (WRITTEN, REJECTED)]
    excluded += [{"path": m.path, "reason": m.error, "input": m.input, "excluded_by_view": True}
                 for m in staged if m.excluded]
    return sorted(rejected, key=lambda r: r["path"]), skipped + excluded


def _record(changes: Changes, new: list[Staged], new_splits: list[str], staged: list[Staged],
            conflicts: list[dict], rows_before: int, rows_after: int) -> dict:
    """This increment's entry in the summary's ``increments``."""
    added = [(m, s) for m, s in zip(new, new_splits) if m.path not in changes.changed]
    gone = [r for r in changes.removed if r["status"] == WRITTEN]
    return increment(
        "append", [m for m, _ in added], [s for _, s in added],
        [{"path": m.path, "source": m.source} for m in staged if m.error is not None and not m.excluded],
        replaced=sum(m.path in changes.changed for m in new), removed=len(changes.removed),
        unchanged=len(changes.kept), restated=changes.restated, rows_before=rows_before, rows_after=rows_after,
        removed_per_class=count_values(r["label"] for r in gone),
        removed_per_source=count_values(r["source"] for r in gone),
        removed_files=sorted(r["path"] for r in changes.removed), split_conflicts=conflicts)


def append(spark, dataset: str, config: dict, input_locations: str | Sequence[str] | None = None,
           given: dict | None = None) -> dict:
    """Add what changed in the inputs to ``dataset`` as one atomic increment; return the new summary.

    Args:
        input_locations: the inputs now (default: the dataset's own, from its summary).
        given: preprocess values passed as flags; one that contradicts the dataset's config is refused.

    A ``dataset`` that does not exist yet is created by a full :func:`preprocess` of ``input_locations``
    (so a scheduler runs one command every time).

    Raises:
        DatasetError: ``dataset`` is not a dataset of this package, has no file index, or does not exist
            and no inputs were given.
        ConfigError: a flag contradicts the dataset's config.
    """
    started = time.time()
    url = to_url(dataset).rstrip("/")
    if not has_summary(spark, url) and not HadoopFS(spark, url).exists(url):
        if not input_locations:
            raise DatasetError(f"there is no dataset at {dataset} yet: give its inputs to create it", dataset=dataset)
        logger.info("no dataset at %s yet: a full preprocess creates it", dataset)
        return preprocess(spark, input_locations, dataset, config)
    old = read_summary(spark, url)
    cfg = dict(config["preprocess"], **old["config"])
    check_fixed_keys(old["config"], given or {})
    locations = list(input_locations or old["input"])
    tmp_url = f"{url}.tmp-{uuid.uuid4().hex[:8]}"
    marks = [("start", time.time())]
    with _locked(url):
        try:
            index, changes, staged, skipped, per_input = _read_changes(spark, url, tmp_url, locations, cfg)
            _die_at("stage")
            marks.append(("compare_and_stage", time.time()))
            kept, known, new, drop, duplicates, new_splits, conflicts = _split_step(old, index, changes, staged, cfg)
            marks.append(("group_and_split", time.time()))
            carried = carry_files(url, tmp_url, drop)
            number = len(old.get("increments", []))
            row_groups = distribute_rows(spark, new, new_splits, dict(cfg, min_row_groups=1), tmp_url,
                                         f"{tmp_url}/{STAGING}", prefix=f"part-a{number:04d}", existing=carried,
                                         local=len(new) <= LOCAL_DISTRIBUTE_ROWS)
            HadoopFS(spark, tmp_url).delete(f"{tmp_url}/{STAGING}")
            marks.append(("write_files", time.time()))
            write_index(tmp_url, sorted(changes.kept + [index_row(m, s) for m, s in
                                        zip(staged, _splits_of(staged, new, new_splits))], key=itemgetter("path")))
            rejected, skipped = _summary_lists(changes, staged, skipped)
            good = kept + new
            summary = build_summary(url, locations, cfg, good, known + new_splits, rejected, skipped, per_input,
                               duplicates, row_groups)
            summary["seconds"] = round(time.time() - started, 1)
            summary["increments"] = old.get("increments", []) + [dict(
                _record(changes, new, new_splits, staged, conflicts, old["written"], len(good)),
                seconds=summary["seconds"], phase_seconds={name: round(t - marks[i][1], 2)
                                                           for i, (name, t) in enumerate(marks[1:])})]
            write_summary(tmp_url, summary)
            _die_at("write")
            swap_directory(spark, url, tmp_url)
        finally:
            fs = HadoopFS(spark, tmp_url)
            if fs.exists(tmp_url):
                fs.delete(tmp_url)
    last = summary["increments"][-1]
    logger.info("append: %d added, %d replaced, %d removed, %d rejected, %d unchanged; %d rows; %.1f s",
                last["added"], last["replaced"], last["removed"], last["rejected"], last["unchanged"],
                summary["written"], summary["seconds"])
    return summary


def _splits_of(staged: list[Staged], new: list[Staged], new_splits: list[str]) -> list[str]:
    of = {m.path: s for m, s in zip(new, new_splits)}
    return [of.get(m.path, "") for m in staged]
