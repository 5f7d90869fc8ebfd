"""The benchmark code on tiny inputs: structure and sanity of the results, never timings."""
from __future__ import annotations

import csv
import json
import math
import os

import pytest

from bench.inputs import sized_input, synthetic_input
from bench.train_bench import window_rate


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_window_rate_counts_only_the_overlap():
    # process A: steps end every 0.5 s from t=10; process B: every 1.0 s from t=11.
    a = [10.0 + 0.5 * i for i in range(12)]   # 10.0 .. 15.5
    b = [11.0 + 1.0 * i for i in range(6)]    # 11.0 .. 16.0
    rate = window_rate([a, b], warmup=2, batch_size=4)
    # window: from max(a[1]=10.5, b[1]=12.0)=12.0 to min(15.5, 16.0)=15.5
    assert rate["window_s"] == pytest.approx(3.5)
    # A inside: 12.0 .. 15.5 → 7 steps in 3.5 s → 8 images/s; B inside: 12..15 → 3 steps in 3 s → 4 images/s
    assert rate["per_process"] == pytest.approx([8.0, 4.0])
    assert rate["images_per_s"] == pytest.approx(12.0)
    assert rate["timed_steps"] == [7, 3]
    # CPU seconds at the same batch ends: A busy on 1 core, B on half a core
    cpu = window_rate([a, b], warmup=2, batch_size=4, batch_cpu=[[t - 10 for t in a], [(t - 11) / 2 for t in b]])
    assert cpu["cpu_cores_per_process"] == pytest.approx([1.0, 0.5])
    assert cpu["core_ms_per_image"] == pytest.approx(1000 * (1.0 / 8.0 + 0.5 / 4.0) / 2)


def test_window_rate_rejects_runs_that_do_not_overlap():
    with pytest.raises(ValueError, match="overlapped for fewer than two steps"):
        window_rate([[1.0, 2.0, 3.0], [10.0, 11.0, 12.0]], warmup=1, batch_size=1)
    with pytest.raises(ValueError, match="more than 3 steps"):
        window_rate([[1.0, 2.0, 3.0]], warmup=3, batch_size=1)


def test_sized_input_repeats_the_source_through_symlinks(tmp_path):
    source = synthetic_input(str(tmp_path / "src"), 5)
    folder = sized_input(source, str(tmp_path / "big"), 12)
    with open(os.path.join(folder, "manifest.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    targets = [os.path.realpath(os.path.join(folder, r["path"])) for r in rows]
    assert all(os.path.islink(os.path.join(folder, r["path"])) for r in rows)
    assert len(set(targets)) == 5                       # only the 5 source files are read
    assert [t.endswith(f"synthetic-{i % 5:04d}.jpg") for i, t in enumerate(targets)] == [True] * 12
    assert {r["patient_id"] for r in rows[5:10]} == {r["patient_id"] for r in rows[:5]}


@pytest.mark.slow
def test_bench_runs_end_to_end_on_tiny_input(spark, tmp_path):
    from covid_spark.config import load_config, override

    from bench.run import format_tables, run_benchmarks, save

    source = synthetic_input(str(tmp_path / "src"), 6)
    config = override(load_config(), "preprocess", {"image_size": 48, "min_row_groups": 2,
                                                    "val_fraction": 0.2, "test_fraction": 0.2})
    results = run_benchmarks(source, str(tmp_path / "work"), sizes=("all",), models=("compact",),
                             steps={"compact": 2}, warmup=1, read_batches=2, read_warmup=1,
                             config=config, batch_size=2, spark=spark, ranks=(2,))

    assert set(results) >= {"machine", "settings", "spark_fixed", "preprocess", "decode_profile", "read",
                            "train", "memory", "verdicts", "seconds"}
    assert results["machine"]["nproc"] >= 1 and results["machine"]["cpu_model"]
    assert [e["images"] for e in results["preprocess"]] == [6]
    for entry in results["preprocess"]:
        for key in ("single", "pair", "spark"):
            assert _positive(entry[key]["images_per_s"]), (entry["images"], key)
        assert entry["single"]["decoded"] == entry["images"] and entry["pair"]["decoded"] == entry["images"]
        assert entry["pair"]["processes"] == 2 and len(entry["pair"]["per_process"]) == 2
        assert entry["spark"]["written"] == entry["images"]
        for key in ("single", "pair", "spark"):
            cpu = entry[key]["cpu"]
            assert _positive(cpu["wall_s"]) and cpu["ours_core_s"]["total"] >= 0 and cpu["others_core_s"] >= 0
            assert set(cpu["ours_core_s"]) == {"driver", "jvm", "spark_python_workers", "other_children", "total"}
        assert _positive(entry["spark_vs_pair"]) and _positive(entry["pair_vs_single"])
    assert _positive(results["spark_fixed"]["tiny_job_s"])
    for variant in ("no_augment", "augment"):
        assert _positive(results["read"][variant]["images_per_s"])
        assert results["read"][variant]["batch_shape"] == [2, 48, 48, 3]
    (train,) = results["train"]
    assert train["model"] == "compact"
    # 1 rank is the same horovod_run as 2 ranks, left out here to keep the test under a minute
    assert "horovod_1" not in train
    for key, processes in (("horovod_2", 2), ("independent_2", 2)):
        assert train[key]["processes"] == processes
        assert len(train[key]["per_process"]) == processes
        assert all(_positive(r) for r in train[key]["per_process"])
        assert all(_positive(m) for m in train[key]["maxrss_mb"])
        assert len(train[key]["cpu_cores_per_process"]) == processes
        assert train[key]["others_share"] is None or 0 <= train[key]["others_share"] <= 1
    assert _positive(train["efficiency"])
    assert {v["goal"].split(":")[0].split(" ")[0] for v in results["verdicts"]} == {"preprocess", "read", "training"}
    assert _positive(results["memory"]["driver_python_maxrss_mb"])

    tables = format_tables(results)
    assert "| preprocess 6: Spark job, local[2] |" in tables and "| train compact: 2 Horovod ranks |" in tables
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"demo": {"kept": True}}))
    save(results, str(out))
    saved = json.loads(out.read_text())
    assert saved["demo"] == {"kept": True} and saved["bench"]["preprocess"][0]["images"] == 6
