"""What a decoder says of a file it will not use: rejected (not a usable image) or excluded (left out
on purpose), and the size limit in words. Shared by the Pillow and DICOM decoders."""
from __future__ import annotations


class ImageRejected(ValueError):
    """An input file that cannot become a training or prediction image."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ImageExcluded(Exception):
    """An input file left out on purpose (the ``--views`` filter): skipped, not rejected."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def megapixels(max_pixels: int) -> str:
    return f"{max_pixels / 1e6:g}-megapixel"
