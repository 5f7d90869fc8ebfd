"""The dataset's file index: what became of every input file, so a later run reads only what changed.

``<dataset>/_files.parquet`` (:data:`INDEX_FILE`; the leading underscore keeps Parquet and Petastorm
readers away) has one row per input file the preprocess stage read, written or not:

- ``path``, ``status`` (:data:`WRITTEN`, :data:`REJECTED` or :data:`EXCLUDED` by the views filter),
  ``reason`` (why not written; "" when written);
- the file's fingerprint: ``size``, ``mtime_ns`` and ``digest`` (SHA-256 of its bytes);
- how it was listed: ``label``, ``source``, ``listed_patient_id``, ``listed_view`` (a changed manifest
  row makes the file count as changed);
- what was stored (written rows): ``patient_id`` (the listed one, or a DICOM pseudonym), ``view``,
  ``dhash`` (64 hex digits) and ``split``.

An increment (``stages.append``) compares the inputs with it: a file whose size and modification
time are unchanged is trusted, as ``make`` and ``git`` trust them; one whose stat changed is re-read
only when its digest changed too.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from typing import Iterable

from covid_spark.data.storage import to_url
from covid_spark.errors import DatasetError

INDEX_FILE = "_files.parquet"
WRITTEN, REJECTED, EXCLUDED = "written", "rejected", "excluded"
STRING_COLUMNS = ("path", "status", "reason", "label", "source", "listed_patient_id", "listed_view",
                  "patient_id", "view", "dhash", "split", "digest")
INT_COLUMNS = ("size", "mtime_ns")
WRITE_ROWS = 10_000  # index rows handed to Arrow at a time


def index_url(dataset: str) -> str:
    """URL of a dataset's file index."""
    return f"{to_url(dataset).rstrip('/')}/{INDEX_FILE}"


def stat_key(path: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a local file, or None when it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def fingerprint(path: str) -> tuple[int, int, str]:
    """``(size, mtime_ns, sha256 hex)`` of a local file; ``(-1, 0, "")`` when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return -1, 0, ""
    return info.st_size, info.st_mtime_ns, digest.hexdigest()


def write_index(dataset: str, rows: Iterable[dict]) -> int:
    """Write the index rows (dicts with every column), in path order, to ``<dataset>/_files.parquet``; return
    the count.

    The rows go to Arrow :data:`WRITE_ROWS` at a time as they come: a generator of rows holds neither a dict
    per file nor a copy of the whole index.

    Raises:
        RuntimeError: a row's path sorts before the previous row's (an internal error: callers sort).
    """
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in STRING_COLUMNS]
                       + [(name, pa.int64()) for name in INT_COLUMNS])
    fs, path = pafs.FileSystem.from_uri(index_url(dataset))
    rows, count, last = iter(rows), 0, ""
    with pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd") as writer:
        while chunk := list(itertools.islice(rows, WRITE_ROWS)):
            for row in chunk:
                if row["path"] < last:
                    raise RuntimeError(f"internal error: file index rows out of order "
                                       f"({row['path']!r} after {last!r})")
                last = row["path"]
            writer.write_table(pa.table([pa.array([r[name] for r in chunk], schema.field(name).type)
                                         for name in schema.names], schema=schema))
            count += len(chunk)
        if not count:  # an empty index is one empty table: the file keeps its schema
            writer.write_table(schema.empty_table())
    return count


def read_index(dataset: str) -> dict[str, dict]:
    """The index as ``{path: row}``.

    Raises:
        DatasetError: the dataset has no index (written by a preprocess run older than the index).
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = pafs.FileSystem.from_uri(index_url(dataset))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DatasetError(f"{dataset} has no {INDEX_FILE}: it was written before datasets recorded their "
                           "files; run jobs/preprocess.py without --append once to rebuild it", dataset=dataset)
    table = pq.read_table(path, filesystem=fs)
    names = table.column_names  # column by column through numpy: several times faster than Table.to_pylist
    columns = [table.column(name).to_numpy(zero_copy_only=False).tolist() for name in names]
    return {row["path"]: row for row in (dict(zip(names, values)) for values in zip(*columns))}
