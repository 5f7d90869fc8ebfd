"""The dataset contract: what jobs/preprocess.py writes and every later stage reads.

A dataset is a folder (local path or any URL pyarrow and Hadoop read) holding

- ``_summary.json`` (:data:`SUMMARY_FILE`): counts, splits, row groups, config; written once by the
  preprocess stage (:func:`write_summary`), read by every other stage (:func:`read_summary`);
- one Petastorm dataset per split at ``<dataset>/<split>`` (:func:`split_url`), Parquet files of
  ``schema.XraySchema`` rows, read here batch by batch (:func:`iter_split_batches`) or whole
  (:func:`load_split`).

Both sides of the contract live in this module, so a reader never spells a file name of its own.
A dataset that breaks it raises ``errors.DatasetError`` (also a ``FileNotFoundError``) naming the dataset.
"""
from __future__ import annotations

import json
import os
from typing import Any, Collection, Iterator, Sequence

import numpy as np

from covid_spark.data.storage import HadoopFS, to_url, write_json_stream
from covid_spark.errors import DatasetError

SUMMARY_FILE = "_summary.json"

_NOT_A_DATASET = "is {dataset} a dataset written by jobs/preprocess.py?"


def summary_url(dataset: str) -> str:
    """URL of a dataset's summary file."""
    return f"{to_url(dataset).rstrip('/')}/{SUMMARY_FILE}"


def split_url(dataset: str, split: str) -> str:
    """URL of one split's Petastorm dataset inside a preprocessed dataset."""
    return f"{to_url(dataset).rstrip('/')}/{split}"


def write_summary(dataset: str, summary: dict[str, Any]) -> None:
    """Write ``summary`` to the dataset's summary file, streamed through pyarrow (any URL the executors
    write; never one big string in memory)."""
    write_json_stream(summary_url(dataset), summary)


def has_summary(spark_or_none, dataset: str) -> bool:
    """Whether ``dataset`` holds a summary (a local path or ``file://`` URL needs no Spark session)."""
    url = summary_url(dataset)
    if url.startswith("file://"):
        return os.path.exists(url[len("file://"):])
    return HadoopFS(spark_or_none, url).exists(url)


def read_summary(spark_or_none, dataset: str) -> dict:
    """Read ``<dataset>/_summary.json`` (local path or URL; a Spark session is needed for other URLs).

    Raises:
        DatasetError: the dataset has no summary (not made by the preprocess job); names the dataset.
    """
    url = summary_url(dataset)
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not os.path.exists(path):
            raise DatasetError(f"{path} not found: {_NOT_A_DATASET.format(dataset=dataset)}", dataset=dataset)
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    fs = HadoopFS(spark_or_none, url)
    if not fs.exists(url):
        raise DatasetError(f"{url} not found: {_NOT_A_DATASET.format(dataset=dataset)}", dataset=dataset)
    return json.loads(fs.read_text(url))


def split_row_groups(dataset: str, split: str):
    """``(filesystem, [(file, row group index), ...])`` for one split: files in path order, then their
    row groups, the order in which Petastorm numbers (and shards) row groups.

    Raises:
        DatasetError: the split has no Parquet file.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    url = split_url(dataset, split)
    fs, root = pafs.FileSystem.from_uri(url)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = sorted(info.path for info in infos if info.is_file and info.path.endswith(".parquet")
                   and not any(part.startswith(("_", ".")) for part in info.path[len(root):].split("/")))
    if not files:
        raise DatasetError(f"no Parquet files in {url}: {_NOT_A_DATASET.format(dataset=dataset)}", dataset=dataset)
    groups = []
    for path in files:
        with fs.open_input_file(path) as handle:
            groups += [(path, i) for i in range(pq.ParquetFile(handle).num_row_groups)]
    return fs, groups


def shard_rows(dataset: str, split: str, shard_count: int | None = None) -> list[int]:
    """Rows in each shard of a split, sharded by row group as :func:`iter_split_batches` shards it
    (one number, the whole split, when ``shard_count`` is None). Reads only the Parquet footers."""
    import pyarrow.parquet as pq

    fs, groups = split_row_groups(dataset, split)
    sizes, footers = [], {}
    for path, index in groups:
        if path not in footers:
            with fs.open_input_file(path) as handle:
                footers[path] = pq.ParquetFile(handle).metadata
        sizes.append(footers[path].row_group(index).num_rows)
    count = shard_count or 1
    return [sum(sizes[i] for i in range(shard, len(sizes), count)) for shard in range(count)]


def iter_split_batches(dataset: str, split: str, fields: Sequence[str] = ("image", "label"),
                       batch_size: int = 32, paths: Collection[str] | None = None,
                       shard: int | None = None, shard_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Stream one split (or shard ``shard`` of ``shard_count``, by row group as Petastorm shards) in
    batches of up to ``batch_size`` rows, each ``{field: array}`` (``path`` always included).

    Rows come in row-group order (deterministic, not sorted by path). Memory stays flat in the
    split's size: one row group and one batch. With ``paths``, only rows whose path is in it are
    decoded and yielded (other row groups' images are not even read).

    Row groups are read with pyarrow and decoded with ``XraySchema``'s Petastorm codecs, in this
    thread. Petastorm's ``make_reader(num_epochs=1)`` is not used: its thread pool (petastorm 0.13.1)
    decides the data has ended by reading "every worker idle" before "ventilation complete", so
    row groups the ventilator hands out between those two reads are silently dropped (18 of 65
    whole-split reads of a 38-row-group split lost 1 to 8 rows; none with the two reads swapped).

    Raises:
        ValueError: ``batch_size`` < 1, or fewer row groups than ``shard_count``.
        DatasetError: the split has no Parquet file.
    """
    import pyarrow.parquet as pq

    from covid_spark.data.schema import XraySchema  # imports Petastorm: only when this runs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if paths is not None and not paths:
        return
    fs, groups = split_row_groups(dataset, split)
    if shard_count:
        if len(groups) < shard_count:
            raise DatasetError(f"split {split!r} of {dataset} has {len(groups)} row group(s), fewer than "
                             f"the {shard_count} shards asked for")
        groups = [g for i, g in enumerate(groups) if i % shard_count == shard]
    wanted = list(dict.fromkeys(list(fields) + ["path"]))
    decoders = [(f, XraySchema.fields[f], XraySchema.fields[f].codec) for f in wanted]
    keep_paths = None if paths is None else set(paths)
    columns: dict[str, list] = {f: [] for f in wanted}
    handle, current = None, None
    try:
        for path, index in groups:
            if path != current:
                if handle is not None:
                    handle.close()
                handle, current = fs.open_input_file(path), path
                parquet = pq.ParquetFile(handle)
            rows = None
            if keep_paths is not None:
                rows = [i for i, p in enumerate(parquet.read_row_group(index, columns=["path"]).column("path")
                                                .to_pylist()) if p in keep_paths]
                if not rows:
                    continue
            table = parquet.read_row_group(index, columns=wanted)
            if rows is not None:
                table = table.take(rows)
            encoded = {f: table.column(f).to_pylist() for f in wanted}
            del table
            for r in range(len(encoded["path"])):
                for f, field, codec in decoders:
                    value = codec.decode(field, encoded[f][r])
                    columns[f].append(to_three_channels(value) if f == "image" else value)
                if len(columns["path"]) == batch_size:
                    yield _stack(columns)
                    columns = {f: [] for f in wanted}
        if columns["path"]:
            yield _stack(columns)
    finally:
        if handle is not None:
            handle.close()


def load_split(dataset: str, split: str, fields: Sequence[str] = ("image", "label"),
               shard: int | None = None, shard_count: int | None = None) -> dict[str, np.ndarray]:
    """Read a whole split (or one shard of it) into memory, in a stable order (by path).

    For scoring a split, ``iter_split_batches`` holds one batch at a time instead.
    """
    wanted = list(dict.fromkeys(list(fields) + ["path"]))
    parts = list(iter_split_batches(dataset, split, wanted, batch_size=1024, shard=shard, shard_count=shard_count))
    if not parts:
        return {f: np.array([]) for f in wanted}
    columns = {f: np.concatenate([part[f] for part in parts]) for f in wanted}
    order = np.argsort(columns["path"].astype(str), kind="stable")
    return {f: values[order] for f, values in columns.items()}


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """A stored image as (height, width, 3): one stored grey channel is repeated (see schema.py)."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _stack(columns: dict[str, list]) -> dict[str, np.ndarray]:
    return {f: np.stack(values) if isinstance(values[0], np.ndarray) else np.array(values)
            for f, values in columns.items()}
