"""Decode image bytes into fixed-size RGB arrays.

This is the one decode/resize shared by data preparation and prediction, so the
same file always becomes the same tensor. It is pure (bytes in, array out) and
imports no Spark.

Decoding steps, in order:

1. Sniff the content: empty files, HTML/XML error pages and PDFs are rejected
   with a reason that says what the file looks like. DICOM content (whatever
   the file's name) is decoded by :mod:`covid_spark.inputs.dicom` into 8-bit grey,
   then joins step 7.
2. Open lazily and check width x height from the header against ``max_pixels``
   before any pixel is allocated (decompression bombs). Pillow's own global
   ``MAX_IMAGE_PIXELS`` is left untouched; its warning is silenced locally so our
   limit decides, and its hard error (at twice its limit) is also turned into
   :class:`ImageRejected`.
3. JPEGs are decoded with DCT scaling (``Image.draft``) to the smallest size that
   is still at least ``size`` x ``size``; this is deterministic and much faster.
4. Load pixels; truncated or corrupt data is rejected (truncated images are
   never silently padded: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is not set).
5. Apply the EXIF orientation so rotated photos come out upright.
6. Convert to RGB:

   * ``I;16``/``I;16B``/``I;16L``/``I;16N``/``I``/``F`` (16/32-bit grayscale):
     rescaled by the image's own min..max to 0..255 (rounded), so order is kept
     and nothing is clipped to white; a constant image becomes all 0.
   * ``L``, ``1``: grey replicated into three channels.
   * ``P``: through RGBA if it has transparency, otherwise straight to RGB.
   * anything with alpha (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, or a
     ``transparency`` entry): alpha-composited over a BLACK background, because
     the background of an X-ray is black.
   * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's ``convert("RGB")``.
   * multi-frame files (GIF, TIFF): the first frame only.

7. Resize to exactly ``size`` x ``size`` with bilinear filtering. The aspect
   ratio is NOT preserved (no padding): the image is stretched, as the original
   project did. Small images are upscaled.

The result is a C-contiguous ``uint8`` array of shape ``(size, size, 3)``.
"""
from __future__ import annotations

import logging
import numbers
import re
import struct
import warnings
import zlib
from io import BytesIO
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from covid_spark.constants import DEFAULT_IMAGE_SIZE
from covid_spark.inputs import dicom
from covid_spark.inputs.rejects import ImageExcluded, ImageRejected, megapixels
from covid_spark.inputs.sources import file_extension, named_as_dicom
from covid_spark.inputs.views import normalise_view

if TYPE_CHECKING:
    from covid_spark.inputs.views import ViewFilter

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000

_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# Errors Pillow raises for bad data while parsing or decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                  struct.error, zlib.error)


class Decoded(NamedTuple):
    """A decoded file: the ``(size, size, 3)`` uint8 image, its view ("" when unknown) and, for a DICOM
    file read with pseudonyms, its patient pseudonym ("" otherwise)."""

    image: np.ndarray
    view: str = ""
    patient_id: str = ""


class ReadResult(NamedTuple):
    """What :func:`read_image` made of one file: ``image`` (None unless usable), else ``error`` (rejected)
    or ``excluded`` (left out by the view filter), with the view and pseudonym a DICOM header gave."""

    image: np.ndarray | None
    error: str | None = None
    excluded: str | None = None
    view: str = ""
    patient_id: str = ""


def _sniff(data: bytes) -> None:
    """Reject content that is evidently not an image, before Pillow sees it."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    head = data[:512].lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"<"):
        raise ImageRejected("not an image: looks like HTML/XML")
    if head.startswith(b"%PDF"):
        raise ImageRejected("not an image: looks like PDF")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height read from the header alone, for error messages only.

    Used after Pillow's open() refused a decompression bomb, to name its size; it
    walks Pillow's format registry the way open() does, minus the size check.
    """
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(data[:16]) if accept else True
            if accepted and not isinstance(accepted, str):
                return factory(BytesIO(data), "").size
        except _DECODE_ERRORS:
            continue
    return None


def _bomb_reason(exc: Exception, data: bytes, max_pixels: int) -> str:
    """Reason for an image Pillow itself refused as a decompression bomb."""
    size = _header_size(data)
    if size is not None:
        what = f"{size[0]}x{size[1]}"
    else:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"{int(found.group(1))} pixels" if found else "image"
    return f"{what} exceeds the {megapixels(max_pixels)} limit"


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Our max_pixels decides; Pillow's warning threshold is a global we don't touch.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(_bomb_reason(exc, data, max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(
            f"not an image: unrecognised format (first bytes: {data[:16].hex(' ')})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageRejected(f"corrupt image header: {exc}") from exc
    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise ImageRejected(f"{img.format} has an empty size {width}x{height}")
    if width * height > max_pixels:
        img.close()
        raise ImageRejected(f"{width}x{height} exceeds the {megapixels(max_pixels)} limit")
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as exc:
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB by the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_DEPTH_MODES:
        values = np.asarray(img).astype(np.float64)
        finite = np.isfinite(values)
        out = np.zeros(values.shape, dtype=np.uint8)
        if finite.any():
            low, high = values[finite].min(), values[finite].max()
            if high > low:
                scaled = np.rint((values[finite] - low) * (255.0 / (high - low)))
                out[finite] = scaled.astype(np.uint8)
        return Image.fromarray(out).convert("RGB")
    if mode == "La":
        img = img.convert("LA")  # Pillow cannot go La -> RGBA directly
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageRejected(f"unsupported colour mode {mode}: {exc}") from exc


def _check_size_args(size, max_pixels) -> tuple[int, int]:
    if not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return int(size), int(max_pixels)


def _resized(img: Image.Image, size: int) -> np.ndarray:
    return np.array(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8, order="C")


def decode_image(data: bytes, size: int = DEFAULT_IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes (any format Pillow reads, or DICOM) into a ``(size, size, 3)`` uint8 RGB array.

    Args:
        data: the file's bytes.
        size: output height and width in pixels.
        max_pixels: largest width x height accepted, checked from the header.

    Returns:
        A C-contiguous ``uint8`` array of shape ``(size, size, 3)``.

    Raises:
        ImageRejected: the bytes are not a usable image; ``.reason`` says why.
        ValueError: ``size`` or ``max_pixels`` is not a positive integer.
    """
    return decode_file(data, size, max_pixels).image


def decode_file(data: bytes, size: int = DEFAULT_IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                views: "ViewFilter | None" = None, listed_view: str = "",
                pseudonyms: "dicom.Pseudonyms | None" = None) -> Decoded:
    """:func:`decode_image` with the file's view and patient pseudonym, and the view filter applied.

    Args:
        views: leave out files whose view it excludes (checked before any pixel is decoded).
        listed_view: the view a manifest gave for the file; a DICOM file's ViewPosition otherwise.
        pseudonyms: for DICOM files, turn PatientID into a pseudonym (None: patient ids not wanted).

    Raises:
        ImageExcluded: the view filter leaves the file out.
        ImageRejected: the bytes are not a usable image.
    """
    size, max_pixels = _check_size_args(size, max_pixels)
    data = bytes(data)
    _sniff(data)
    if dicom.looks_like_dicom(data):
        decoded = dicom.decode_dicom(data, max_pixels, views=views, listed_view=listed_view, pseudonyms=pseudonyms)
        with Image.fromarray(decoded.pixels) as img:
            return Decoded(_resized(img.convert("RGB"), size), decoded.view, decoded.patient_id)
    view = normalise_view(listed_view)
    excluded = views.reason(view) if views is not None else None
    if excluded:
        raise ImageExcluded(excluded)
    return Decoded(_decode_pillow(data, size, max_pixels), view)


def _decode_pillow(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Steps 2-7 of the module docstring for anything Pillow opens."""
    img = _open(data, max_pixels)
    fmt = img.format or "image"
    try:
        if fmt in ("JPEG", "MPO"):
            # DCT scaling: decode at 1/2, 1/4 or 1/8 scale, never below size x size
            img.draft(img.mode if img.mode in ("RGB", "L") else None, (size, size))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(_bomb_reason(exc, data, max_pixels)) from exc
        except _DECODE_ERRORS as exc:
            raise ImageRejected(f"truncated or corrupt {fmt}: {exc}") from exc
        try:
            return _resized(_to_rgb(_upright(img)), size)
        except ImageRejected:
            raise
        except _DECODE_ERRORS as exc:
            raise ImageRejected(f"cannot convert {fmt} ({img.mode}): {exc}") from exc
    finally:
        img.close()


def read_image(path: str, size: int, max_pixels: int, *, views: "ViewFilter | None" = None,
               listed_view: str = "", pseudonyms: "dicom.Pseudonyms | None" = None) -> ReadResult:
    """Read and decode one file (:func:`decode_file`) into a :class:`ReadResult`.

    Never raises for a bad file (one odd file must never kill a job): a missing or unreadable file,
    a rejected image (``ImageRejected``) and any decoder error become ``error``; a file the view
    filter leaves out gets ``excluded``. A file named ``.dcm``/``.dicom`` or with no extension must
    be DICOM by content.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return ReadResult(None, "file not found")
    except OSError as exc:
        return ReadResult(None, f"cannot read file: {exc.strerror or exc}")
    try:
        if named_as_dicom(path):
            if data and not dicom.looks_like_dicom(data):
                extension = file_extension(path)
                what = f"named {extension}" if extension else "without a file extension"
                return ReadResult(None, f"not DICOM: a file {what} must be DICOM (no 'DICM' marker at "
                                        f"byte 128, no group 0002/0008 element first)")
        decoded = decode_file(data, size, max_pixels, views=views, listed_view=listed_view, pseudonyms=pseudonyms)
        return ReadResult(decoded.image, view=decoded.view, patient_id=decoded.patient_id)
    except ImageExcluded as exc:
        return ReadResult(None, excluded=exc.reason)
    except ImageRejected as exc:
        return ReadResult(None, exc.reason)
    except Exception as exc:  # noqa: BLE001 - one odd file must never kill the job
        return ReadResult(None, f"cannot decode: {type(exc).__name__}: {exc}")
