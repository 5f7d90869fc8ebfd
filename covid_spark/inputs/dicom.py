"""DICOM input: recognise a file by its content, check its header, and turn its pixels into 8-bit grey.

Called by :func:`covid_spark.inputs.images.decode_file` (so preprocess and predict read DICOM alike) when
the bytes are DICOM: the ``DICM`` marker at byte 128, or, for files written without the 128-byte
preamble, a first element of group 0002 or 0008 (:func:`looks_like_dicom`).

Order of work for one file:

1. Parse the header (pydicom). A file cut short is rejected as ``truncated``.
2. View: the manifest's ``view`` cell when given, else ViewPosition (0018,5101), normalised by
   :mod:`covid_spark.inputs.views`; a view the ``--views`` filter leaves out stops here (no pixel decoded).
3. Rows x Columns against ``max_pixels``, before any pixel is decoded; no pixel data, or a transfer
   syntax without an installed decoder, is rejected with a reason naming it.
4. Pixels of the first frame only (multi-frame data), then, as PS3.3 C.11 defines them:

   a. the Modality LUT: Modality LUT Sequence, or Rescale Slope and Intercept;
   b. the VOI transform: the first VOI LUT Sequence item if there is one, else the first Window
      Center / Width pair (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID), mapped onto 0..255;
      values outside the window saturate to 0 or 255. Without either, the image's own min..max
      (padding excluded) is mapped onto 0..255;
   c. MONOCHROME1 is inverted so that bone is bright, as in every MONOCHROME2 and JPEG X-ray
      (a Presentation LUT Shape of INVERSE inverts once more);
   d. PixelPaddingValue (and PixelPaddingRangeLimit) pixels become 0, the black background.

   Colour DICOM (3 samples per pixel) comes back as RGB from pydicom (YBR converted), scaled to
   8 bits, without a VOI transform.
5. PatientID becomes a keyed pseudonym (:class:`Pseudonyms`): HMAC-SHA256 of the id under a salt
   from the environment variable ``COVID_SPARK_ID_SALT``, 16 hex digits. The raw PatientID and
   PatientName are never returned, logged or written.

Transfer syntaxes with a decoder in the pinned stack (pydicom 3.0, Pillow, python-gdcm 3.2; see
:data:`TRANSFER_SYNTAXES`): uncompressed (implicit and explicit VR, little and big endian),
deflated, RLE Lossless, JPEG Baseline and Extended, JPEG Lossless (processes 14 and 14 SV1),
JPEG-LS lossless and near-lossless, JPEG 2000 lossless and lossy. Others (High-Throughput JPEG
2000, JPEG XL, video) are rejected as having no decoder installed.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from covid_spark.errors import ConfigError
from covid_spark.inputs.rejects import ImageExcluded, ImageRejected, megapixels
from covid_spark.inputs.sources import named_as_dicom
from covid_spark.inputs.views import ViewFilter, normalise_view

SALT_ENV = "COVID_SPARK_ID_SALT"

# Transfer syntaxes the pinned decoders read, by UID (docs/data.md lists them from here).
TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian (uncompressed)",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian (uncompressed)",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (uncompressed, retired)",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (8-bit)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (12-bit)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless (process 14, selection value 1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}

_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data
_UNDEFINED_LENGTH = 0xFFFFFFFF


def looks_like_dicom(data: bytes) -> bool:
    """Whether ``data`` is DICOM: ``DICM`` at byte 128, or (no preamble) a first element of group 0002 or 0008.

    Without a preamble, the first four bytes are a little-endian tag of group 0002 (file meta) or
    0008 (identifying elements, which come first in a dataset without meta), followed by either an
    explicit VR of two capital letters or an implicit 32-bit length shorter than the file.
    """
    if data[128:132] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group, element = struct.unpack_from("<HH", data)
    if group not in (0x0002, 0x0008) or element > 0x1FFF:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return length < len(data)


def pseudonym(patient_id: str, salt: str) -> str:
    """The keyed pseudonym of a PatientID: HMAC-SHA256(salt, id), first 16 hex digits (64 bits)."""
    return hmac.new(salt.encode("utf-8"), patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Pseudonyms:
    """Turns PatientIDs into pseudonyms with a salt; ``salt`` None means patient ids are wanted but no
    salt was given, so a file carrying a PatientID is rejected (never kept raw)."""

    salt: str | None

    @classmethod
    def from_env(cls) -> "Pseudonyms":
        return cls(os.environ.get(SALT_ENV) or None)

    def of(self, patient_id: str) -> str:
        if not self.salt:
            raise ImageRejected(f"carries a PatientID but {SALT_ENV} is not set (the salt of its pseudonym)")
        return pseudonym(patient_id, self.salt)

    def __repr__(self) -> str:  # never show the salt
        return f"Pseudonyms(salt={'set' if self.salt else 'unset'})"


@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM file: 8-bit pixels (H x W grey or H x W x 3 RGB), its view and patient pseudonym."""

    pixels: np.ndarray
    view: str
    patient_id: str


def require_no_patient_ids(paths) -> None:
    """Fail unless no DICOM file among ``paths`` carries a PatientID (used when no salt is set).

    Reads the headers of the files named as DICOM (``.dcm``, ``.dicom``, no extension) only, and
    stops at the first that carries one; a DICOM file under another name is rejected on its own
    when decoded.

    Raises:
        ConfigError: names the variable to set and the file (never the id).
    """
    for path in paths:
        if named_as_dicom(path) and has_patient_id(path):
            raise ConfigError(f"{path} is a DICOM file with a PatientID: set the environment variable "
                             f"{SALT_ENV} to a secret salt, so that patient ids are kept as keyed "
                             f"pseudonyms (HMAC-SHA256), never raw")


def has_patient_id(path: str) -> bool:
    """Whether the DICOM file at ``path`` carries a non-empty PatientID (reads the header only).

    A file that is not DICOM or cannot be parsed counts as not carrying one (it is judged later).
    """
    import pydicom

    try:
        with open(path, "rb") as handle:
            if not looks_like_dicom(handle.read(4096)):
                return False
            handle.seek(0)
            with _quiet():
                ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True, specific_tags=["PatientID"])
                return bool(str(ds.get("PatientID", "") or "").strip())
    except Exception:  # noqa: BLE001 - judged when the file is decoded
        return False


@contextmanager
def _quiet():
    """pydicom without its value validation, warnings and log lines: they quote element values, and a
    value may be a PatientID or PatientName, which must never reach a log."""
    import logging

    import pydicom.config

    settings = pydicom.config.settings
    mode, logger = settings.reading_validation_mode, logging.getLogger("pydicom")
    disabled = logger.disabled
    settings.reading_validation_mode, logger.disabled = pydicom.config.IGNORE, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, logger.disabled = mode, disabled


def _truncated(ds, size: int) -> bool:
    """Whether pydicom stopped inside an element (it keeps what it read, silently): a value shorter
    than its declared length, or bytes after the last whole element (a cut inside an element's tag)."""
    last_end = None
    for dataset in (ds.file_meta, ds):
        for tag in list(dataset.keys()):
            raw = dataset.get_item(tag, keep_deferred=True)
            length, value = getattr(raw, "length", None), getattr(raw, "value", None)
            if length in (None, _UNDEFINED_LENGTH):
                last_end = None  # a sequence or encapsulated data: its end is not known here
                continue
            if isinstance(value, (bytes, bytearray)) and len(value) < length:
                return True
            tell = getattr(raw, "value_tell", None)
            last_end = None if tell is None else tell + length
    return last_end is not None and 0 < size - last_end < 12


def _read_dataset(data: bytes):
    """Parse the whole file (pixel data kept encoded); ImageRejected when it is cut short or unreadable."""
    from io import BytesIO

    import pydicom

    with warnings.catch_warnings(record=True) as caught:  # inside _quiet(): recorded, never shown
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(BytesIO(data), force=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for broken headers
            raise ImageRejected(f"corrupt DICOM header: {type(exc).__name__}") from exc
    if any("End of file reached" in str(w.message) for w in caught) or _truncated(ds, len(data)):
        raise ImageRejected("truncated DICOM file: it ends inside an element")
    if "TransferSyntaxUID" not in ds.file_meta:
        if data[128:132] == b"DICM":
            raise ImageRejected("truncated or corrupt DICOM file: its file meta has no Transfer Syntax UID")
        # No preamble and no meta: DICOM's default transfer syntax, Implicit VR Little Endian.
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def _check_decoder(ds) -> None:
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.TransferSyntaxUID
    name = TRANSFER_SYNTAXES.get(str(uid)) or (uid.name if uid.is_valid and uid.name != str(uid) else "unknown")
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageRejected(f"transfer syntax {uid} ({name}) has no decoder installed")


def _first(value) -> float:
    """The first of a multi-valued element (Window Center and Width may list several windows)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _voi(values: np.ndarray, ds) -> np.ndarray | None:
    """The VOI transform of modality values onto 0..1 (float), or None when the file defines none."""
    from pydicom.pixels import apply_voi

    sequence = ds.get("VOILUTSequence")
    if sequence:
        item = sequence[0]
        bits = int(item.LUTDescriptor[2]) or 16
        return apply_voi(values, ds, index=0).astype(np.float64) / float(2 ** bits - 1)
    centers, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centers is None or widths is None:
        return None
    center, width = _first(centers), _first(widths)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID" and width > 0:
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width >= 1:  # LINEAR (PS3.3 C.11.2.1.2.1)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) if width > 1 else \
            (values > center - 0.5).astype(np.float64)
    return None  # a width the standard does not allow: fall back to min..max


def _padding(stored: np.ndarray, ds) -> np.ndarray | None:
    """Mask of PixelPaddingValue pixels (a range up to PixelPaddingRangeLimit), in stored values."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == value
    low, high = sorted((int(value), int(limit)))
    return (stored >= low) & (stored <= high)


def grey_pixels(stored: np.ndarray, ds) -> np.ndarray:
    """8-bit grey display values of one frame's stored values (steps 4a-4d of the module docstring)."""
    from pydicom.pixels import apply_modality_lut

    padding = _padding(stored, ds)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    scaled = _voi(values, ds)
    if scaled is None:
        kept = values if padding is None else values[~padding]
        kept = kept[np.isfinite(kept)]
        scaled = np.zeros(values.shape)
        if kept.size:
            low, high = kept.min(), kept.max()
            if high > low:
                scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    grey = np.rint(scaled * 255.0).astype(np.uint8)
    inverse = str(ds.get("PresentationLUTShape", "") or "").upper() == "INVERSE"
    if (str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1") != inverse:
        grey = 255 - grey
    if padding is not None:
        grey[padding] = 0
    return grey


def _rgb_pixels(stored: np.ndarray, ds) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8) or 8)
    if bits <= 8:
        return stored.astype(np.uint8)
    return np.rint(stored.astype(np.float64) * (255.0 / (2 ** bits - 1))).clip(0, 255).astype(np.uint8)


def decode_dicom(data: bytes, max_pixels: int, views: ViewFilter | None = None, listed_view: str = "",
                 pseudonyms: Pseudonyms | None = None) -> DicomImage:
    """Decode a DICOM file's first frame into 8-bit pixels (see the module docstring).

    Args:
        listed_view: the view a manifest gave for this file (wins over ViewPosition when not empty).
        pseudonyms: None when patient ids are not wanted (predict); otherwise PatientID becomes a
            pseudonym, and a file carrying one without a salt is rejected.

    Raises:
        ImageExcluded: the view filter leaves this file out.
        ImageRejected: the file cannot be used; ``.reason`` says why.
    """
    with _quiet():
        return _decode(data, max_pixels, views, listed_view, pseudonyms)


def _decode(data: bytes, max_pixels: int, views: ViewFilter | None, listed_view: str,
            pseudonyms: Pseudonyms | None) -> DicomImage:
    from pydicom.pixels import pixel_array

    ds = _read_dataset(data)
    view = normalise_view(listed_view) or normalise_view(ds.get("ViewPosition", ""))
    excluded = (views or ViewFilter()).reason(view)
    if excluded:
        raise ImageExcluded(excluded)
    patient = ""
    raw_id = str(ds.get("PatientID", "") or "").strip()
    if pseudonyms is not None and raw_id:
        patient = pseudonyms.of(raw_id)
    if not any(tag in ds for tag in _PIXEL_DATA_TAGS):
        raise ImageRejected("no pixel data: the DICOM file has no Pixel Data element")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise ImageRejected(f"DICOM header has an empty size {columns}x{rows} (Columns x Rows)")
    if rows * columns > max_pixels:
        raise ImageRejected(f"{columns}x{rows} exceeds the {megapixels(max_pixels)} limit")
    _check_decoder(ds)
    try:
        stored = pixel_array(ds, index=0)
    except ValueError as exc:
        if "less than expected" in str(exc) or "end of" in str(exc).lower():
            raise ImageRejected(f"truncated DICOM pixel data: {str(exc).split(' - ')[0]}") from exc
        raise ImageRejected(f"cannot decode DICOM pixel data: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many kinds for broken data
        raise ImageRejected(f"cannot decode DICOM pixel data ({ds.file_meta.TransferSyntaxUID}): "
                            f"{type(exc).__name__}: {exc}") from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if stored.ndim == 3 and samples == 1:  # some decoders keep a trailing axis of one sample
        stored = stored[..., 0]
    pixels = _rgb_pixels(stored, ds) if samples == 3 else grey_pixels(stored, ds)
    return DicomImage(np.ascontiguousarray(pixels), view, patient)
