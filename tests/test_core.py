"""The training core (covid_spark.training.core): the learning-rate schedule against hand-computed values and
Horovod's own warm-up, early stopping with the best weights restored, the checkpoint round trip, and
fit_model in one process; the launcher registry (covid_spark.engines.base). No Horovod ranks, no Spark."""
from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from covid_spark.training import core  # noqa: E402
from covid_spark.data.rundir import RunDir  # noqa: E402


def tiny_model(seed: int = 0):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, activation="softmax")])


def test_schedule_rates_are_the_hand_computed_ones():
    # peak 0.004 for 2 ranks, 2 warm-up epochs, 10 epochs of 4 steps
    s = core.LearningRateSchedule(0.004, ranks=2, warmup_epochs=2, schedule="cosine", epochs=10, steps_per_epoch=4)
    # warm-up: peak / ranks × (1 + (ranks - 1) × e / W), e = epoch + (batch + 1) / steps
    assert s.rate(0, 0) == pytest.approx(0.002 * (1 + 0.25 / 2))      # 0.00225
    assert s.rate(1, 1) == pytest.approx(0.002 * (1 + 1.5 / 2))       # 0.0035
    assert s.rate(1, 3) == pytest.approx(0.004)                        # the peak at the warm-up's last step
    # cosine from epoch 2 to 10: peak × (0.02 + 0.98 (1 + cos(π p)) / 2)
    assert s.rate(2, 0) == pytest.approx(0.004)
    assert s.rate(6, 0) == pytest.approx(0.004 * (0.02 + 0.98 * 0.5))  # half way: p = 0.5
    assert s.rate(9, 2) == pytest.approx(0.004 * (0.02 + 0.49 * (1 + math.cos(math.pi * 7.5 / 8))))
    assert s.rate(10, 0) is None                                        # past the last epoch: left alone
    constant = core.LearningRateSchedule(0.004, 2, 2, "constant", 10, 4)
    assert constant.rate(0, 0) == s.rate(0, 0) and constant.rate(2, 0) is None and constant.rate(9, 3) is None
    one_rank = core.LearningRateSchedule(0.001, 1, 3, "cosine", 5, 7)
    assert all(one_rank.rate(e, b) == pytest.approx(0.001) for e in range(3) for b in range(7))
    no_warmup = core.LearningRateSchedule(0.001, 2, 0, "cosine", 4, 2)
    assert no_warmup.rate(0, 0) == pytest.approx(0.001) and no_warmup.rate(2, 0) == pytest.approx(0.001 * 0.51)


def test_warmup_is_horovods_to_the_last_bit(monkeypatch):
    impl = pytest.importorskip("horovod._keras.callbacks", reason="Horovod is not installed (the current stack has none)")
    monkeypatch.setattr(impl.hvd, "size", lambda: 4)
    peak, steps, warmup = 0.0032, 7, 3
    horovod = impl.LearningRateWarmupCallbackImpl(None, peak, warmup_epochs=warmup, steps_per_epoch=steps)
    ours = core.LearningRateSchedule(peak, 4, warmup, "cosine", 12, steps)
    for epoch in range(warmup):
        for batch in range(steps):
            assert ours.rate(epoch, batch) == peak * horovod.multiplier(epoch + float(batch) / steps)


def test_fit_model_sets_the_rate_every_step_and_logs_it(monkeypatch):
    seen = []
    set_rate = core.LearningRateSchedule.on_train_batch_begin

    def and_record(self, batch, logs=None):
        set_rate(self, batch, logs)
        seen.append(float(tf.keras.backend.get_value(self.model.optimizer.lr)))

    monkeypatch.setattr(core.LearningRateSchedule, "on_train_batch_begin", and_record)
    x = np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(24) % 3)).repeat().batch(8)
    out = core.fit_model(tiny_model(), data, epochs=3, steps_per_epoch=3, learning_rate=0.01, ranks=2,
                         warmup_epochs=1, lr_schedule="cosine")
    schedule = core.LearningRateSchedule(0.01, 2, 1, "cosine", 3, 3)
    expected = [float(np.float32(schedule.rate(e, b))) for e in range(3) for b in range(3)]
    assert seen == expected  # as the float32 variable holds them
    assert out["history"]["lr"] == expected[2::3]  # the rate of each epoch's last step
    assert set(out["history"]) == {"loss", "accuracy", "lr", "seconds"} and out["best_epoch"] is None


def test_fit_model_traces_the_train_step_once_and_trains_as_plain_keras():
    x = np.random.default_rng(1).normal(size=(24, 4)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, np.arange(24) % 3)).repeat().batch(8)
    model = tiny_model(seed=3)
    out = core.fit_model(model, data, epochs=3, steps_per_epoch=3, learning_rate=0.01, ranks=1,
                         warmup_epochs=0, lr_schedule="constant")
    # Keras left to create the optimizer's slots and the metrics inside the first step traces it twice
    assert model.train_function.experimental_get_tracing_count() == 1
    plain = tiny_model(seed=3)
    plain.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    keras = plain.fit(data, steps_per_epoch=3, epochs=3, verbose=0).history
    assert plain.train_function.experimental_get_tracing_count() == 2
    assert out["history"]["loss"] == pytest.approx(keras["loss"], rel=1e-6)
    assert out["history"]["accuracy"] == keras["accuracy"]


def test_best_weights_stop_after_patience_and_restore_the_best():
    model = tiny_model()
    best = core.BestWeights(patience=2)
    best.set_model(model)
    weights_at = {}
    for epoch, val_loss in enumerate([1.0, 0.7, 0.8, 0.75, 0.6]):
        model.set_weights([np.full_like(w, epoch) for w in model.get_weights()])
        weights_at[epoch] = model.get_weights()
        best.on_epoch_end(epoch, {"val_loss": val_loss})
        if model.stop_training:
            break
    assert epoch == 3 and best.best_epoch == 1  # two epochs (2, 3) without a loss below 0.7
    best.on_train_end()
    for got, want in zip(model.get_weights(), weights_at[1]):
        np.testing.assert_array_equal(got, want)
    model.stop_training = False
    never = core.BestWeights(patience=0)
    never.set_model(model)
    for epoch, val_loss in enumerate([0.5, 0.9, 0.9, 0.9]):
        never.on_epoch_end(epoch, {"val_loss": val_loss})
    assert not model.stop_training and never.best_epoch == 0
    silent = core.BestWeights(patience=1)  # no validation data: nothing kept, nothing restored
    silent.set_model(model)
    silent.on_epoch_end(0, {"loss": 1.0})
    assert silent.weights is None and silent.best_epoch is None


def test_checkpoint_round_trip(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    model = tiny_model(seed=1)
    history = {"loss": [0.9, 0.8], "val_loss": [1.0, 0.95]}
    checkpoint = core.Checkpoint(run.checkpoints, "compact", history)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(1, {})
    with open(run.checkpoint_state, encoding="utf-8") as handle:
        state = json.load(handle)
    assert state == {"epoch": 2, "model": "compact", "history": history}
    assert sorted(os.listdir(run.checkpoints)) == sorted([os.path.basename(run.checkpoint_state),
                                                          os.path.basename(run.checkpoint_weights)])
    other = tiny_model(seed=2)
    other.load_weights(run.checkpoint_weights)
    for got, want in zip(other.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_fit_model_keeps_the_best_epoch_and_checkpoints(tmp_path):
    model = tiny_model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    train = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(10)
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    said = []
    out = core.fit_model(model, train, epochs=3, steps_per_epoch=3, learning_rate=0.05, ranks=1, warmup_epochs=0,
                         lr_schedule="constant", val_ds=val, checkpoint_dir=str(tmp_path / "ckpt"),
                         model_name="tiny", say=said.append, history={"loss": [9.0]}, initial_epoch=1)
    assert len(out["history"]["loss"]) == 3 and out["history"]["loss"][0] == 9.0  # resumed history, extended
    assert out["best_epoch"] == 2 + int(np.argmin(out["history"]["val_loss"]))  # epochs 2 and 3 ran
    assert [line.split()[1] for line in said] == ["2/3", "3/3"]
    with open(tmp_path / "ckpt" / os.path.basename(RunDir("x").checkpoint_state), encoding="utf-8") as handle:
        assert json.load(handle)["epoch"] == 3


def test_the_engine_registry_names_both_engines_and_horovods_launcher_passes_run_trainings_arguments(monkeypatch):
    from covid_spark.engines import registry as launch

    assert set(launch.ENGINES) == {"horovod", "tf-distribute"}
    hvd_spark = pytest.importorskip("horovod.spark", reason="Horovod is not installed (the current stack has none)")
    calls = []
    monkeypatch.setattr(hvd_spark, "run", lambda fn, **kwargs: calls.append((fn, kwargs)) or [{"rank": 0}])

    class Context:
        defaultParallelism, pythonExec = 2, "/venv/python"

        def getConf(self):
            return {}

    class Spark:
        sparkContext = Context()

    def fn(job):
        return job

    job = types.SimpleNamespace(threads=3)
    assert launch.ENGINES["horovod"].launcher(Spark()).run(fn, job, 2) == [{"rank": 0}]
    (got_fn, kwargs), = calls
    assert got_fn is fn and kwargs["args"] == (job,) and kwargs["num_proc"] == 2
    assert kwargs["use_gloo"] and not kwargs["use_mpi"] and kwargs["executable"] == "/venv/python"
    assert kwargs["env"]["OMP_NUM_THREADS"] == "3" and kwargs["start_timeout"] == 600
