"""Predict stage over a watched folder: score new X-rays as they arrive, with Spark Structured Streaming.

``jobs/predict.py --watch DIR``. The query's source is Spark's file source over ``DIR`` (format
``binaryFile``, recursive; only the ``path`` column is collected, by one task, so Spark never reads the
bytes);
each micro-batch's files are scored on the executors by the batch predict's own
``predict_tasks.predict_partition`` (the same decoding, views filter, model and batches), and its
rows are written to ``<output>/batch-<batch id>.<parquet|csv>``.

Exactly once across restarts: Spark writes a micro-batch's files to the checkpoint's offset log
before the batch runs, and runs a batch that did not commit again, with the same id and the same
files. The sink is idempotent by batch id: a batch's file is written to a hidden temporary name and
renamed into place, and a batch whose file exists is not written again. So a kill before the rename
loses nothing (the batch runs again) and a kill after it repeats nothing (the file is kept).

Every file that arrives gets a row: a prediction, or an empty prediction with the reason in ``error``
(unreadable, left out by ``--views``, or skipped by name as batch predict skips it). Spark's file
source itself never lists names starting with ``.`` or ``_``: copy files in under such a name and
rename them, so that no half-copied file is scored.
"""
from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from covid_spark.constants import INFERENCE_BATCH_SIZE
from covid_spark.errors import InputError
from covid_spark.inputs.sources import skip_reason
from covid_spark.inputs.views import ViewFilter
from covid_spark.lungs.framing import Framing
from covid_spark.stages.predict import partition_count, partitions_in_order, scoring_model, write_table
from covid_spark.stages.predict_tasks import predict_partition

logger = logging.getLogger(__name__)

# Test hook: "<batch id>:before" or "<batch id>:after" makes the driver die (os._exit) just before or
# just after writing that batch's file, as a killed job would.
FAIL_ENV = "COVID_SPARK_FAIL_WATCH"
FORMATS = ("parquet", "csv")


@dataclass(frozen=True)
class WatchOptions:
    """How the query runs: where its state lives, how often it looks, how much one batch takes."""
    checkpoint: str                  # Spark's checkpoint folder (offsets and commits)
    trigger_seconds: float = 10.0    # how often to look for new files (ignored with once)
    once: bool = False               # score what is there now, in batches, then stop (Trigger.AvailableNow)
    max_files: int = 1000            # files per micro-batch at most
    batch_size: int = INFERENCE_BATCH_SIZE
    output_format: str = "parquet"


def batch_file(output: str, batch_id: int, output_format: str) -> str:
    """The file holding one micro-batch's rows."""
    return os.path.join(output, f"batch-{batch_id:010d}.{output_format}")


def local_path(uri: str) -> str:
    """A path Spark's file source lists (``file:/x/a%20b.png``) as a local path (``/x/a b.png``)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise InputError(f"--watch reads files on a local or shared mount, not {parsed.scheme}:// ({uri})")
    return unquote(parsed.path)


def watch_records(paths: list[str], root: str) -> list[tuple]:
    """``(path, skip_reason, listed_view)`` per arrived file, sorted by path, as batch predict builds them."""
    return sorted((p, skip_reason(os.path.relpath(p, root)), "") for p in paths)


def _die_at(batch_id: int, moment: str) -> None:
    if os.environ.get(FAIL_ENV) == f"{batch_id}:{moment}":
        logger.error("%s=%s:%s: dying here, as a killed job would", FAIL_ENV, batch_id, moment)
        os._exit(3)


def _rss_mb() -> float:
    """This process's resident memory now (Linux), in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _prepare(directory: str, model_dir: str, output: str, options: WatchOptions) -> tuple[str, bytes, int, Framing]:
    """Check the arguments before Spark starts anything; return the watched root, the model's bytes, its image
    size and its framing (as batch predict reads them from ``run.json``)."""

    root = os.path.abspath(directory)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--watch {directory} is not a folder")
    if options.output_format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, found {options.output_format!r}")
    if options.max_files < 1 or options.trigger_seconds <= 0:
        raise InputError("--max-files-per-batch and --trigger-seconds must be positive")
    if os.path.isfile(output):
        raise InputError(f"--output {output} is a file: with --watch it is a folder of one file per micro-batch")
    model_bytes, size, framing = scoring_model(model_dir)
    os.makedirs(output, exist_ok=True)
    for stale in glob.glob(os.path.join(output, ".batch-*.tmp-*")):  # a killed run's unfinished file
        os.remove(stale)
    return root, model_bytes, size, framing


def watch(spark, directory: str, model_dir: str, output: str, config: dict, options: WatchOptions) -> dict:
    """Run the streaming query until it is stopped (or, with ``options.once``, until the folder is scored).

    Returns counts (batches, files, predicted, errors) and, per batch, its id, files, seconds and
    the driver's resident memory after it.

    Raises:
        FileNotFoundError: the folder or the model is missing.
        InputError: a bad option or output.
    """
    from pyspark.sql.types import BinaryType, LongType, StringType, StructField, StructType, TimestampType

    root, model_bytes, size, framing = _prepare(directory, model_dir, output, options)
    sc = spark.sparkContext
    model_bc = sc.broadcast(model_bytes)  # once per query, not per batch
    max_pixels, views = config["preprocess"]["max_pixels"], ViewFilter.parse(config["preprocess"]["views"])
    batch_size, fmt = options.batch_size, options.output_format
    totals = {"batches": 0, "files": 0, "predicted": 0, "errors": 0, "skipped_batches": 0, "per_batch": []}

    def score(frame, batch_id: int) -> None:
        started = time.time()
        target = batch_file(output, batch_id, fmt)
        if os.path.exists(target):  # written before a restart: this batch runs again, its rows do not
            totals["skipped_batches"] += 1
            return
        # One task lists the micro-batch's paths: the file source packs files counting 4 MB each
        # (spark.sql.files.openCostInBytes), which would give a task per X-ray.
        records = watch_records([local_path(r.path) for r in frame.select("path").coalesce(1).collect()], root)
        if not records:
            return
        sc.setJobDescription(f"watch batch {batch_id}: predict {len(records)} files")
        rdd = sc.parallelize(records, partition_count(len(records), sc.defaultParallelism)).mapPartitions(
            lambda part: predict_partition(part, model_bc.value, size, max_pixels, batch_size, 1, None, views,
                                           framing))
        _die_at(batch_id, "before")
        counts = {"rows": 0, "errors": 0}

        def counted(rows):
            for row in rows:
                counts["rows"] += 1
                counts["errors"] += bool(row[-1])
                yield row

        write_table(counted(partitions_in_order(rdd, sc.defaultParallelism)), target)
        _die_at(batch_id, "after")
        totals["batches"] += 1
        totals["files"] += counts["rows"]
        totals["errors"] += counts["errors"]
        totals["predicted"] += counts["rows"] - counts["errors"]
        entry = {"batch_id": batch_id, "files": counts["rows"], "seconds": round(time.time() - started, 2),
                 "ended": round(time.time(), 2), "rss_mb": round(_rss_mb(), 1)}
        totals["per_batch"] = (totals["per_batch"] + [entry])[-1000:]
        logger.info("watch: batch %d: %d files, %d with an error, %.1f s → %s", batch_id, counts["rows"],
                    counts["errors"], entry["seconds"], target)

    # Spark lists a micro-batch's files again before reading them, as a Spark job of one task per file
    # once they are more than this threshold (32): listing them on the driver costs far less.
    listing = "spark.sql.sources.parallelPartitionDiscovery.threshold"
    spark.conf.set(listing, str(max(32, options.max_files + 1)))
    schema = StructType([StructField("path", StringType()), StructField("modificationTime", TimestampType()),
                         StructField("length", LongType()), StructField("content", BinaryType())])
    stream = (spark.readStream.format("binaryFile").schema(schema).option("recursiveFileLookup", "true")
              .option("maxFilesPerTrigger", options.max_files).load(root).select("path"))
    writer = stream.writeStream.foreachBatch(score).option("checkpointLocation", options.checkpoint)
    writer = writer.trigger(availableNow=True) if options.once else writer.trigger(
        processingTime=f"{options.trigger_seconds} seconds")
    query = writer.queryName(f"covid-spark-watch-{os.path.basename(root)}").start()
    try:
        query.awaitTermination()
    finally:
        if query.isActive:
            query.stop()
        model_bc.unpersist()
        spark.conf.unset(listing)
    return totals
