"""DICOM files made by the tests with pydicom (no real patient data): uncompressed or encapsulated."""
from __future__ import annotations

import io

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
