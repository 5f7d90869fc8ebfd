"""Preprocess stage: image files → decoded 3-channel arrays → a Petastorm dataset per split.

Two passes, neither of which holds more than one Parquet row group of images in memory:

1. **Stage** (executors, ``mapPartitions``): each task reads and decodes its files, writes the good
   images straight to one staged Parquet file with pyarrow (no Python→JVM row conversion, no cache),
   and returns only small metadata per file: label, patient, source, perceptual hash, error.
2. The driver groups near-duplicates (banded hash search) and assigns patient-wise splits from that
   metadata alone.
3. **Distribute** (executors, one task per core): each task reads its share of the staged files row
   group by row group and moves every row into its split's dataset, without decoding again; the
   driver then writes Petastorm's metadata from the row-group counts the tasks return.

A grey image (three equal channels) is stored with one channel (see ``schema.py``).

Staged files are named per task attempt, and only the files of successful attempts (the ones whose
metadata reached the driver) are read, so a retried task neither loses nor repeats a row. Split files
are written to a temporary name and renamed, so a retried distribute task replaces its own output.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
import uuid
from collections import Counter
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.data.dataset import split_url, write_summary
from covid_spark.data.duplicates import HASH_SIZE, dhash, group_duplicates
from covid_spark.data.splits import SPLITS, assign_splits
from covid_spark.data.storage import HadoopFS, atomic_directory, to_url
from covid_spark.errors import ConfigError
from covid_spark.inputs.dicom import Pseudonyms, require_no_patient_ids
from covid_spark.inputs.images import read_image
from covid_spark.inputs.sources import count_per_input, discover, patient_key
from covid_spark.inputs.views import ViewFilter

logger = logging.getLogger(__name__)

# Test hook: when set to a file path that does not exist yet, the first Python worker to
# decode creates it and dies, so a test can show that Spark's task retry loses nothing.
FAIL_ONCE_ENV = "COVID_SPARK_FAIL_ONCE"

# Rows per row group in staged files: the unit a distribute task holds in memory (64 × 150 kB).
STAGE_ROWS_PER_GROUP = 64
STAGE_TASK_IMAGES = 5000  # images per first-pass task (rounded to a whole number of tasks per core)
STAGING = "_staging"  # inside the temporary output; ignored by Parquet readers, deleted at the end


class Staged(NamedTuple):
    """What the first pass returns to the driver for one input file (small: no pixels)."""
    path: str
    label: str
    patient_id: str
    source: str
    input: int            # index of the input location the file was listed in
    dhash: int | None     # 256-bit difference hash; None when rejected
    error: str | None     # why the file was rejected or excluded; None when its image was staged
    file: str | None      # staged file holding its row (set by stage_partition)
    row: int              # the row's index in that file; -1 when rejected
    view: str = ""        # PA, AP, LATERAL, ... ("" unknown): the manifest's, else the DICOM header's
    excluded: bool = False  # left out by the views filter (error says why): skipped, not rejected


def read_and_decode(path: str, size: int, max_pixels: int, views=None, listed_view: str = "",
                    pseudonyms=None) -> tuple:
    """Read one file (``images.read_image``) and hash its image: ``(ReadResult, dhash or None)``."""
    read = read_image(path, size, max_pixels, views=views, listed_view=listed_view, pseudonyms=pseudonyms)
    return read, (None if read.image is None else dhash(read.image, hash_size=HASH_SIZE))


def stored_image(image: np.ndarray) -> np.ndarray:
    """The array stored for a decoded RGB image: one channel when all three are equal (grey)."""
    grey = image[:, :, :1]
    if np.array_equal(image[:, :, 1:2], grey) and np.array_equal(image[:, :, 2:3], grey):
        return np.ascontiguousarray(grey)
    return image


def arrow_schema(with_split: bool = True):
    """The pyarrow schema of the stored rows: ``XraySchema``'s columns as Spark would write them."""
    import pyarrow as pa

    fields = [pa.field("image", pa.binary(), nullable=False), pa.field("label", pa.int32(), nullable=False)]
    fields += [pa.field(name, pa.string(), nullable=False)
               for name in ("label_name", "patient_id", "source", "path", "dhash", "view")]
    if with_split:
        fields.append(pa.field("split", pa.string(), nullable=False))
    return pa.schema(fields)


def _open_writer(url: str, schema):
    """A pyarrow ParquetWriter on any filesystem pyarrow resolves (file://, hdfs:// with libhdfs, s3://)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = pafs.FileSystem.from_uri(url)
    fs.create_dir(os.path.dirname(path), recursive=True)
    # Raw pixels barely compress; the small columns are snappy-compressed as Spark does.
    compression = {name: "NONE" if name == "image" else "SNAPPY" for name in schema.names}
    return pq.ParquetWriter(path, schema, filesystem=fs, compression=compression, use_dictionary=False,
                            write_statistics=False)


def stage_images(records: Iterable[dict], size: int, max_pixels: int, url: str,
                 rows_per_group: int = STAGE_ROWS_PER_GROUP, views=None, pseudonyms=None) -> Iterator[Staged]:
    """Decode each record's file; write good images as rows of one Parquet file at ``url``.

    Yields one :class:`Staged` per record, in order (``file`` None: the caller knows ``url``).
    The file is closed before the last one is yielded, and only created when some image is good.
    ``views`` (a ``views.ViewFilter``) leaves files out; ``pseudonyms`` (``dicom.Pseudonyms``) turns
    DICOM PatientIDs into the patient id of a record that has none from its manifest.
    """
    import pyarrow as pa

    from covid_spark.data.schema import XraySchema  # imports Petastorm: only when this runs

    image_field = XraySchema.fields["image"]
    schema = arrow_schema(with_split=False)
    columns: dict[str, list] = {name: [] for name in schema.names}
    pending: list[Staged] = []
    writer, rows = None, 0

    def flush():
        nonlocal writer
        if columns["image"]:
            if writer is None:
                writer = _open_writer(url, schema)
            writer.write_table(pa.table(columns, schema=schema))
            for values in columns.values():
                values.clear()

    try:
        for record in records:
            read, digest = read_and_decode(record["path"], size, max_pixels, views, record.get("view", ""),
                                           pseudonyms)
            source = record["source"] or ""
            patient = record["patient_id"] or (patient_key(source, read.patient_id) if read.patient_id else "")
            row = -1
            if read.image is not None:
                row, rows = rows, rows + 1
                columns["image"].append(bytes(image_field.codec.encode(image_field, stored_image(read.image))))
                columns["label"].append(CLASSES.index(record["label"]))
                columns["label_name"].append(record["label"])
                columns["patient_id"].append(patient)
                columns["source"].append(source)
                columns["path"].append(record["path"])
                columns["dhash"].append(format(digest, f"0{HASH_SIZE * HASH_SIZE // 4}x"))
                columns["view"].append(read.view)
            pending.append(Staged(record["path"], record["label"], patient, source, record.get("input", 0),
                                  digest, read.error or read.excluded, None, row, read.view, bool(read.excluded)))
            if len(columns["image"]) >= rows_per_group:
                flush()
                yield from pending
                pending.clear()
        flush()
    finally:
        if writer is not None:
            writer.close()
    yield from pending


def stage_partition(index: int, records: Iterable[dict], size: int, max_pixels: int,
                    staging_url: str, views=None, pseudonyms=None) -> Iterator[Staged]:
    """mapPartitionsWithIndex body: one staged file per task attempt, named so attempts never collide."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    name = f"stage-{index:05d}-{uuid.uuid4().hex[:12]}.parquet"
    for staged in stage_images(records, size, max_pixels, f"{staging_url}/{name}", views=views,
                               pseudonyms=pseudonyms):
        yield staged._replace(file=name) if staged.row >= 0 else staged


def distribute_files(staged: Sequence[tuple[str, Sequence[str]]], split_urls: dict[str, str],
                     group_rows: dict[str, int], name: str, tmp_url: str) -> list[tuple[str, str, int]]:
    """Move the rows of some staged files into their splits' datasets, without decoding.

    ``staged`` lists ``(staged_url, splits)`` with ``splits[i]`` row i's split. Each split gets
    one file ``name`` with row groups of ``group_rows[split]`` rows, written under ``tmp_url``
    and renamed into place (so a retried task replaces its own output). Memory: one staged row
    group and less than one output row group per split. Returns ``(split, name, row_groups)``
    per file written.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    schema = arrow_schema(with_split=True)
    wanted = sorted({split for _, splits in staged for split in splits})
    writers, buffers, groups, temps = {}, {s: [] for s in wanted}, Counter(), {}

    def write(split, final=False):
        buffer = buffers[split]
        while buffer and (final or sum(len(t) for t in buffer) >= group_rows[split]):
            table = pa.concat_tables(buffer)
            size = min(len(table), group_rows[split])
            if split not in writers:
                temps[split] = f"{tmp_url}/{split}-{name}.tmp-{uuid.uuid4().hex[:8]}"
                writers[split] = _open_writer(temps[split], schema)
            writers[split].write_table(table.slice(0, size), row_group_size=size)
            groups[split] += 1
            buffers[split] = buffer = [table.slice(size)] if size < len(table) else []

    try:
        for staged_url, splits in staged:
            fs, staged_path = pafs.FileSystem.from_uri(staged_url)
            split_array = pa.array(list(splits), pa.string())
            with fs.open_input_file(staged_path) as handle:
                parquet = pq.ParquetFile(handle)
                start = 0
                for g in range(parquet.num_row_groups):
                    table = parquet.read_row_group(g)
                    part = split_array.slice(start, len(table))
                    start += len(table)
                    table = table.append_column(schema.field("split"), part)
                    for split in wanted:
                        rows = table.filter(pc.equal(part, split))
                        if len(rows):
                            buffers[split].append(rows)
                            write(split)
            if start != len(splits):
                raise RuntimeError(f"{staged_url} holds {start} rows, expected {len(splits)}")
        for split in wanted:
            write(split, final=True)
    finally:
        for writer in writers.values():
            writer.close()
    out_fs, _ = pafs.FileSystem.from_uri(tmp_url)
    for split in wanted:
        _, src = pafs.FileSystem.from_uri(temps[split])
        _, dst = pafs.FileSystem.from_uri(f"{split_urls[split]}/{name}")
        out_fs.create_dir(os.path.dirname(dst), recursive=True)
        out_fs.move(src, dst)
    return [(split, name, groups[split]) for split in wanted]


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
    rest = [i for i, m in enumerate(good) if m.source != holdout] if holdout else range(len(good))
    if holdout and len(rest) == len(good):
        known = sorted({m.source for m in good})
        raise ConfigError(f"preprocess.holdout_source {holdout!r} matches no image; sources: {known}")
    test_fraction = 0.0 if holdout else cfg["test_fraction"]
    splits = ["test"] * len(good)
    assigned = assign_splits([good[i].path for i in rest], [good[i].label for i in rest],
                             [good[i].patient_id for i in rest], cfg["val_fraction"], test_fraction,
                             cfg["seed"], linked=duplicates)
    for i, split in zip(rest, assigned):
        splits[i] = split
    if holdout:
        index = {m.path: i for i, m in enumerate(good)}
        for group in duplicates:  # a copy of a held-out image must not be trained on
            if any(good[index[p]].source == holdout for p in group):
                for p in group:
                    splits[index[p]] = "test"
    return splits


def _count(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def _count_within(pairs: Iterable[tuple]) -> dict:
    """``{group: {value: count}}`` of (group, value) pairs, both levels sorted; one pass."""
    nested: dict = {}
    for group, value in pairs:
        nested.setdefault(group, Counter())[value] += 1
    return {group: dict(sorted(counts.items())) for group, counts in sorted(nested.items())}


def _num_row_groups(rows: int, rows_per_group: int, min_groups: int) -> int:
    """Row groups wanted for a split: groups of ``rows_per_group``, but at least ``min_groups``."""
    return max(1, min(rows, max(min_groups, math.ceil(rows / rows_per_group))))


def _absolute(location: str) -> str:
    """A local input as an absolute path (``file://`` dropped); other URLs as given."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    return location if "://" in location else os.path.abspath(location)


def preprocess(spark, input_locations: str | Sequence[str], output: str, config: dict,
               overwrite: bool = False) -> dict:
    """Run the whole stage and return the summary it writes into ``output`` (``dataset.write_summary``).

    Args:
        input_locations: one input (manifest CSV, folder with ``manifest.csv``, folder per class)
            or a list of them, read as one collection (duplicates are found across them).

    Raises:
        FileNotFoundError / ValueError: bad input location, manifest or class names
            (before anything is written).
        FileExistsError: ``output`` exists and ``overwrite`` is false.
    """
    started = time.time()
    locations = [input_locations] if isinstance(input_locations, str) else list(input_locations)
    cfg = config["preprocess"]
    size, max_pixels, seed = cfg["image_size"], cfg["max_pixels"], cfg["seed"]
    url = to_url(output)
    sc = spark.sparkContext
    with atomic_directory(spark, url, overwrite) as tmp_url:  # refuses an existing output first
        inventory = discover(locations, skip_unknown=cfg["skip_unknown_classes"])
        views = ViewFilter.parse(cfg["views"])
        pseudonyms = Pseudonyms.from_env()
        if pseudonyms.salt is None:
            require_no_patient_ids(r["path"] for r in inventory.records)
        found, skipped, per_input = len(inventory.records), inventory.skipped, inventory.per_input
        # Shuffled (seeded) so every staged file, and so every row group, mixes classes and sources.
        order = np.random.default_rng(seed).permutation(found)
        records = [inventory.records[i] for i in order]
        del inventory, order  # the driver keeps only the small per-file results from here on
        staging = f"{tmp_url}/{STAGING}"
        # Few, large tasks, a whole number per core: every Python task pays a fixed start cost (on
        # Python 3.11 PySpark's importlib.invalidate_caches() re-reads pyspark.zip, ~60-80 ms), and
        # an odd last task would run alone. Memory does not grow with a task's size (streamed).
        cores = max(1, sc.defaultParallelism)
        slices = max(1, min(found, cores * math.ceil(found / (STAGE_TASK_IMAGES * cores))))
        phases = {"discover": time.time() - started}
        sc.setJobDescription(f"decode and stage {found} images")
        rdd = sc.parallelize(records, slices)
        del records
        staged = (rdd.mapPartitionsWithIndex(
            lambda i, part: stage_partition(i, part, size, max_pixels, staging, views, pseudonyms)).collect())
        del rdd
        phases["stage"] = time.time() - started - sum(phases.values())
        staged.sort()  # by path (the first field)
        good = [m for m in staged if m.error is None]
        rejected = [{"path": m.path, "reason": m.error, "input": m.input} for m in staged
                    if m.error is not None and not m.excluded]
        excluded = [{"path": m.path, "reason": m.error, "input": m.input} for m in staged if m.excluded]
        del staged
        duplicates = group_duplicates({m.path: m.dhash for m in good}, max_distance=cfg["duplicate_distance"])
        splits = split_images(good, cfg, duplicates)

        per_split = Counter(splits)
        group_rows = {}
        for split in SPLITS:
            if per_split[split] == 0:
                logger.warning("split %s is empty: nothing written for it", split)
                continue
            groups = _num_row_groups(per_split[split], cfg["rows_per_row_group"], cfg["min_row_groups"])
            group_rows[split] = max(1, per_split[split] // groups)  # so that there are at least `groups`
        rows_of: dict[str, list[tuple[int, str]]] = {}
        for m, split in zip(good, splits):
            rows_of.setdefault(m.file, []).append((m.row, split))
        # One distribute task per core (each a few staged files): the pass moves bytes, and every
        # task costs a fixed start; one output file per split per task.
        tasks = [([], f"part-{number:05d}.parquet") for number in range(min(cores, len(rows_of)))]
        for number, name in enumerate(sorted(rows_of)):
            rows = sorted(rows_of.pop(name))
            if [r for r, _ in rows] != list(range(len(rows))):
                raise RuntimeError(f"internal error: staged file {name} rows are not 0..{len(rows) - 1}")
            tasks[number % len(tasks)][0].append((f"{staging}/{name}", [s for _, s in rows]))
        split_urls = {s: split_url(tmp_url, s) for s in SPLITS}
        phases["group_and_split"] = time.time() - started - sum(phases.values())
        sc.setJobDescription(f"distribute {len(good)} rows into {len(group_rows)} splits")
        written = (sc.parallelize(tasks, max(1, len(tasks)))
                   .flatMap(lambda t: distribute_files(t[0], split_urls, group_rows, t[1], staging))
                   .collect()) if tasks else []
        del tasks
        phases["distribute"] = time.time() - started - sum(phases.values())
        row_groups = {}
        for split in SPLITS:
            files = {name: n for s, name, n in written if s == split}
            if files:
                write_petastorm_metadata(spark, split_urls[split], files)
                row_groups[split] = sum(files.values())
        HadoopFS(spark, tmp_url).delete(staging)
        phases["metadata"] = time.time() - started - sum(phases.values())

        label_of = {m.path: m.label for m in good}
        summary = {
            "dataset": url,
            "input": [_absolute(loc) for loc in locations],
            "classes": list(CLASSES),
            "image_size": size,
            "inputs": found + len(skipped),
            "written": len(good),
            "rejected": [{"path": r["path"], "reason": r["reason"]} for r in rejected],
            "skipped": skipped + excluded,
            "per_input": count_per_input(per_input, written=({"input": m.input} for m in good), rejected=rejected,
                                         excluded_by_view=excluded),
            "duplicates": duplicates,
            "duplicate_label_conflicts": [g for g in duplicates if len({label_of[p] for p in g}) > 1],
            "per_class": _count(m.label for m in good),
            "per_split": {s: per_split[s] for s in SPLITS},
            "per_split_class": {s: _count(m.label for m, t in zip(good, splits) if t == s) for s in SPLITS},
            "per_source": _count(m.source for m in good),
            "per_view": _count(m.view or "unknown" for m in good),
            "per_source_class": _count_within((m.source, m.label) for m in good),
            "per_input_source": [_count_within((m.input, m.source) for m in good).get(i, {})
                                 for i in range(len(locations))],
            "patient_ids_per_source": {src: by_id.get("yes", 0) for src, by_id in
                                       _count_within((m.source, "yes" if m.patient_id else "no") for m in good).items()},
            "patients_per_split": {s: len({m.patient_id or m.path for m, t in zip(good, splits) if t == s})
                                   for s in SPLITS},
            "row_groups": row_groups,
            "config": cfg,
            "seconds": round(time.time() - started, 1),
            "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        }
        if summary["inputs"] != summary["written"] + len(rejected) + len(summary["skipped"]):
            raise RuntimeError("internal error: input counts do not reconcile")  # never expected
        write_summary(tmp_url, summary)
    logger.info("preprocess: %d inputs = %d written + %d rejected + %d skipped; per split %s; "
                "%d duplicate group(s); %.1f s", summary["inputs"], summary["written"], len(rejected),
                len(summary["skipped"]), summary["per_split"], len(duplicates), summary["seconds"])
    return summary
