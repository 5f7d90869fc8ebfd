"""Reading and writing outputs atomically, on local disk or any Hadoop filesystem URL."""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Iterator


def to_url(location: str) -> str:
    """A plain path becomes an absolute ``file://`` URL; URLs pass through."""
    return location if "://" in location else "file://" + os.path.abspath(location)


def exists_error(path: str, alternative: str = "") -> FileExistsError:
    """The one message every job gives for an output that exists: ``<path> already exists: pass --overwrite
    to replace it`` (``alternative`` appends another way out, e.g. `` or --resume …``)."""
    return FileExistsError(f"{path.removeprefix('file://')} already exists: pass --overwrite to replace it{alternative}")


def refuse_existing(path: str, overwrite: bool) -> None:
    """Raise :func:`exists_error` when the local file or folder ``path`` exists and ``overwrite`` is false."""
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)


def atomic_write_text(path: str, text: str) -> None:
    """Write a local file through a temporary sibling and a rename (creating its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_json_stream(url: str, data: Any, chunk: int = 1 << 20) -> None:
    """Write ``data`` as indented JSON through pyarrow's filesystem (any URL the executors write), in
    chunks: never one big string, so a large summary costs no more memory than its parts."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(url)
    parts, size = [], 0
    with fs.open_output_stream(path) as stream:
        for piece in json.JSONEncoder(indent=2).iterencode(data):
            parts.append(piece)
            size += len(piece)
            if size >= chunk:
                stream.write("".join(parts).encode("utf-8"))
                parts, size = [], 0
        parts.append("\n")
        stream.write("".join(parts).encode("utf-8"))


class HadoopFS:
    """The few filesystem calls the jobs need, through Spark's JVM (works for file://, hdfs://, s3a://)."""

    def __init__(self, spark, url: str):
        jvm = spark.sparkContext._jvm
        self._jvm = jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()
        self._fs = jvm.org.apache.hadoop.fs.Path(url).getFileSystem(self._conf)

    def _path(self, url: str):
        return self._jvm.org.apache.hadoop.fs.Path(url)

    def exists(self, url: str) -> bool:
        return bool(self._fs.exists(self._path(url)))

    def delete(self, url: str) -> None:
        self._fs.delete(self._path(url), True)

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def read_text(self, url: str) -> str:
        stream = self._fs.open(self._path(url))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream)).decode("utf-8")
        finally:
            stream.close()


@contextlib.contextmanager
def atomic_directory(spark, url: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary sibling URL to write into; move it to ``url`` only on success.

    Raises:
        FileExistsError: ``url`` exists and ``overwrite`` is false (checked before any work).
    """
    url = url.rstrip("/")
    fs = HadoopFS(spark, url)
    if fs.exists(url) and not overwrite:
        raise exists_error(url)
    tag = uuid.uuid4().hex[:8]
    tmp, old = f"{url}.tmp-{tag}", f"{url}.old-{tag}"
    try:
        yield tmp
        if fs.exists(url):
            fs.rename(url, old)
        fs.rename(tmp, url)
        if fs.exists(old):
            fs.delete(old)
    finally:
        if fs.exists(tmp):
            fs.delete(tmp)


def _local(url: str) -> str | None:
    """The local path of a ``file://`` URL (or a plain path); None for any other scheme."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def link_or_copy(src_url: str, dst_url: str) -> None:
    """Make ``dst_url`` hold the bytes of ``src_url``: a hard link on a local disk (no bytes move, and
    the source stays untouched), a copy through pyarrow's filesystem elsewhere."""
    src, dst = _local(src_url), _local(dst_url)
    if src is not None and dst is not None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
            return
        except OSError:  # another device, or a filesystem without hard links
            pass
    import pyarrow.fs as pafs

    fs, src_path = pafs.FileSystem.from_uri(src_url)
    _, dst_path = pafs.FileSystem.from_uri(dst_url)
    fs.create_dir(os.path.dirname(dst_path), recursive=True)
    fs.copy_file(src_path, dst_path)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap two local paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
    return done


def swap_directory(spark, url: str, new_url: str) -> None:
    """Put the complete directory ``new_url`` in the place of ``url`` and delete the old one.

    On a local disk the two are exchanged in one atomic rename (``renameat2``), so a reader or a
    killed process sees either the old directory or the new one, never neither. Elsewhere (or
    without ``renameat2``) two renames, as :func:`atomic_directory` does: a kill between them leaves
    ``url`` missing and both ``<url>.old-*`` (the old version) and ``new_url`` (the new) beside it.
    """
    url, new_url = url.rstrip("/"), new_url.rstrip("/")
    a, b = _local(url), _local(new_url)
    if a is not None and b is not None and _exchange(a, b):
        import shutil

        shutil.rmtree(b)  # now the old version
        return
    fs = HadoopFS(spark, url)
    old = f"{url}.old-{uuid.uuid4().hex[:8]}"
    fs.rename(url, old)
    fs.rename(new_url, url)
    fs.delete(old)
