"""The edge that reads the drawn lung masks (``../shared/data/lung-masks``) and their cxr3 images.

Also the held-out split, by patient: a patient's images are all on one side, so the held-out Dice is
measured on people the segmenter has not seen.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from covid_spark.errors import InputError
from covid_spark.lungs.segment import prepare, resize_float

MANIFEST_COLUMNS = ("image", "mask", "patient_id", "view", "width", "height")


@dataclass(frozen=True)
class MaskRecord:
    """One row of ``lung-masks/manifest.csv``: paths relative to the images and masks folders."""
    image: str
    mask: str
    patient_id: str
    view: str
    width: int
    height: int


def read_manifest(masks_dir: str) -> list[MaskRecord]:
    """The rows of ``<masks_dir>/manifest.csv``, in file order.

    Raises:
        InputError: if the manifest is missing, or a column (the message names it and the file).
    """
    path = os.path.join(masks_dir, "manifest.csv")
    if not os.path.isfile(path):
        raise InputError(f"lung-mask manifest not found: {path} (--masks names the lung-masks folder)")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in MANIFEST_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: columns {missing} missing; found {reader.fieldnames}")
        return [MaskRecord(row["image"], row["mask"], row["patient_id"], row["view"],
                           int(row["width"]), int(row["height"])) for row in reader]


def split_by_patient(records: list[MaskRecord], held_out: float, seed: int
                     ) -> tuple[list[MaskRecord], list[MaskRecord]]:
    """(train, held-out): ``ceil(held_out * patients)`` patients, drawn with ``seed``, are held out.

    Raises:
        InputError: if ``held_out`` is not in (0, 1) or either side would be empty.
    """
    if not 0.0 < held_out < 1.0:
        raise InputError(f"held_out must be in (0, 1); got {held_out}")
    patients = sorted({record.patient_id for record in records})
    count = math.ceil(held_out * len(patients))
    if count < 1 or count >= len(patients):
        raise InputError(f"held_out={held_out} of {len(patients)} patients leaves an empty side")
    chosen = set(np.random.default_rng(seed).permutation(patients)[:count].tolist())
    train = [record for record in records if record.patient_id not in chosen]
    test = [record for record in records if record.patient_id in chosen]
    return train, test


def read_grey(path: str) -> np.ndarray:
    """An image file as uint8 ``[H,W]`` grey."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


def read_pair(record: MaskRecord, images_dir: str, masks_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of one record at their native size, both uint8 ``[H,W]``.

    Raises:
        InputError: if the image and mask sizes differ (the message names both files).
        FileNotFoundError: if either file is missing.
    """
    image = read_grey(os.path.join(images_dir, record.image))
    mask = read_grey(os.path.join(masks_dir, record.mask))
    if image.shape != mask.shape:
        raise InputError(f"{record.image} is {image.shape}, its mask {record.mask} is {mask.shape}")
    return image, mask


def load_training_arrays(records: list[MaskRecord], images_dir: str, masks_dir: str, size: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) at the model's size: x as :func:`~covid_spark.lungs.segment.prepare` makes it, y the
    lung share of each pixel (``ignore`` counts as lung), both float32 ``[N,size,size,1]``."""
    x = np.empty((len(records), size, size, 1), dtype=np.float32)
    y = np.empty_like(x)
    for index, record in enumerate(records):
        image, mask = read_pair(record, images_dir, masks_dir)
        x[index] = prepare(image[None], size)[0]
        y[index, :, :, 0] = np.clip(resize_float((mask > 0).astype(np.float32), size, size), 0.0, 1.0)
    return x, y
