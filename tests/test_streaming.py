"""Evaluate, the report's Grad-CAM gallery and predict stream their inputs (issue 13, parts 2 and 5).

A tiny dataset (random 64 px images, two rows per row group) and a compact model fitted for a few epochs;
every result is checked against a computation that loads whole splits the old way.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CLASSES = ["covid", "normal", "pneumonia"]
SIZE = 64


def _random_images(folder, count: int, seed: int = 0) -> list[dict]:
    """``count`` random-noise PNGs in class folders, one patient each, two sources; their manifest rows."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = CLASSES[i % 3]
        rel = os.path.join(label, f"img{i:03d}.png")
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        # Noise, so no two images are near-duplicates (which preprocess would keep in one split),
        # around a brightness that depends on the class, so even an untrained model tells some apart.
        pixels = rng.normal(60 + 70 * (i % 3), 40, (SIZE + 8 * (i % 4), SIZE, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, rel))
        rows.append({"path": rel, "label": label, "patient_id": f"p{i}", "source": "a" if i % 5 else "b"})
    with open(os.path.join(folder, "manifest.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


@pytest.fixture(scope="module")
def tiny(spark, tmp_path_factory) -> dict:
    """A preprocessed dataset of 150 images (64 px, 2 rows per row group) and a compact model fitted briefly."""
    import tensorflow as tf

    from covid_spark.config import load_config, override
    from covid_spark.data.dataset import load_split
    from covid_spark.models.registry import make_model
    from covid_spark.stages.preprocess import preprocess

    root = tmp_path_factory.mktemp("streaming")
    images = str(root / "images")
    _random_images(images, 150)
    config = override(load_config(), "preprocess", {"image_size": SIZE, "rows_per_row_group": 2, "min_row_groups": 2,
                                                    "val_fraction": 0.2, "test_fraction": 0.3})
    config = override(config, "evaluate", {"bootstrap": 50})
    dataset = str(root / "dataset")
    summary = preprocess(spark, images, dataset, config)
    model_dir = str(root / "model")
    os.makedirs(model_dir)
    tf.keras.utils.set_random_seed(3)
    model = make_model("compact", (SIZE, SIZE, 3))
    # A few epochs, so that predictions differ between images (an untrained one predicts one class).
    train = load_split(dataset, "train", fields=("image", "label"))
    model.compile(optimizer=tf.keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy")
    model.fit(train["image"].astype("float32"), train["label"].astype("int64"), epochs=6, batch_size=16, verbose=0)
    model.save(os.path.join(model_dir, "model.keras"))
    with open(os.path.join(model_dir, "run.json"), "w") as handle:
        json.dump({"model": "compact", "image_size": SIZE, "classes": CLASSES}, handle)
    return {"root": str(root), "images": images, "dataset": dataset, "summary": summary,
            "model_dir": model_dir, "config": config}


@pytest.fixture(scope="module")
def model(tiny):
    from covid_spark.data.rundir import RunDir
    from covid_spark.models.saved import load_model

    return load_model(RunDir(tiny["model_dir"]))


# ----------------------------------------------------------------------------- dataset.iter_split_batches


def test_split_batches_hold_every_row_once_with_its_image(tiny):
    from covid_spark.data.dataset import iter_split_batches, load_split

    whole = load_split(tiny["dataset"], "train", fields=("image", "label", "source"))
    batches = list(iter_split_batches(tiny["dataset"], "train", fields=("image", "label", "source"), batch_size=7))
    assert [len(b["path"]) for b in batches[:-1]] == [7] * (len(batches) - 1) and 1 <= len(batches[-1]["path"]) <= 7
    streamed = {str(p): (img, int(lab), str(src)) for b in batches
                for p, img, lab, src in zip(b["path"], b["image"], b["label"], b["source"])}
    assert sum(len(b["path"]) for b in batches) == len(streamed) == len(whole["path"])
    assert len(streamed) == tiny["summary"]["per_split"]["train"]
    for path, image, label, source in zip(whole["path"], whole["image"], whole["label"], whole["source"]):
        np.testing.assert_array_equal(streamed[str(path)][0], image)
        assert streamed[str(path)][1:] == (int(label), str(source))


def test_whole_split_reads_never_drop_rows(tiny):
    """Petastorm's make_reader(num_epochs=1) dropped the last row groups of about one read in four here."""
    from covid_spark.data.dataset import load_split

    expected = tiny["summary"]["per_split"]
    for _ in range(8):
        for split in ("train", "test"):
            assert len(load_split(tiny["dataset"], split, fields=("label",))["label"]) == expected[split]
    shards = [load_split(tiny["dataset"], "train", fields=("label",), shard=i, shard_count=3)["path"] for i in range(3)]
    assert sorted(str(p) for shard in shards for p in shard) == sorted(
        str(p) for p in load_split(tiny["dataset"], "train", fields=("label",))["path"])
    assert all(len(shard) for shard in shards)


def test_split_batches_can_read_only_some_paths(tiny):
    from covid_spark.data.dataset import iter_split_batches, load_split

    whole = load_split(tiny["dataset"], "test", fields=("image",))
    wanted = {str(whole["path"][i]): whole["image"][i] for i in (0, 5, len(whole["path"]) - 1)}
    got = [(str(p), img) for b in iter_split_batches(tiny["dataset"], "test", fields=("image",), paths=set(wanted))
           for p, img in zip(b["path"], b["image"])]
    assert sorted(p for p, _ in got) == sorted(wanted)
    for path, image in got:
        np.testing.assert_array_equal(image, wanted[path])
    assert list(iter_split_batches(tiny["dataset"], "test", paths=set())) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(iter_split_batches(tiny["dataset"], "test", batch_size=0))


def test_split_batches_memory_does_not_grow_with_the_split(tiny):
    """Peak Python allocations while streaming stay well under the split's image bytes."""
    import gc
    import tracemalloc

    from covid_spark.data.dataset import iter_split_batches, load_split

    split_bytes = load_split(tiny["dataset"], "train", fields=("image",))["image"].nbytes
    gc.collect()
    tracemalloc.start()
    try:
        rows = sum(len(b["path"]) for b in iter_split_batches(tiny["dataset"], "train", fields=("image", "label"),
                                                               batch_size=4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == tiny["summary"]["per_split"]["train"] and rows * SIZE * SIZE * 3 == split_bytes
    # The reader decodes at most a few row groups (2 rows each) ahead of one batch of 4.
    assert peak < 0.5 * split_bytes, (peak, split_bytes)


# ----------------------------------------------------------------------------- evaluate


class CountingModel:
    """A Keras model that records how many images each call gets."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.input_shape = model.input_shape

    def __call__(self, images, training=False):
        self.calls.append(len(images))
        return self.model(images, training=training)


def test_evaluate_streams_and_matches_whole_split_computation(tiny, model, monkeypatch):
    from covid_spark.data import dataset as data
    from covid_spark.stages import evaluate
    from covid_spark.data.rundir import RunDir
    from covid_spark.evaluation.metrics import (bootstrap_ci, expected_calibration_error, fit_temperature, metrics_by_group,
                                     softmax)

    # Independent: whole splits in memory (the old way), one model call per split.
    test = data.load_split(tiny["dataset"], "test", fields=("image", "label", "source"))
    val = data.load_split(tiny["dataset"], "val", fields=("image", "label"))
    probs = model(test["image"].astype("float32"), training=False).numpy().astype(np.float64)
    val_probs = model(val["image"].astype("float32"), training=False).numpy()
    y = test["label"].astype(int)

    counting = CountingModel(model)
    monkeypatch.setattr(evaluate, "load_model", lambda run: counting)

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate must not load a whole split")

    monkeypatch.setattr(data, "load_split", refuse)
    from covid_spark.config import override

    config = override(tiny["config"], "evaluate", {"audit": False})  # the audit scores the images again
    metrics = evaluate.evaluate(tiny["dataset"], tiny["model_dir"], config, "test", overwrite=True)
    assert counting.calls and max(counting.calls) <= 32
    assert sum(counting.calls) == len(y) + len(val["label"])

    with open(os.path.join(tiny["model_dir"], "metrics.json")) as handle:
        assert json.load(handle) == json.loads(json.dumps(metrics))
    pred = probs.argmax(1)
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (y, pred), 1)
    assert metrics["n"] == len(y) and metrics["confusion_matrix"] == cm.tolist()
    assert len(set(pred)) > 1  # the check below would be weak on a one-class model
    assert metrics["accuracy"] == pytest.approx(float((pred == y).mean()), abs=1e-12)
    loss = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)))
    assert metrics["loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["predictions"]["path"] == [str(p) for p in test["path"]] == sorted(metrics["predictions"]["path"])
    assert metrics["predictions"]["label"] == y.tolist()
    np.testing.assert_allclose(metrics["predictions"]["probs"], probs, atol=1e-6)
    sources = np.array([s or "unknown" for s in test["source"]])
    assert metrics["predictions"]["source"] == sources.tolist()
    assert metrics["ece"] == pytest.approx(expected_calibration_error(y, probs), abs=1e-6)
    expected_by_source = metrics_by_group(y, probs, sources, CLASSES)
    assert set(metrics["per_source"]) == {"a", "b"}
    for source, values in expected_by_source.items():
        assert metrics["per_source"][source]["confusion_matrix"] == values["confusion_matrix"]
    ci = bootstrap_ci(y, probs, CLASSES, n_boot=50, seed=int(tiny["config"]["train"]["seed"]))
    assert metrics["ci95"]["macro_f1"] == pytest.approx(ci["macro_f1"], abs=1e-6)
    temperature = fit_temperature(np.log(np.clip(val_probs, 1e-7, 1.0)), val["label"].astype(int))
    assert metrics["temperature"] == pytest.approx(temperature, rel=1e-4)
    scaled = expected_calibration_error(y, softmax(np.log(np.clip(probs, 1e-7, 1.0)), temperature))
    assert metrics["ece_temperature_scaled"] == pytest.approx(scaled, abs=1e-5)


def test_gradcam_gallery_reads_only_its_examples(tiny, model, monkeypatch, tmp_path):
    from PIL import Image

    from covid_spark.data import dataset as data
    from covid_spark.stages.evaluate import evaluate
    from covid_spark.evaluation.explain import grad_cam, overlay
    from covid_spark.stages.report import gradcam_gallery, pick_examples

    metrics = evaluate(tiny["dataset"], tiny["model_dir"], tiny["config"], "test", overwrite=True)
    whole = data.load_split(tiny["dataset"], "test", fields=("image",))
    requested = []
    streaming = data.iter_split_batches

    def spy(*args, **kwargs):
        requested.append(kwargs.get("paths"))
        return streaming(*args, **kwargs)

    from covid_spark.stages import report

    monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("the gallery must not load a whole split"))
    monkeypatch.setattr(report, "iter_split_batches", spy)  # the name the gallery reads through
    items, layer = gradcam_gallery(model, tiny["dataset"], metrics, str(tmp_path / "gradcam"))

    probs = np.array(metrics["predictions"]["probs"])
    index = pick_examples(np.array(metrics["predictions"]["label"]), probs.argmax(1))
    assert layer == "stage2_conv2" and len(items) == len(index) > 0
    assert len(requested) == 1 and requested[0] == {str(whole["path"][i]) for i in index}
    maps = grad_cam(model, whole["image"][index], layer_name=layer)
    for item, i, heat in zip(items, index, maps):
        assert os.path.basename(str(whole["path"][i])) in item["caption"]
        with Image.open(item["png"]) as im:
            np.testing.assert_array_equal(np.asarray(im), overlay(whole["image"][i], heat))


# ----------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def new_images(tiny, tmp_path_factory) -> dict:
    """A flat folder of 20 readable images, 3 unreadable files and one skipped by name."""
    folder = tmp_path_factory.mktemp("new")
    rows = _random_images(str(folder / "src"), 20, seed=7)
    flat = folder / "flat"
    flat.mkdir()
    for i, row in enumerate(rows):
        os.rename(folder / "src" / row["path"], flat / f"{'zyxwvutsrqponmlkjihgfedcba'[i]}-{i}.png")
    (flat / "empty.png").write_bytes(b"")
    (flat / "page.jpg").write_text("<html><body>404</body></html>")
    (flat / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (flat / ".DS_Store").write_bytes(b"")
    return {"folder": str(flat), "readable": sorted(str(flat / f) for f in os.listdir(flat) if f.endswith("png")
                                                    and f != "empty.png"),
            "unreadable": [str(flat / f) for f in ("broken.jpg", "empty.png", "page.jpg")],
            "skipped": [str(flat / ".DS_Store")]}


def _expected_probs(model, paths, size=SIZE):
    from covid_spark.inputs.images import read_image

    images = np.stack([read_image(p, size, 50_000_000).image for p in paths])
    return model(images.astype("float32"), training=False).numpy()


@pytest.mark.parametrize("extension", ["csv", "parquet"])
def test_predict_writes_one_row_per_file_in_path_order(spark, tiny, model, new_images, tmp_path, monkeypatch,
                                                        extension):
    from covid_spark.stages import predict as P

    # Five partitions on two cores: rows must still come back in path order.
    monkeypatch.setattr(P, "partition_count", lambda files, parallelism: 5)
    out = str(tmp_path / f"pred.{extension}")
    result = P.predict(spark, new_images["folder"], tiny["model_dir"], out, tiny["config"], batch_size=4)
    if extension == "csv":
        with open(out, newline="") as handle:
            reader = csv.reader(handle)
            assert next(reader) == P.COLUMNS
            rows = [dict(zip(P.COLUMNS, r)) for r in reader]
        for r in rows:
            for key in ("predicted", "p_covid", "p_normal", "p_pneumonia"):
                r[key] = (float(r[key]) if key.startswith("p_") else r[key]) if r[key] != "" else None
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert table.column_names == P.COLUMNS
        rows = table.to_pylist()
    everything = new_images["readable"] + new_images["unreadable"] + new_images["skipped"]
    assert [r["path"] for r in rows] == sorted(everything)
    assert result["inputs"] == result["rows"] == len(everything) and result["partitions"] == 5
    assert result["errors"] == 4 and result["predicted"] == len(new_images["readable"])
    by_path = {r["path"]: r for r in rows}
    expected = _expected_probs(model, new_images["readable"])
    for path, probs in zip(new_images["readable"], expected):
        r = by_path[path]
        assert r["error"] == "" and r["predicted"] == CLASSES[int(probs.argmax())]
        np.testing.assert_allclose([r["p_covid"], r["p_normal"], r["p_pneumonia"]], probs, atol=1e-6)
    for path in new_images["unreadable"] + new_images["skipped"]:
        r = by_path[path]
        assert r["error"] and r["predicted"] is None and r["p_covid"] is None
    assert "HTML" in by_path[os.path.join(new_images["folder"], "page.jpg")]["error"]
    assert sorted(os.listdir(tmp_path)) == [f"pred.{extension}"]  # no temporary file left


def test_predict_accepts_a_list_of_inputs(spark, tiny, new_images, tmp_path):
    from covid_spark.stages.predict import predict

    out = str(tmp_path / "pred.csv")
    result = predict(spark, [new_images["folder"]], tiny["model_dir"], out, tiny["config"])
    with open(out, newline="") as handle:
        paths = [r["path"] for r in csv.DictReader(handle)]
    assert result["rows"] == len(paths) == 24 and paths == sorted(paths)


def test_predict_refuses_to_overwrite_when_asked(spark, tiny, new_images, tmp_path):
    from covid_spark.stages.predict import predict

    out = tmp_path / "pred.csv"
    out.write_text("old")
    with pytest.raises(FileExistsError, match="already exists: pass --overwrite"):
        predict(spark, new_images["folder"], tiny["model_dir"], str(out), tiny["config"], overwrite=False)
    with pytest.raises(FileExistsError, match="already exists: pass --overwrite"):
        predict(spark, new_images["folder"], tiny["model_dir"], str(out), tiny["config"])  # the default
    assert out.read_text() == "old"


@pytest.mark.parametrize("extension", ["csv", "parquet"])
def test_table_appears_only_when_complete(tmp_path, extension):
    from covid_spark.stages.predict import write_table

    out = tmp_path / f"t.{extension}"
    row = ("/x/a.png", "covid", 0.5, 0.25, 0.25, "")

    def rows(n, fail_at=None):
        for i in range(n):
            assert not out.exists() or out.read_bytes() == b"old"  # nothing visible while writing
            if i == fail_at:
                raise OSError("disk full")
            yield (f"/x/{i:04d}.png",) + row[1:]

    assert write_table(rows(10), str(out), rows_per_group=3) == 10
    if extension == "parquet":
        import pyarrow.parquet as pq

        assert pq.ParquetFile(out).metadata.num_row_groups == 4  # 3 + 3 + 3 + 1: written as they came
        assert pq.read_table(out).column("path").to_pylist() == [f"/x/{i:04d}.png" for i in range(10)]
    out.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        write_table(rows(10, fail_at=7), str(out), rows_per_group=3)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == [out.name]
    out.unlink()
    assert write_table(iter(()), str(out)) == 0
    if extension == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).num_rows == 0 and pq.read_table(out).column_names[0] == "path"
    else:
        assert out.read_text().splitlines() == [",".join(["path", "predicted", "p_covid", "p_normal", "p_pneumonia",
                                                           "error"])]


def test_partitions_in_order(spark):
    from covid_spark.stages.predict import partitions_in_order

    sc = spark.sparkContext
    assert list(partitions_in_order(sc.parallelize(range(100), 7), 3)) == list(range(100))
    assert list(partitions_in_order(sc.parallelize([], 2), 2)) == []

    def boom(x):
        if x == 61:
            raise ValueError("bad record 61")
        return x

    with pytest.raises(Exception, match="bad record 61"):
        list(partitions_in_order(sc.parallelize(range(100), 7).map(boom), 2))


def test_partition_count():
    from covid_spark.stages.predict import partition_count

    assert partition_count(1, 2) == 1
    assert partition_count(1000, 2) == 2
    assert partition_count(17445, 2) == 8
    assert partition_count(17445, 16) == 16


# ----------------------------------------------------------------------------- across datasets


def test_evaluate_another_dataset_without_near_copies_of_the_training_data(spark, tiny, tmp_path):
    """--split all on another dataset, dropping near-copies of the model's train/val images by their stored hashes."""
    import shutil

    from covid_spark.data.dataset import load_split
    from covid_spark.stages.evaluate import evaluate
    from covid_spark.stages.preprocess import preprocess

    other = tmp_path / "other"
    _random_images(str(other), 30, seed=11)                     # new images: none is a copy
    seen = load_split(tiny["dataset"], "train", fields=("label",))
    copied = {}
    for i, (path, label) in enumerate(zip(seen["path"][:7], seen["label"][:7])):
        name = CLASSES[int(label)]
        target = other / name / f"copy{i}.png"
        shutil.copy(str(path), target)                          # a byte copy of a training image
        copied[str(target)] = name
    with open(other / "manifest.csv", "a", newline="") as handle:
        csv.writer(handle).writerows([[os.path.relpath(p, other), lab, f"c{i}", "a"]
                                      for i, (p, lab) in enumerate(copied.items())])
    dataset = str(tmp_path / "other-ds")
    summary = preprocess(spark, str(other), dataset, tiny["config"])
    assert summary["written"] == 37

    output = str(tmp_path / "metrics_other.json")
    metrics = evaluate(dataset, tiny["model_dir"], tiny["config"], split="all",
                       exclude_near_copies_of=tiny["dataset"], output=output)
    near = metrics["near_copies"]
    assert near["dropped"] == 7 and near["kept"] == 30
    expected_dropped = {c: sum(1 for lab in copied.values() if lab == c) for c in CLASSES}
    assert near["dropped_per_class"] == expected_dropped
    assert near["kept_per_class"] == {c: 10 for c in CLASSES}  # _random_images: i % 3 per class
    assert metrics["n"] == 30 and not set(metrics["predictions"]["path"]) & set(copied)
    assert "temperature" not in metrics                        # another dataset's val is not this model's
    with open(output) as handle:
        assert json.load(handle)["near_copies"]["dropped"] == 7
    everything = evaluate(dataset, tiny["model_dir"], tiny["config"], split="all", output=str(tmp_path / "all.json"))
    assert everything["n"] == 37 and "near_copies" not in everything


def test_evaluate_gives_the_patient_wise_part_and_each_input_alone(spark, tiny, tmp_path):
    """Two inputs, one without patient ids: ``per_input`` and ``patient_wise`` hold the metrics of
    exactly the images we put there (checked from the per-image predictions, grouped by file name)."""
    from covid_spark.stages.evaluate import evaluate
    from covid_spark.evaluation.metrics import classification_metrics
    from covid_spark.stages.preprocess import preprocess

    with_ids, without = tmp_path / "clinic", tmp_path / "archive"
    _random_images(str(with_ids), 24, seed=5)                     # sources a and b, one patient each
    rows = _random_images(str(without), 18, seed=6)
    with open(without / "manifest.csv", "w", newline="") as handle:  # source c, no patient ids
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([dict(row, patient_id="", source="c") for row in rows])
    dataset = str(tmp_path / "two-ds")
    summary = preprocess(spark, [str(with_ids), str(without)], dataset, tiny["config"])
    assert summary["per_input_source"] == [{"a": 19, "b": 5}, {"c": 18}]
    metrics = evaluate(dataset, tiny["model_dir"], tiny["config"], split="all", output=str(tmp_path / "m.json"))

    paths = np.array(metrics["predictions"]["path"])
    y = np.array(metrics["predictions"]["label"])
    probs = np.array(metrics["predictions"]["probs"])
    in_archive = np.array([p.startswith(str(without) + os.sep) for p in paths])
    assert in_archive.sum() == 18 and (~in_archive).sum() == 24
    assert set(metrics["per_input"]) == {"clinic", "archive"}
    for name, keep in (("archive", in_archive), ("clinic", ~in_archive)):
        expected = classification_metrics(y[keep], probs[keep], CLASSES)
        assert metrics["per_input"][name]["n"] == keep.sum()
        assert metrics["per_input"][name]["confusion_matrix"] == expected["confusion_matrix"]
        assert "macro_f1" in metrics["per_input"][name]["ci95"]
    wise = metrics["patient_wise"]
    expected = classification_metrics(y[~in_archive], probs[~in_archive], CLASSES)
    assert wise["n"] == 24 and wise["sources"] == ["a", "b"]
    assert wise["confusion_matrix"] == expected["confusion_matrix"]
    assert wise["macro_f1"] == pytest.approx(expected["macro_f1"])
    # One input, all with ids: neither part is added.
    alone = evaluate(tiny["dataset"], tiny["model_dir"], tiny["config"], "test", output=str(tmp_path / "alone.json"))
    assert "per_input" not in alone and "patient_wise" not in alone
