"""DICOM files made by the tests with pydicom (no real patient data): uncompressed or encapsulated.

``python -m tests.dicoms OUT`` writes cxr3 as a PACS-like export into OUT: a folder per class of DICOM
files (JPEGs wrapped untouched, PNGs as uncompressed grey), PatientID from the manifest, ViewPosition from
its view column, every third file without an extension (the README's DICOM demo)."""
from __future__ import annotations

import csv
import io
import os
import sys

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def dataset(pixels: np.ndarray | None, *, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
            **tags) -> Dataset:
    """A CR dataset holding ``pixels`` (frames x rows x cols, or rows x cols) uncompressed, plus ``tags``."""
    ds = Dataset()
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    if pixels is not None:
        pixels = np.asarray(pixels)
        frames = pixels if pixels.ndim == 3 else pixels[None]
        ds.Rows, ds.Columns = frames.shape[1:]
        if len(frames) > 1:
            ds.NumberOfFrames = len(frames)
        allocated = pixels.dtype.itemsize * 8
        ds.BitsAllocated = allocated
        ds.BitsStored = bits_stored or allocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        ds.PixelData = frames.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def encoded(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian, preamble: bool = True) -> bytes:
    """The file's bytes: with the 128-byte preamble and file meta, or (``preamble=False``) the bare
    dataset in Implicit VR Little Endian, as some PACS exports write it."""
    buffer = io.BytesIO()
    if not preamble:
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
        return buffer.getvalue()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    ds.save_as(buffer, enforce_file_format=True,
               implicit_vr=transfer_syntax == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


def encapsulated(frames: list[bytes], rows: int, columns: int, transfer_syntax: str, *, bits: int = 8,
                 **tags) -> bytes:
    """A file whose pixel data is ``frames`` (compressed bytes) encapsulated under ``transfer_syntax``."""
    ds = dataset(None, **tags)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return encoded(ds, transfer_syntax)


def wrap_jpeg(jpeg: bytes, **tags) -> bytes:
    """A JPEG file wrapped as a JPEG Baseline DICOM file (its bytes untouched, as a PACS stores them)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        width, height, grey = img.width, img.height, img.mode == "L"
    colour = {} if grey else {"SamplesPerPixel": 3, "PlanarConfiguration": 0}
    return encapsulated([jpeg], height, width, pydicom.uid.JPEGBaseline8Bit,
                        photometric="MONOCHROME2" if grey else "YBR_FULL_422", **colour, **tags)


def as_dicom(path: str, **tags) -> bytes:
    """An image file as DICOM: a JPEG wrapped untouched, anything else as uncompressed 8-bit grey."""
    from PIL import Image

    with open(path, "rb") as handle:
        data = handle.read()
    if data[:3] == b"\xff\xd8\xff":
        return wrap_jpeg(data, **tags)
    with Image.open(io.BytesIO(data)) as img:
        return encoded(dataset(np.asarray(img.convert("L")), **tags))


def write_cxr3_export(cxr3: str, out: str) -> int:
    """cxr3 (``manifest.csv`` and its images) as a folder per class of DICOM files; returns the count."""
    with open(os.path.join(cxr3, "manifest.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        os.makedirs(os.path.join(out, row["label"]), exist_ok=True)
        tags = {"PatientID": row["patient_id"] or f"anon-{i}", "PatientName": "Cxr3^Patient"}
        if row.get("view"):
            tags["ViewPosition"] = row["view"]
        name = f"IM{i:05d}" if i % 3 == 2 else f"img-{i:05d}.dcm"
        with open(os.path.join(out, row["label"], name), "wb") as handle:
            handle.write(as_dicom(os.path.join(cxr3, row["path"]), **tags))
    return len(rows)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # pydicom warns that "AP Supine" is not a valid CS value; it is what cxr3 says
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    count = write_cxr3_export(os.path.join(os.path.dirname(here), "shared", "data", "cxr3"), sys.argv[1])
    print(f"wrote {count} DICOM files under {sys.argv[1]}")
