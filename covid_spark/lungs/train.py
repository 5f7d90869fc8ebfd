"""Train the lung segmenter on the drawn masks; write its weights and a JSON of held-out Dice.

    python -m covid_spark.lungs.train --masks ../shared/data/lung-masks --images ../shared/data/cxr3 \\
        --out covid_spark/lungs/weights/unet128

writes ``unet128.npz`` (weights, see :mod:`covid_spark.lungs.model`) and ``unet128.json`` beside it:
the command, seed, epochs, the patient-wise split, Dice on every held-out image at its native size,
the training wall time and the date. The same arguments give the same split and (on one machine and
TensorFlow version, with op determinism on) the same weights.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time

import numpy as np
from scipy import ndimage

from covid_spark.lungs.data import load_training_arrays, read_manifest, read_pair, split_by_patient
from covid_spark.lungs.masks import dice
from covid_spark.lungs.model import DEFAULT_BASE_FILTERS, DEFAULT_DEPTH, DEFAULT_SIZE, save_weights_npz

log = logging.getLogger(__name__)

# Augmentation ranges. Zooming out to 0.75 shows the film with more around the lungs, as children's
# films (arms, neck, belly in view) and NIH's wider fields do; the drawn masks hold only adults.
ROTATION_DEGREES = 10.0
SCALE_RANGE = (0.75, 1.15)
SHIFT_FRACTION = 0.08
GAMMA_RANGE = (0.6, 1.6)
CONTRAST_RANGE = (0.75, 1.25)
NOISE_SD = 6.0


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random affine (rotation, zoom, shift; the same for image and mask) and a random
    gamma/contrast/noise change of the image, for each of ``x``/``y`` ``[N,S,S,1]`` float32."""
    x_out, y_out = np.empty_like(x), np.empty_like(y)
    size = x.shape[1]
    centre = np.array([(size - 1) / 2.0] * 2)
    for index in range(x.shape[0]):
        angle = np.deg2rad(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
        scale = rng.uniform(*SCALE_RANGE)
        shift = rng.uniform(-SHIFT_FRACTION, SHIFT_FRACTION, size=2) * size
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        matrix = rotation / scale  # output pixel -> input pixel
        offset = centre + shift - matrix @ centre
        image = ndimage.affine_transform(x[index, :, :, 0], matrix, offset, order=1, mode="constant", cval=0.0)
        mask = ndimage.affine_transform(y[index, :, :, 0], matrix, offset, order=1, mode="constant", cval=0.0)
        image = 255.0 * (np.clip(image, 0.0, 255.0) / 255.0) ** rng.uniform(*GAMMA_RANGE)
        image = (image - 127.5) * rng.uniform(*CONTRAST_RANGE) + 127.5 + rng.normal(0.0, NOISE_SD, image.shape)
        x_out[index, :, :, 0] = np.clip(image, 0.0, 255.0)
        y_out[index, :, :, 0] = np.clip(mask, 0.0, 1.0)
    return x_out, y_out


def _dice_loss(tf):
    def loss(y_true, y_pred):
        bce = tf.reduce_mean(tf.keras.losses.binary_crossentropy(y_true, y_pred))
        overlap = tf.reduce_sum(y_true * y_pred, axis=[1, 2, 3])
        total = tf.reduce_sum(y_true, axis=[1, 2, 3]) + tf.reduce_sum(y_pred, axis=[1, 2, 3])
        return bce + 1.0 - tf.reduce_mean((2.0 * overlap + 1.0) / (total + 1.0))
    return loss


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m covid_spark.lungs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--masks", required=True, help="the lung-masks folder (manifest.csv, masks/)")
    parser.add_argument("--images", required=True, help="the cxr3 folder the manifest's image paths are in")
    parser.add_argument("--out", required=True, help="output path without extension: writes <out>.npz and <out>.json")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--held-out", type=float, default=0.18, help="share of patients held out for the Dice test")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--base-filters", type=int, default=DEFAULT_BASE_FILTERS)
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH)
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    return args


def held_out_dice(weights: str, records, images_dir: str, masks_dir: str) -> dict[str, float]:
    """Dice of the saved model on each record, at the image's native size (mask ``ignore`` = lung)."""
    from covid_spark.lungs.segment import segment  # pulls in TensorFlow (heavy)
    scores = {}
    for record in records:
        image, mask = read_pair(record, images_dir, masks_dir)
        scores[record.image] = round(dice(segment(image[None], weights=weights)[0], mask), 4)
    return scores


def train(args: argparse.Namespace, command: str) -> dict:
    """Train, save ``<out>.npz`` and ``<out>.json`` (recording ``command``); return the JSON's contents."""
    import tensorflow as tf  # heavy: only the training run needs it
    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    records = read_manifest(args.masks)
    train_records, test_records = split_by_patient(records, args.held_out, args.seed)
    log.info("%d masks: %d train, %d held out (%d patients)", len(records), len(train_records),
             len(test_records), len({r.patient_id for r in test_records}))
    x, y = load_training_arrays(train_records, args.images, args.masks, args.size)

    from covid_spark.lungs.model import make_segmenter  # TensorFlow again (heavy)
    config = {"size": args.size, "base_filters": args.base_filters, "depth": args.depth}
    model = make_segmenter(**config)
    steps = args.epochs * int(np.ceil(len(x) / args.batch_size))
    schedule = tf.keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=steps, alpha=0.05)
    model.compile(optimizer=tf.keras.optimizers.Adam(schedule), loss=_dice_loss(tf))

    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    losses = []
    for epoch in range(args.epochs):
        x_epoch, y_epoch = augment(x, y, rng)
        history = model.fit(x_epoch, y_epoch, batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0)
        losses.append(round(float(history.history["loss"][-1]), 4))
        log.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, args.epochs, losses[-1], time.monotonic() - started)
    seconds = time.monotonic() - started

    out = args.out[:-4] if args.out.endswith(".npz") else args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_weights_npz(model, out + ".npz.tmp", config)
    os.replace(out + ".npz.tmp", out + ".npz")

    scores = held_out_dice(out + ".npz", test_records, args.images, args.masks)
    values = np.array(list(scores.values()))
    record = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": config, "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "held_out_fraction": args.held_out,
        "train_images": len(train_records), "train_patients": len({r.patient_id for r in train_records}),
        "held_out_images": len(test_records), "held_out_patients": len({r.patient_id for r in test_records}),
        "training_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {args.threads} TensorFlow threads, TensorFlow {tf.__version__}",
        "parameters": int(model.count_params()), "weights_bytes": os.path.getsize(out + ".npz"),
        "final_loss": losses[-1], "loss_per_epoch": losses,
        "held_out_dice": {"mean": round(float(values.mean()), 4), "median": round(float(np.median(values)), 4),
                          "min": round(float(values.min()), 4),
                          "note": "native image size, prediction thresholded at 0.5, 'ignore' (127) counted as lung"},
        "held_out_dice_per_image": scores,
    }
    with open(out + ".json.tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")
    os.replace(out + ".json.tmp", out + ".json")
    log.info("held-out Dice mean %.4f (min %.4f) on %d images; wrote %s.npz and .json",
             values.mean(), values.min(), len(values), out)
    return record


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    train(args, "python -m covid_spark.lungs.train " + shlex.join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
