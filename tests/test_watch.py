"""jobs/predict.py --watch: a Structured Streaming query scores each arriving file exactly once across
kills and restarts, with the rows batch predict gives the same files (a bad file, a DICOM file)."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
PROBABILITIES = ["p_covid", "p_normal", "p_pneumonia"]


def _images(folder: str, start: int, count: int) -> list[str]:
    """``count`` noise PNGs, every other one in a sub-folder; their paths."""
    paths = []
    for i in range(start, start + count):
        path = os.path.join(folder, "sub" if i % 2 else "", f"x{i:03d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A compact model with seeded random weights: outputs differ from image to image."""
    import tensorflow as tf

    from covid_spark.models.registry import make_model

    folder = str(tmp_path_factory.mktemp("model"))
    tf.keras.utils.set_random_seed(1)
    make_model("compact", (SIZE, SIZE, 3)).save(os.path.join(folder, "model.keras"))
    with open(os.path.join(folder, "run.json"), "w") as handle:
        json.dump({"model": "compact", "image_size": SIZE, "classes": ["covid", "normal", "pneumonia"]}, handle)
    return folder


def _arrivals(folder: str) -> dict[str, str]:
    """Images, a DICOM file without an extension, a bad file and a text file: expected error word by path."""
    from tests.dicoms import dataset, encoded

    expected = {p: "" for p in _images(folder, 0, 9)}
    dicom = os.path.join(folder, "scan0001")
    with open(dicom, "wb") as handle:
        handle.write(encoded(dataset(np.random.default_rng(5).integers(0, 255, (30, 26), dtype=np.uint8))))
    expected[dicom] = ""
    with open(os.path.join(folder, "broken.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    expected[os.path.join(folder, "broken.png")] = "not an image"
    with open(os.path.join(folder, "notes.txt"), "w") as handle:
        handle.write("not an image")
    expected[os.path.join(folder, "notes.txt")] = "unsupported extension"
    return expected


def _batch_predict(spark, folder: str, model_dir: str, out: str) -> dict[str, dict]:
    """The rows batch predict gives the same files (computed in this process, apart from the query)."""
    import pandas as pd

    from covid_spark.config import load_config
    from covid_spark.stages.predict import predict

    predict(spark, folder, model_dir, out, load_config())
    return {row["path"]: row for row in pd.read_parquet(out).to_dict("records")}


def _watch(folder: str, model_dir: str, output: str, *extra: str, fail: str = "", wait: bool = True):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("COVID_SPARK_FAIL_WATCH", None)
    if fail:
        env["COVID_SPARK_FAIL_WATCH"] = fail
    command = [sys.executable, os.path.join(REPO, "jobs", "predict.py"), "--watch", folder, "--model-dir", model_dir,
               "--output", output, "--max-files-per-batch", "4", "--master", "local[2]",
               "--conf", "spark.ui.enabled=false", *extra]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _written(output: str) -> list[dict]:
    """Every row of every micro-batch file, in file order."""
    import pandas as pd

    files = sorted(glob.glob(os.path.join(output, "batch-*.parquet")))
    return [row for name in files for row in pd.read_parquet(name).to_dict("records")]


def _check(rows: list[dict], expected: dict[str, str], batch: dict[str, dict]) -> None:
    paths = [row["path"] for row in rows]
    assert sorted(paths) == sorted(expected), "a file was lost or scored twice"
    for row in rows:
        word = expected[row["path"]]
        if word:
            assert word in row["error"] and row["predicted"] is None, row
        else:
            assert row["error"] == "" and row["predicted"] == batch[row["path"]]["predicted"], row
            np.testing.assert_allclose([row[p] for p in PROBABILITIES],
                                       [batch[row["path"]][p] for p in PROBABILITIES], atol=1e-5)


def test_killed_before_and_after_writing_a_batch_loses_and_repeats_nothing(spark, model_dir, tmp_path):
    folder, output = str(tmp_path / "incoming"), str(tmp_path / "scored")
    expected = _arrivals(folder)
    batch = _batch_predict(spark, folder, model_dir, str(tmp_path / "batch.parquet"))
    first = _watch(folder, model_dir, output, "--once", fail="1:after")    # dies once batch 1 is written
    assert first.returncode == 3, first.stderr[-3000:]
    assert len(glob.glob(os.path.join(output, "batch-*.parquet"))) == 2
    second = _watch(folder, model_dir, output, "--once", fail="2:before")  # batch 1 again (kept), dies in batch 2
    assert second.returncode == 3, second.stderr[-3000:]
    assert len(glob.glob(os.path.join(output, "batch-*.parquet"))) == 2
    third = _watch(folder, model_dir, output, "--once")
    assert third.returncode == 0, third.stderr[-3000:]
    _check(_written(output), expected, batch)
    assert any(row["path"].endswith("scan0001") and row["error"] == "" for row in _written(output))  # DICOM


def test_a_query_killed_mid_run_resumes_with_the_files_that_arrived_meanwhile(spark, model_dir, tmp_path):
    folder, output = str(tmp_path / "incoming"), str(tmp_path / "scored")
    expected = {p: "" for p in _images(folder, 0, 10)}
    running = _watch(folder, model_dir, output, "--trigger-seconds", "1", wait=False)
    try:
        deadline = time.time() + 300
        while not glob.glob(os.path.join(output, "batch-*.parquet")) and time.time() < deadline:
            assert running.poll() is None, running.stderr.read()[-3000:]
            time.sleep(0.2)
        assert glob.glob(os.path.join(output, "batch-*.parquet")), "no micro-batch within 300 s"
    finally:
        os.killpg(running.pid, signal.SIGKILL)                             # the query, its JVM and its workers
        running.wait()
    expected.update({p: "" for p in _images(folder, 10, 5)})               # arrive while nothing runs
    batch = _batch_predict(spark, folder, model_dir, str(tmp_path / "batch.parquet"))
    resumed = _watch(folder, model_dir, output, "--once")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _check(_written(output), expected, batch)
