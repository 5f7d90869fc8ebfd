"""Nightly covid-spark pipeline on a Spark cluster: one Airflow task per stage.

Each task is ``spark-submit jobs/pipeline.py --stages <stage>`` on the same run directory, so a
failed stage is retried (and cleared) on its own; the pipeline skips work whose inputs did not
change and resumes an interrupted training from its last checkpoint.

Needs, on the Airflow workers: ``apache-airflow-providers-apache-spark``; ``spark-submit`` of the
pinned pyspark on PATH; a checkout of this repository at ``COVID_SPARK_HOME`` with its ``.venv``
(the drivers run there, in client mode) and the wheel shipped to the executors at
``dist/covid_spark.zip`` (see docs/cluster.md); and an Airflow connection ``spark_covid`` of type
Spark with host ``spark://spark-master`` and port ``7077``. Inputs and run directories must be
paths the Spark workers see too (shared storage) or hdfs:// / s3a:// URLs.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

HOME = os.environ.get("COVID_SPARK_HOME", "/opt/covid-spark")
XRAYS = os.environ.get("COVID_SPARK_INPUT", "/data/cxr3")
RUN_DIR = os.path.join(HOME, "runs", "nightly-{{ ds }}")   # templated: one run dir per logical date
PYTHON = os.path.join(HOME, ".venv", "bin", "python")


def in_repo(path: str) -> str:
    """Absolute path of a file in the covid-spark checkout on the Airflow worker."""
    return os.path.join(HOME, path)


def stage_task(stage: str, **overrides) -> SparkSubmitOperator:
    """spark-submit jobs/pipeline.py --stages ``stage`` on the run directory of the logical date."""
    return SparkSubmitOperator(
        task_id=stage,
        conn_id="spark_covid",
        application=in_repo("jobs/pipeline.py"),
        application_args=["--input", XRAYS, "--run-dir", RUN_DIR, "--stages", stage],
        properties_file=in_repo("conf/spark-standalone.conf"),
        py_files=in_repo("dist/covid_spark.zip"),
        conf={"spark.pyspark.python": PYTHON, "spark.pyspark.driver.python": PYTHON},
        name=f"covid-spark {stage} {{{{ ds }}}}",
        **overrides,
    )


with DAG(
    dag_id="covid_spark_nightly",
    description="preprocess → train (Horovod on Spark) → evaluate → report",
    schedule="30 1 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,              # never two nights at once on the same cluster
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10), "owner": "covid-spark"},
    tags=["covid-spark", "spark"],
) as dag:
    preprocess = stage_task("preprocess")
    # A retry resumes from the last epoch's checkpoint instead of starting over.
    train = stage_task("train", retries=3, execution_timeout=timedelta(hours=6))
    evaluate = stage_task("evaluate")
    report = stage_task("report")

    preprocess >> train >> evaluate >> report
