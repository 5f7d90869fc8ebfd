"""Small images the tests make themselves (never real data)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    """Save a Pillow image to bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def smooth_noise(seed: int, size: int = 128) -> np.ndarray:
    """A smooth random RGB picture (low-frequency noise), so JPEG keeps its structure."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
