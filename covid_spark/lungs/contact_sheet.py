"""A contact sheet: the segmenter's masks over a few images of every source, to check it by eye.

    python -m covid_spark.lungs.contact_sheet --cxr-xl ../shared/data/cxr-xl --cxr3 ../shared/data/cxr3 \\
        --masks ../shared/data/lung-masks --out docs/img/lung-masks-contact-sheet.png

One row per (collection, source, class), images drawn with a fixed seed; the images the segmenter
was trained on (cxr3 ieee8023 COVID images with a drawn mask, except those held out) are left out. Each tile
shows the mask (tinted, outlined) and its :func:`~covid_spark.lungs.masks.lung_box` (yellow; red and
the whole tile when the mask was not trusted). Each row's title gives, over a larger sample of the
same group, the mean lung fraction, how many masks fell back to the whole image, and how many held
two lungs. The same numbers are logged.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from covid_spark.errors import InputError
from covid_spark.lungs.data import read_grey, read_manifest
from covid_spark.lungs.masks import LungBox, mask_summary
from covid_spark.lungs.segment import DEFAULT_WEIGHTS, resize_float, segment

log = logging.getLogger(__name__)

WORK_SIZE = 256  # images are segmented at this size for the sheet (the model itself works at 128)
TINT = np.array([255, 64, 64], dtype=np.float32)
OUTLINE = (0, 255, 0)
BOX = (255, 220, 0)
FALLBACK = (255, 0, 0)
TITLE_HEIGHT = 16


@dataclass(frozen=True)
class Group:
    """One row of the sheet: a title and the image paths of its sample (the first ``shown`` are drawn)."""
    title: str
    paths: tuple[str, ...]
    shown: int


def read_rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "manifest.csv"), newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def groups_of(collection: str, folder: str, rows: list[dict], shown: int, sample: int, seed: int,
              exclude: frozenset[str] = frozenset()) -> list[Group]:
    """One :class:`Group` per (source, label) of ``rows``, leaving out the paths in ``exclude``."""
    keys = sorted({(row["source"], row["label"]) for row in rows})
    rng = np.random.default_rng(seed)
    out = []
    for source, label in keys:
        paths = sorted(row["path"] for row in rows if row["source"] == source and row["label"] == label
                       and row["path"] not in exclude)
        if not paths:
            continue
        picked = [paths[i] for i in rng.permutation(len(paths))[:sample]]
        note = " (training images left out)" if exclude & {row["path"] for row in rows if row["source"] == source} else ""
        out.append(Group(f"{collection} / {source} / {label}{note}",
                         tuple(os.path.join(folder, p) for p in picked), min(shown, len(picked))))
    return out


def tile(grey: np.ndarray, probability: np.ndarray, box: LungBox, size: int) -> Image.Image:
    """One tile: ``grey`` with the mask tinted and outlined and the box drawn, ``size`` x ``size``."""
    grey_small = np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR), dtype=np.float32)
    lung = resize_float(probability, size, size) >= 0.5
    rgb = np.repeat(grey_small[:, :, None], 3, axis=2)
    rgb[lung] = 0.7 * rgb[lung] + 0.3 * TINT
    edge = lung & ~ndimage.binary_erosion(lung)
    rgb[edge] = OUTLINE
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box.pixels(size, size)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=FALLBACK if box.fallback else BOX, width=2 if box.fallback else 1)
    return image


def render(groups: list[Group], per_row: int, size: int, weights: str | None) -> tuple[Image.Image, list[dict]]:
    """The sheet and, per group, the statistics over its whole sample."""
    rows, stats = [], []
    for group in groups:
        greys = np.stack([np.asarray(Image.fromarray(read_grey(p)).resize((WORK_SIZE, WORK_SIZE), Image.BILINEAR))
                          for p in group.paths])
        masks = segment(greys, weights=weights)
        summaries = [mask_summary(mask) for mask in masks]
        stat = {"group": group.title, "images": len(group.paths),
                "lung_fraction_mean": round(float(np.mean([s["lung_fraction"] for s in summaries])), 3),
                "fallback": int(sum(s["box_fallback"] for s in summaries)),
                "two_lungs": int(sum(s["components"] == 2.0 for s in summaries))}
        stats.append(stat)
        log.info("%s: %d images, lung fraction %.3f, fallback %d, two lungs %d", group.title, stat["images"],
                 stat["lung_fraction_mean"], stat["fallback"], stat["two_lungs"])
        row = Image.new("RGB", (per_row * size, size + TITLE_HEIGHT), (0, 0, 0))
        ImageDraw.Draw(row).text((3, 2), f"{group.title}: lung fraction {stat['lung_fraction_mean']:.2f}, "
                                 f"fallback {stat['fallback']}/{stat['images']}, two lungs "
                                 f"{stat['two_lungs']}/{stat['images']}", fill=(255, 255, 255))
        for index in range(group.shown):
            summary = summaries[index]
            box = LungBox(summary["box_x0"], summary["box_y0"], summary["box_x1"], summary["box_y1"],
                          fallback=summary["box_fallback"] == 1.0)
            row.paste(tile(greys[index], masks[index], box, size), (index * size, TITLE_HEIGHT))
        rows.append(row)
    sheet = Image.new("RGB", (per_row * size, sum(r.height for r in rows)), (0, 0, 0))
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    return sheet, stats


def trained_on(weights: str, masks_dir: str) -> frozenset[str]:
    """The cxr3 paths the weights were trained on: the masked images less the held-out ones recorded
    in the JSON beside the weights.

    Raises:
        InputError: if that JSON is missing (without it every masked image counts as trained on
            would be a guess; the message names the file).
    """
    record_path = os.path.splitext(weights)[0] + ".json"
    if not os.path.isfile(record_path):
        raise InputError(f"training record not found beside the weights: {record_path}")
    with open(record_path, encoding="utf-8") as handle:
        held_out = set(json.load(handle)["held_out_dice_per_image"])
    return frozenset(record.image for record in read_manifest(masks_dir)) - held_out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m covid_spark.lungs.contact_sheet", description=__doc__.splitlines()[0])
    parser.add_argument("--cxr-xl", required=True, help="the cxr-xl folder (manifest.csv)")
    parser.add_argument("--cxr3", required=True, help="the cxr3 folder (manifest.csv)")
    parser.add_argument("--masks", required=True, help="the lung-masks folder: its images the segmenter "
                        "was trained on are left out of the sheet")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--per-row", type=int, default=6, help="images drawn per group")
    parser.add_argument("--sample", type=int, default=40, help="images per group behind each row's numbers")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sample < args.per_row:
        parser.error(f"--sample ({args.sample}) must be at least --per-row ({args.per_row})")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    exclude = trained_on(args.weights, args.masks)
    groups = groups_of("cxr-xl", args.cxr_xl, read_rows(args.cxr_xl), args.per_row, args.sample, args.seed)
    groups += groups_of("cxr3", args.cxr3, read_rows(args.cxr3), args.per_row, args.sample, args.seed, exclude)
    sheet, _ = render(groups, args.per_row, args.tile, args.weights)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # A 256-colour palette keeps the sheet small enough for the repository; the tints survive it.
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out + ".tmp.png", optimize=True)
    os.replace(args.out + ".tmp.png", args.out)
    log.info("wrote %s (%d bytes, %d rows)", args.out, os.path.getsize(args.out), len(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
