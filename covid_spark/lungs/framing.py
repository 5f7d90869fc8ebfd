"""How much of a film a classifier sees: the whole image, its border trimmed, or its lungs plus a margin.

One function, :func:`frame_images`, used the same way by preprocess (before images are stored) and
by predict (on new files, with the framing the model's dataset was made with), so a model always
sees what it was trained on. Images are decoded at :func:`read_size` (larger than the stored size
when cropping, so a crop is not an enlargement of an already small image) and come out at ``size``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from covid_spark.lungs.masks import LungBox, crop_to_box, lung_box, mask_summary
from covid_spark.lungs.segment import segment

# Decoding at twice the stored size keeps a lung crop (typically 55-75 % of the film's side) at or
# above the stored resolution.
CROP_READ_SCALE = 2


@dataclass(frozen=True)
class Framing:
    """``border``: the fraction of each side trimmed (0 = none), removing the film's edge, where
    collections put their markers and text; ``lung_crop``: cut to the lungs' box (from the shipped
    segmenter) widened by ``margin`` of the image on every side."""

    border: float = 0.0
    lung_crop: bool = False
    margin: float = 0.05

    @classmethod
    def of(cls, preprocess: dict) -> "Framing":
        """The framing a ``preprocess`` config section (or a dataset summary's ``config``) asks for."""
        return cls(float(preprocess.get("border_crop", 0.0)), bool(preprocess.get("lung_crop", False)),
                   float(preprocess.get("lung_crop_margin", 0.05)))

    @property
    def active(self) -> bool:
        return self.border > 0 or self.lung_crop

    def as_dict(self) -> dict:
        return asdict(self)


def read_size(size: int, framing: Framing) -> int:
    """The side to decode at, for images stored at ``size`` after ``framing``."""
    return size * CROP_READ_SCALE if framing.active else size


def frame_images(images: list[np.ndarray], size: int, framing: Framing) -> tuple[list[np.ndarray], list[str]]:
    """Each image (uint8 ``[S,S,3]`` at :func:`read_size`) framed and resized to ``size``, with a JSON
    note per image: the lung box and mask summary when cropping to the lungs ("" when not)."""
    if not framing.active or not images:
        return images, [""] * len(images)
    if framing.border:
        b = framing.border
        images = [crop_to_box(image, LungBox(b, b, 1 - b, 1 - b), image.shape[:2]) for image in images]
    if not framing.lung_crop:
        return [crop_to_box(image, LungBox(0.0, 0.0, 1.0, 1.0), size) for image in images], [""] * len(images)
    masks = segment(np.stack(images))
    out, notes = [], []
    for image, mask in zip(images, masks):
        box = lung_box(mask, margin=framing.margin)
        out.append(crop_to_box(image, box, size))
        summary = mask_summary(mask, margin=framing.margin)
        notes.append(json.dumps({k: round(v, 4) for k, v in summary.items()} | {"reason": box.reason},
                                sort_keys=True))
    return out, notes
