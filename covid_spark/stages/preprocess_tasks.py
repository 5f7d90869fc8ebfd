"""Preprocess stage, on the executors: the functions Spark pickles to its tasks.

- :func:`stage_partition` (first pass, ``mapPartitionsWithIndex``): decode and hash each file of the
  task, write the good images straight to one staged Parquet file with pyarrow, return a small
  :class:`Staged` per file (no pixels).
- :func:`distribute_files` (second pass): move the staged rows into their splits' files without
  decoding again, row group by row group.

The driver side is ``covid_spark.stages.preprocess``.
"""
from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.data.duplicates import HASH_SIZE, dhash
from covid_spark.data.fileindex import fingerprint
from covid_spark.inputs.images import read_image
from covid_spark.inputs.sources import Record, patient_key
from covid_spark.lungs.framing import Framing, frame_images, read_size

# Test hook: when set to a file path that does not exist yet, the first Python worker to
# decode creates it and dies, so a test can show that Spark's task retry loses nothing.
FAIL_ONCE_ENV = "COVID_SPARK_FAIL_ONCE"

# Rows per row group in staged files: the unit a distribute task holds in memory (64 × 150 kB).
STAGE_ROWS_PER_GROUP = 64


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
    size: int = -1        # the file's fingerprint (data.fileindex), taken before it is decoded
    mtime_ns: int = 0
    digest: str = ""      # SHA-256 of its bytes; "" when unreadable
    listed_patient_id: str = ""  # the patient id and view as listed (its manifest's), for the file index
    listed_view: str = ""


class StagedFiles(Sequence):
    """The first pass's results as columns: the same :class:`Staged` tuples, at about half their memory.

    Paths stay Python strings and repeated strings (label, patient, source, view, staged file) are shared;
    the numbers, the 256-bit hashes and the SHA-256 digests are NumPy arrays. Iterating or indexing makes
    each tuple as it is read, a block at a time; :meth:`where` and :meth:`sorted_by_path` give views that
    share the columns. Built by :meth:`of` (a task's results, on an executor) and :meth:`concat`.
    """

    BLOCK = 4096  # tuples made at a time when iterating
    _NUMBERS = {"input": np.int32, "row": np.int32, "excluded": np.bool_, "size": np.int64, "mtime_ns": np.int64}
    _HASH_WORDS = HASH_SIZE * HASH_SIZE // 64

    def __init__(self, columns: dict, rows: np.ndarray | None = None):
        self._columns = columns  # one entry per Staged field (dhash and digest as arrays, with *_set masks)
        self._rows = rows        # the rows of the columns this view holds, in order; None: all, as stored

    @classmethod
    def of(cls, results: Iterable[Staged]) -> "StagedFiles":
        """Columns of ``results``, in their order."""
        values: dict[str, list] = {name: [] for name in Staged._fields}
        shared: dict[str, str] = {}
        for staged in results:
            for name, value in zip(Staged._fields, staged):
                values[name].append(shared.setdefault(value, value) if type(value) is str and
                                    name not in ("path", "digest") else value)
        columns: dict = {name: v for name, v in values.items() if name not in cls._NUMBERS and
                         name not in ("dhash", "digest")}
        columns.update({name: np.array(values[name], dtype=dtype) for name, dtype in cls._NUMBERS.items()})
        width = 8 * cls._HASH_WORDS
        columns["dhash_set"] = np.array([h is not None for h in values["dhash"]], dtype=bool)
        columns["dhash"] = np.frombuffer(b"".join((h or 0).to_bytes(width, "little") for h in values["dhash"]),
                                         dtype="<u8").reshape(-1, cls._HASH_WORDS).copy()
        columns["digest_set"] = np.array([bool(d) for d in values["digest"]], dtype=bool)
        columns["digest"] = np.frombuffer(b"".join(bytes.fromhex(d) if d else bytes(32) for d in values["digest"]),
                                          dtype=np.uint8).reshape(-1, 32).copy()
        return cls(columns)

    @classmethod
    def concat(cls, parts: list["StagedFiles"]) -> "StagedFiles":
        """One table of several (each whole, not a view), in their order. Empties ``parts`` as it goes, so
        that each part's lists are freed once copied (the tasks' results need not be held twice)."""
        if not parts:
            return cls.of([])
        objects = {name: [] for name, c in parts[0]._columns.items() if not isinstance(c, np.ndarray)}
        arrays = {name: [] for name, c in parts[0]._columns.items() if isinstance(c, np.ndarray)}
        parts.reverse()
        while parts:
            part = parts.pop()._columns
            for name, values in objects.items():
                values.extend(part[name])
            for name, values in arrays.items():
                values.append(part[name])
        return cls({**objects, **{name: np.concatenate(values) for name, values in arrays.items()}})

    def __len__(self) -> int:
        return len(self._columns["path"]) if self._rows is None else len(self._rows)

    def column(self, name: str) -> list:
        """One field's values for every row of this view, as Python objects."""
        return self._take(name, 0, len(self))

    def hashes(self) -> np.ndarray:
        """This view's hashes as rows of little-endian uint64 words: with :meth:`column` ``("path")`` in path
        order, what ``duplicates.group_duplicates`` takes without a Python int per hash."""
        return self._columns["dhash"][slice(None) if self._rows is None else self._rows]

    def _take(self, name: str, lo: int, hi: int) -> list:
        column = self._columns[name]
        rows = slice(lo, hi) if self._rows is None else self._rows[lo:hi]
        if name in ("dhash", "digest"):
            present, raw = self._take(f"{name}_set", lo, hi), column[rows].tobytes()
            step = len(raw) // max(1, len(present))
            if name == "digest":
                return [raw[k * step:(k + 1) * step].hex() if ok else "" for k, ok in enumerate(present)]
            return [int.from_bytes(raw[k * step:(k + 1) * step], "little") if ok else None
                    for k, ok in enumerate(present)]
        if isinstance(column, np.ndarray):
            return column[rows].tolist()
        return column[rows] if self._rows is None else [column[i] for i in rows.tolist()]

    def _block(self, lo: int, hi: int) -> list[Staged]:
        return [Staged._make(fields) for fields in zip(*(self._take(name, lo, hi) for name in Staged._fields))]

    def __iter__(self) -> Iterator[Staged]:
        for lo in range(0, len(self), self.BLOCK):
            yield from self._block(lo, min(len(self), lo + self.BLOCK))

    def __getitem__(self, index: int) -> Staged:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"StagedFiles takes a row number, not {type(index).__name__}")
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self._block(position, position + 1)[0]

    def _view(self, positions: np.ndarray) -> "StagedFiles":
        return StagedFiles(self._columns, positions if self._rows is None else self._rows[positions])

    def where(self, keep: Sequence[bool]) -> "StagedFiles":
        """The rows whose ``keep`` is true, in order (a view)."""
        return self._view(np.flatnonzero(np.asarray(keep, dtype=bool)))

    def sorted_by_path(self) -> "StagedFiles":
        """The rows in path order (a view)."""
        return self._view(np.argsort(np.array(self.column("path"), dtype=object), kind="stable"))


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
               for name in ("label_name", "patient_id", "source", "path", "dhash", "view", "lungs")]
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


def stage_images(records: Iterable[Record], size: int, max_pixels: int, url: str,
                 rows_per_group: int = STAGE_ROWS_PER_GROUP, views=None, pseudonyms=None,
                 framing: Framing = Framing()) -> Iterator[Staged]:
    """Decode each record's file; write good images as rows of one Parquet file at ``url``.

    Yields one :class:`Staged` per record, in order (``file`` None: the caller knows ``url``).
    The file is closed before the last one is yielded, and only created when some image is good.
    ``views`` (a ``views.ViewFilter``) leaves files out; ``pseudonyms`` (``dicom.Pseudonyms``) turns
    DICOM PatientIDs into the patient id of a record that has none from its manifest. ``framing``
    (``lungs.framing.Framing``) trims the border or crops to the lungs; the hash is of the whole image.
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
            stat = fingerprint(record.path)  # before decoding: a later change shows as a new stat
            read, digest = read_and_decode(record.path, read_size(size, framing), max_pixels, views,
                                           record.view, pseudonyms)
            source = record.source
            patient = record.patient_id or (patient_key(source, read.patient_id) if read.patient_id else "")
            row = -1
            if read.image is not None:
                row, rows = rows, rows + 1
                (image,), (lungs,) = frame_images([read.image], size, framing)
                columns["image"].append(bytes(image_field.codec.encode(image_field, stored_image(image))))
                columns["lungs"].append(lungs)
                columns["label"].append(CLASSES.index(record.label))
                columns["label_name"].append(record.label)
                columns["patient_id"].append(patient)
                columns["source"].append(source)
                columns["path"].append(record.path)
                columns["dhash"].append(format(digest, f"0{HASH_SIZE * HASH_SIZE // 4}x"))
                columns["view"].append(read.view)
            pending.append(Staged(record.path, record.label, patient, source, record.input,
                                  digest, read.error or read.excluded, None, row, read.view, bool(read.excluded),
                                  *stat, record.patient_id, record.view))
            if len(columns["image"]) >= rows_per_group:
                flush()
                yield from pending
                pending.clear()
        flush()
    finally:
        if writer is not None:
            writer.close()
    yield from pending


def stage_partition(index: int, records: Iterable[Record], size: int, max_pixels: int,
                    staging_url: str, views=None, pseudonyms=None, framing: Framing = Framing()) -> Iterator[Staged]:
    """mapPartitionsWithIndex body: one staged file per task attempt, named so attempts never collide."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    name = f"stage-{index:05d}-{uuid.uuid4().hex[:12]}.parquet"
    for staged in stage_images(records, size, max_pixels, f"{staging_url}/{name}", views=views,
                               pseudonyms=pseudonyms, framing=framing):
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
