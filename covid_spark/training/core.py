"""The training core: one ``fit_model`` and its callbacks, for the train stage's ranks and for cross-validation.

``covid_spark.stages.train.train_fn`` (each rank of the train job) and ``covid_spark.stages.crossval.train_fold`` (one
process) both train through :func:`fit_model`: the same optimizer (Adam), loss, learning-rate schedule
(linear warm-up, then cosine to 2 % of the peak or constant), early stopping on the val loss with the
best weights restored, per-epoch history, and (when given a folder) a checkpoint per epoch.

What a distributed engine adds is injected through a :class:`Distribution`: the rank and size, a
wrapper of the optimizer and the callbacks that must come first (for Horovod, in
``covid_spark.engines.base``: ``hvd.DistributedOptimizer``, the broadcast of rank 0's initial weights and
the averaging of the epoch's metrics over the ranks). :data:`SINGLE_PROCESS` adds nothing.

This module imports TensorFlow (its callbacks subclass Keras's), so it is imported only where a
model is trained, never by the command-line paths; ``covid_spark.training.weights`` holds what needs no
TensorFlow (the class weights). It imports no stage, no Spark and no Horovod.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Callable, ContextManager, Protocol

import tensorflow as tf

from covid_spark.data.rundir import CHECKPOINT_STATE, CHECKPOINT_WEIGHTS


class Distribution(Protocol):
    """What a distributed engine injects into :func:`fit_model` on one rank."""

    rank: int
    size: int
    # Reading the weights is a collective (tf-distribute), so every rank must save when rank 0 does.
    every_rank_saves: bool
    # The rank's datasets go through :meth:`distribute` (a strategy's input); Keras cannot apply
    # ``class_weight`` to such a dataset, so fit_model turns the class weights into sample weights first
    # (the same numbers: Keras's class_weight is a per-sample weight gathered by label).
    distributes_datasets: bool

    def distribute(self, dataset):
        """The rank's dataset as the engine takes it (the dataset itself where nothing is needed)."""

    def optimizer(self, optimizer):
        """The optimizer every rank steps with (e.g. one that averages the gradients over the ranks)."""

    def callbacks(self) -> list:
        """Callbacks run before the core's own (e.g. the broadcast of rank 0's initial weights and the
        averaging of the epoch's metrics, which early stopping and the history then read)."""

    def scope(self) -> ContextManager:
        """Where the model is built and compiled (a ``tf.distribute`` strategy's scope; else nothing)."""


class SingleProcess:
    """One process, no engine: rank 0 of 1, the optimizer as it is, no callbacks."""

    rank, size = 0, 1
    every_rank_saves = False
    distributes_datasets = False

    def distribute(self, dataset):
        return dataset

    def optimizer(self, optimizer):
        return optimizer

    def callbacks(self) -> list:
        return []

    def scope(self) -> ContextManager:
        return contextlib.nullcontext()


SINGLE_PROCESS = SingleProcess()


class LearningRateSchedule(tf.keras.callbacks.Callback):
    """Set the optimizer's learning rate at the start of every batch, from :meth:`rate`.

    The values are those of Horovod's ``LearningRateWarmupCallback`` followed by its
    ``LearningRateScheduleCallback`` with a cosine multiplier (``staircase=False``), to the last bit:
    the same expressions in the same order, without Horovod (so tf-distribute and cross-validation
    share it).
    """

    def __init__(self, peak: float, ranks: int, warmup_epochs: int, schedule: str, epochs: int,
                 steps_per_epoch: int):
        super().__init__()
        self.peak, self.ranks, self.warmup_epochs = peak, ranks, warmup_epochs
        self.schedule, self.epochs, self.steps_per_epoch = schedule, epochs, steps_per_epoch
        self.epoch = 0

    def rate(self, epoch: int, batch: int) -> float | None:
        """The learning rate of ``batch`` (0-based) of ``epoch`` (0-based), or None to leave it as it is.

        Warm-up (epochs ``0 .. warmup_epochs - 1``): linear in the fractional epoch, from
        ``peak / ranks`` to ``peak`` at the last batch of the warm-up (Goyal et al.; with one rank the
        rate is the peak throughout). Then ``cosine``: ``peak × (0.02 + 0.98 × (1 + cos(π p)) / 2)``
        with ``p`` the fractional epoch's progress from ``warmup_epochs`` to ``epochs``; or
        ``constant``: None, the rate stays where the warm-up left it (the peak, or the optimizer's
        initial rate, the peak, after a resume).
        """
        steps = self.steps_per_epoch
        if epoch < self.warmup_epochs:
            at = epoch + float(batch) / steps
            at += 1. / steps  # as Horovod: round numbers at each epoch's end
            return self.peak * (1. / self.ranks * (at * (self.ranks - 1) / self.warmup_epochs + 1))
        if self.schedule == "cosine" and self.warmup_epochs <= epoch < self.epochs:
            at = epoch + float(batch) / steps
            start, end = self.warmup_epochs, self.epochs
            progress = min(1.0, max(0.0, (at - start) / (end - start)))
            return self.peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))  # 2 % of the peak at the end
        return None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        rate = self.rate(self.epoch, batch)
        if rate is not None:
            tf.keras.backend.set_value(self.model.optimizer.lr, rate)


class BestWeights(tf.keras.callbacks.Callback):
    """Keep the weights of the epoch with the lowest val_loss (as the logs hold it: rank-averaged under
    Horovod); stop after ``patience`` epochs without a lower one (0: never); restore the best at the end.

    Does nothing without a val_loss (no validation data): the final weights are kept.
    """

    def __init__(self, patience: int):
        super().__init__()
        self.patience, self.best, self.best_epoch, self.weights, self.wait = patience, math.inf, None, None, 0

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get("val_loss")
        if current is None:
            return
        if current < self.best:
            self.best, self.best_epoch, self.weights, self.wait = current, epoch, self.model.get_weights(), 0
        else:
            self.wait += 1
            if self.patience and self.wait >= self.patience:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


class EpochLog(tf.keras.callbacks.Callback):
    """Append each epoch's logs, the learning rate (``lr``) and the wall seconds (``seconds``) to
    ``history`` (key → list), and pass a one-line summary to ``say`` (None: silent)."""

    def __init__(self, history: dict[str, list], epochs: int, say: Callable[[str], None] | None = None):
        super().__init__()
        self.history, self.epochs, self.say = history, epochs, say
        self.started = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        logs["lr"] = float(tf.keras.backend.get_value(self.model.optimizer.lr))
        logs["seconds"] = time.time() - self.started
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        if self.say is not None:
            self.say(f"epoch {epoch + 1}/{self.epochs} " + " ".join(
                f"{k}={v:.4f}" for k, v in logs.items() if k not in ("seconds",))
                + f" ({logs['seconds']:.0f} s)")


class Checkpoint(tf.keras.callbacks.Callback):
    """After every epoch, replace ``folder``'s checkpoint (a run's ``RunDir.checkpoints``): the weights,
    then the state ``{"epoch": epochs done, "model": model_name, "history": history}``, each written to
    a temporary file and renamed, so a crash leaves the previous checkpoint whole. ``--resume`` reads
    them back (``covid_spark.stages.train``)."""

    def __init__(self, folder: str, model_name: str, history: dict[str, list]):
        super().__init__()
        self.folder, self.model_name, self.history = folder, model_name, history

    def on_epoch_end(self, epoch, logs=None):
        folder = self.folder
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".last-{os.getpid()}.weights.h5")
        self.model.save_weights(tmp)
        os.replace(tmp, os.path.join(folder, CHECKPOINT_WEIGHTS))
        state = {"epoch": epoch + 1, "model": self.model_name, "history": self.history}
        tmp_state = os.path.join(folder, f".{CHECKPOINT_STATE}.tmp")
        with open(tmp_state, "w") as handle:
            json.dump(state, handle)
        os.replace(tmp_state, os.path.join(folder, CHECKPOINT_STATE))


def with_class_weights(dataset, class_weight: dict | None):
    """``(image, label)`` batches → ``(image, label, weight)`` with each sample's weight its class's,
    as Keras's ``class_weight`` computes it (``dataset`` unchanged when ``class_weight`` is None)."""
    if not class_weight:
        return dataset
    table = tf.constant([float(class_weight.get(i, 1.0)) for i in range(max(class_weight) + 1)],
                        dtype=tf.keras.backend.floatx())
    return dataset.map(lambda image, label: (image, label, tf.gather(table, tf.cast(label, tf.int32))))


def build_for_fit(model) -> None:
    """Create the compiled model's optimizer slots and metric variables now, outside ``fit``.

    Keras creates them inside the first train step; a ``tf.function`` that creates variables is traced
    twice, so building them first halves the first epoch's tracing (the same values either way: slots
    start at zero, metrics are reset every epoch). Needs the ``scope()`` the model was built in.
    """
    model.optimizer.build(model.trainable_variables)
    classes = model.output_shape[-1]
    y_pred, y_true = tf.zeros((1, classes)), tf.zeros((1,), tf.int64)
    model.compiled_loss.build(y_pred)
    model.compiled_metrics.build(y_pred, y_true)


def fit_model(model, train_ds, *, epochs: int, steps_per_epoch: int, learning_rate: float, ranks: int,
              warmup_epochs: int, lr_schedule: str, val_ds=None, class_weight: dict | None = None,
              patience: int = 0, initial_epoch: int = 0, history: dict[str, list] | None = None,
              distribution: Distribution = SINGLE_PROCESS, checkpoint_dir: str | None = None,
              model_name: str | None = None, say: Callable[[str], None] | None = None,
              validation_steps: int | None = None) -> dict:
    """Compile ``model`` (Adam at ``learning_rate``, sparse cross-entropy, accuracy) and fit it on the
    endless ``train_ds`` for ``epochs`` × ``steps_per_epoch`` steps, with the callbacks above.

    ``learning_rate`` is the peak (already scaled for ``ranks`` ranks: the warm-up climbs from
    ``learning_rate / ranks``). ``history`` (from a checkpoint, when resuming at ``initial_epoch``) is
    extended in place. ``validation_steps``: batches of ``val_ds`` per epoch (None: until it ends; a
    distributed dataset needs a number). ``checkpoint_dir``: write a checkpoint there after every epoch (give it on one
    rank only). The model ends with the best epoch's weights when ``val_ds`` is given, else the last.

    Returns:
        ``{"history": key → per-epoch values, "best_epoch": 1-based epoch of the lowest val loss or None}``.
    """
    history = {} if history is None else history
    if distribution.distributes_datasets:
        train_ds = distribution.distribute(with_class_weights(train_ds, class_weight))
        val_ds = None if val_ds is None else distribution.distribute(val_ds)
        class_weight = None
    model.compile(optimizer=distribution.optimizer(tf.keras.optimizers.Adam(learning_rate)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    build_for_fit(model)
    best = BestWeights(patience)
    callbacks = distribution.callbacks() + [
        LearningRateSchedule(learning_rate, ranks, warmup_epochs, lr_schedule, epochs, steps_per_epoch),
        best,
        EpochLog(history, epochs, say),
    ]
    if checkpoint_dir:
        callbacks.append(Checkpoint(checkpoint_dir, model_name, history))
    model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=epochs, initial_epoch=initial_epoch,
              validation_data=val_ds, validation_steps=validation_steps, class_weight=class_weight,
              callbacks=callbacks, verbose=0)
    return {"history": history, "best_epoch": None if best.best_epoch is None else best.best_epoch + 1}
