"""covid-spark on a growing archive, on a Spark cluster: two Airflow DAGs.

- ``covid_spark_weekly``: ``preprocess --append`` brings the one dataset up to date with the archive
  (only new and changed files are read, removed ones dropped; every patient keeps its split, a late
  patient is placed by a keyed hash of its id; the first run creates the dataset), then a model is
  trained on the grown dataset into a run dir of the logical date and evaluated on its test split.
  A retried task is safe: the append is atomic and idempotent (a second run finds nothing new), and
  training resumes from its last checkpoint.
- ``covid_spark_score_arrivals``: every 10 minutes, ``predict --watch --once`` scores the files that
  arrived in the incoming folder since the last run, each exactly once (the query's checkpoint
  remembers them), with the model of the last successful weekly run.

Test metrics of a grown dataset are recomputed on its grown test split, not compared blindly with last
week's: docs/data.md#evaluating-a-grown-dataset.

Needs, on the Airflow workers: ``apache-airflow-providers-apache-spark``; ``spark-submit`` of the
pinned pyspark on PATH; a checkout of this repository at ``COVID_SPARK_HOME`` with its ``.venv``
(the drivers run there, in client mode) and the wheel shipped to the executors at
``dist/covid_spark.zip`` (see docs/engines-and-clusters.md); and an Airflow connection ``spark_covid``
of type Spark with host ``spark://spark-master`` and port ``7077``. Inputs, the dataset and run
directories must be paths the Spark workers see too (shared storage).
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

HOME = os.environ.get("COVID_SPARK_HOME", "/opt/covid-spark")
ARCHIVE = os.environ.get("COVID_SPARK_INPUT", "/data/archive")
INCOMING = os.environ.get("COVID_SPARK_INCOMING", "/data/incoming")
DATA = os.environ.get("COVID_SPARK_DATA", "/data/covid-spark")
DATASET = os.path.join(DATA, "dataset")
RUN_DIR = os.path.join(HOME, "runs", "weekly-{{ ds }}")   # templated: one run dir per logical date
LATEST = os.path.join(HOME, "runs", "latest")             # a link to the last evaluated run dir
PYTHON = os.path.join(HOME, ".venv", "bin", "python")


def in_repo(path: str) -> str:
    """Absolute path of a file in the covid-spark checkout on the Airflow worker."""
    return os.path.join(HOME, path)


def job_task(task_id: str, job: str, args: list[str], **overrides) -> SparkSubmitOperator:
    """spark-submit ``jobs/<job>.py args`` on the cluster."""
    return SparkSubmitOperator(
        task_id=task_id,
        conn_id="spark_covid",
        application=in_repo(f"jobs/{job}.py"),
        application_args=args,
        properties_file=in_repo("conf/spark-standalone.conf"),
        py_files=in_repo("dist/covid_spark.zip"),
        conf={"spark.pyspark.python": PYTHON, "spark.pyspark.driver.python": PYTHON},
        name=f"covid-spark {task_id} {{{{ ts_nodash }}}}",
        **overrides,
    )


DEFAULTS = {"retries": 2, "retry_delay": timedelta(minutes=10), "owner": "covid-spark"}

with DAG(
    dag_id="covid_spark_weekly",
    description="preprocess --append → train (Horovod on Spark) → evaluate",
    schedule="30 1 * * 0",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,              # never two appends to one dataset at once
    default_args=DEFAULTS,
    tags=["covid-spark", "spark"],
) as weekly:
    append = job_task("append", "preprocess", ["--append", "--input", ARCHIVE, "--output", DATASET])
    # A retry resumes from the last epoch's checkpoint instead of starting over.
    train = job_task("train", "train", ["--dataset", DATASET, "--model-dir", RUN_DIR, "--resume"],
                     retries=3, execution_timeout=timedelta(hours=6))
    evaluate = job_task("evaluate", "evaluate", ["--dataset", DATASET, "--model-dir", RUN_DIR, "--overwrite"])
    # The scoring DAG uses the model of the last run that got this far.
    publish = BashOperator(task_id="publish", bash_command=f"ln -sfn {RUN_DIR} {LATEST}")
    append >> train >> evaluate >> publish

with DAG(
    dag_id="covid_spark_score_arrivals",
    description="predict --watch --once: score each new file in the incoming folder once",
    schedule=timedelta(minutes=10),
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,              # one query per checkpoint
    default_args=DEFAULTS,
    tags=["covid-spark", "spark"],
) as scoring:
    job_task("score", "predict", ["--watch", INCOMING, "--once", "--model-dir", LATEST,
                                  "--output", os.path.join(DATA, "scored")])
