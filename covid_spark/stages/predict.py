"""Predict stage, on the driver: batch inference over new images on the Spark executors
(``covid_spark.stages.predict_tasks``), one output row per input file, streamed to CSV or Parquet in path order."""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from typing import Iterable, Iterator, Sequence

from covid_spark.constants import CLASSES, INFERENCE_BATCH_SIZE
from covid_spark.data.rundir import RunDir
from covid_spark.data.storage import refuse_existing
from covid_spark.errors import InputError
from covid_spark.inputs.sources import discover
from covid_spark.inputs.views import ViewFilter
from covid_spark.lungs.framing import Framing
from covid_spark.stages.predict_tasks import predict_partition

logger = logging.getLogger(__name__)

COLUMNS = ["path", "predicted"] + [f"p_{c}" for c in CLASSES] + ["error"]


def _csv_cell(value):
    return "" if value is None else (f"{value:.6f}" if isinstance(value, float) else value)


def write_table(rows: Iterable[tuple], output: str, rows_per_group: int = 4096) -> int:
    """Stream ``rows`` into ``output`` as CSV or Parquet (by extension), atomically; return the row count.

    Rows are written as they arrive (Parquet: one row group per ``rows_per_group`` rows) into a
    temporary sibling, renamed onto ``output`` only when every row is written; on any error the
    temporary file is removed and ``output`` is left as it was.
    """
    tmp = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.tmp-{os.getpid()}")
    count = 0
    try:
        if output.lower().endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = [pa.string(), pa.string()] + [pa.float64()] * len(CLASSES) + [pa.string()]
            schema = pa.schema([(name, t) for name, t in zip(COLUMNS, types)])

            def table(chunk):
                columns = list(zip(*chunk)) if chunk else [[] for _ in COLUMNS]
                return pa.table([pa.array(list(col), type=t) for col, t in zip(columns, types)], schema=schema)

            with pq.ParquetWriter(tmp, schema) as writer:
                chunk = []
                for row in rows:
                    chunk.append(row)
                    if len(chunk) == rows_per_group:
                        writer.write_table(table(chunk))
                        count, chunk = count + len(chunk), []
                if chunk or not count:
                    writer.write_table(table(chunk))
                    count += len(chunk)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(COLUMNS)
                for row in rows:
                    writer.writerow([_csv_cell(v) for v in row])
                    count += 1
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def partitions_in_order(rdd, in_flight: int) -> Iterator:
    """The rows of ``rdd``, partition after partition in order, with up to ``in_flight`` partitions
    computing at once (one Spark job each); the driver holds at most ``in_flight`` partitions' rows.

    What ``rdd.toLocalIterator(prefetchPartitions=True)`` does, except that it keeps at most two
    partitions running, which would leave the other cores of a larger cluster idle. On an error, or
    when the caller stops early, the jobs still running are cancelled.
    """
    import uuid
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    sc = rdd.context
    total = rdd.getNumPartitions()
    group = f"covid-spark-predict-{uuid.uuid4().hex[:8]}"
    description = sc.getLocalProperty("spark.job.description") or "predict"

    def run(index: int) -> list:
        sc.setJobGroup(group, f"{description}: partition {index + 1}/{total}", interruptOnCancel=True)
        return sc.runJob(rdd, lambda part: part, [index])

    pool = ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="predict-partition")
    running: deque = deque()
    submitted = 0
    try:
        while submitted < total or running:
            while submitted < total and len(running) < in_flight:
                running.append(pool.submit(run, submitted))
                submitted += 1
            rows = running.popleft().result()
            if submitted < total:  # keep the executors busy while the driver writes these rows
                running.append(pool.submit(run, submitted))
                submitted += 1
            yield from rows
    finally:
        if running:
            for future in running:
                future.cancel()
            sc.cancelJobGroup(group)
        pool.shutdown(wait=True)


def prediction_records(inventory) -> list[tuple]:
    """``(path, skip_reason, listed_view)`` per file a ``sources.Inventory`` found, in path order:
    what :func:`predict_partition` takes."""
    return sorted([(r.path, None, r.view) for r in inventory.records]
                  + [(s["path"], s["reason"], "") for s in inventory.skipped], key=lambda r: r[0])


def partition_count(files: int, parallelism: int, files_per_partition: int = 2000) -> int:
    """Few, large partitions: at least one per core, more only past ``files_per_partition`` each.

    Each partition pays a fixed cost (a Python task's start, ~0.1 s, and the model load in a
    fresh worker, 1-2 s for EfficientNet-Lite0), so they are kept large.
    """
    return max(1, min(files, max(parallelism, files // files_per_partition)))


def scoring_model(model_dir: str) -> tuple[bytes, int, Framing]:
    """What the executors score with: the run's ``model.keras`` bytes, its image size and its framing.

    Raises:
        FileNotFoundError: no model in ``model_dir``.
    """
    run_dir = RunDir(model_dir)
    if not os.path.exists(run_dir.model):
        raise FileNotFoundError(f"{run_dir.model} not found: train a model into {model_dir} first")
    with open(run_dir.run_json, encoding="utf-8") as handle:
        run = json.load(handle)
    with open(run_dir.model, "rb") as handle:
        return handle.read(), int(run["image_size"]), Framing(**run.get("framing", {}))


def predict(spark, input_locations: str | Sequence[str], model_dir: str, output: str, config: dict,
            batch_size: int = INFERENCE_BATCH_SIZE, overwrite: bool = False, explain_dir: str | None = None) -> dict:
    """Score every file at ``input_locations`` (one location or a list); one output row per input file.

    Rows are sorted by path and streamed: files are sorted before they are distributed, partitions
    come back in order and the driver writes each row as it arrives, so no stage holds more than a
    few partitions' rows (never the images).

    Raises:
        InputError: output extension is neither .csv nor .parquet.
        FileNotFoundError: the input or the model is missing.
        FileExistsError: ``output`` exists and ``overwrite`` is false.
    """

    started = time.time()
    if not output.lower().endswith((".csv", ".parquet")):
        raise InputError(f"--output {output} must end in .csv or .parquet")
    refuse_existing(output, overwrite)
    model_bytes, size, framing = scoring_model(model_dir)
    inventory = discover(input_locations, labelled=False,
                         skip_unknown=config["preprocess"]["skip_unknown_classes"])
    max_pixels = config["preprocess"]["max_pixels"]
    views = ViewFilter.parse(config["preprocess"]["views"])
    records = prediction_records(inventory)
    if explain_dir:
        explain_dir = os.path.abspath(explain_dir)
        os.makedirs(explain_dir, exist_ok=True)
    sc = spark.sparkContext
    model_bc = sc.broadcast(model_bytes)
    slices = partition_count(len(records), sc.defaultParallelism)
    sc.setJobDescription(f"predict {len(records)} files")
    scored = sc.parallelize(records, slices).mapPartitions(
        lambda part: predict_partition(part, model_bc.value, size, max_pixels, batch_size, 1, explain_dir, views,
                                       framing))
    counts = {"rows": 0, "errors": 0}

    def in_path_order(rows):
        last = None
        for row in rows:
            if last is not None and row[0] < last:  # parallelize keeps order; this would be a bug
                raise RuntimeError(f"internal error: predict rows out of order ({row[0]!r} after {last!r})")
            last = row[0]
            counts["rows"] += 1
            counts["errors"] += bool(row[-1])
            yield row

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    try:
        write_table(in_path_order(partitions_in_order(scored, sc.defaultParallelism)), output)
    finally:
        model_bc.unpersist()
    errors = counts["errors"]
    result = {"inputs": len(records), "rows": counts["rows"], "predicted": counts["rows"] - errors, "errors": errors,
              "partitions": slices, "output": os.path.abspath(output), "explain_dir": explain_dir,
              "seconds": round(time.time() - started, 1)}
    logger.info("predict: %d files → %d predicted, %d with an error; %d partitions, %.1f s → %s",
                result["inputs"], result["predicted"], errors, slices, result["seconds"], output)
    return result

