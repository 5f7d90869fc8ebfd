"""DICOM input: recognition by content, the pixel maths of PS3.3 C.11, bad files, views and pseudonyms.

Expected pixels are computed here with NumPy and Pillow from the test's own arrays (or, for the two
real files, from their compressed frames decoded by Pillow directly), never from covid_spark's output.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import os

import numpy as np
import pytest
from PIL import Image

from covid_spark.inputs.dicom import SALT_ENV, Pseudonyms, decode_dicom, looks_like_dicom, require_no_patient_ids
from covid_spark.inputs.images import decode_file, read_image
from covid_spark.inputs.rejects import ImageExcluded, ImageRejected
from covid_spark.inputs.views import ViewFilter, normalise_view

from tests.conftest import REPO
from tests.dicoms import dataset, encapsulated, encoded

pydicom = pytest.importorskip("pydicom")
from pydicom.encaps import generate_frames  # noqa: E402
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless  # noqa: E402

REAL = os.path.join(os.path.dirname(REPO), "shared", "data", "dicom")
J2K = os.path.join(REAL, "cr-chest-pa-monochrome1-j2k.dcm")
RSNA = os.path.join(REAL, "rsna-chest-pa-monochrome2-jpeg.dcm")
BIG = 50_000_000


def grey(data: bytes, **kwargs) -> np.ndarray:
    """The decoder's 8-bit grey pixels at full size (before the shared resize)."""
    return decode_dicom(data, BIG, **kwargs).pixels


def expected_resized(grey_pixels: np.ndarray, size: int = 224) -> np.ndarray:
    """What the shared resize makes of full-size 8-bit grey: Pillow bilinear, three equal channels."""
    small = np.asarray(Image.fromarray(grey_pixels).resize((size, size), Image.Resampling.BILINEAR))
    return np.repeat(small[:, :, None], 3, axis=2)


def minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, written out case by case."""
    values = values.astype(np.float64)
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    out[values <= center - 0.5 - (width - 1) / 2] = 0
    out[values > center - 0.5 + (width - 1) / 2] = 255
    return np.rint(out).astype(np.uint8)


# ---------------------------------------------------------------- the two real files

def _real(path: str) -> bytes:
    if not os.path.isfile(path):
        pytest.skip(f"real DICOM file not found at {path}")
    with open(path, "rb") as handle:
        return handle.read()


def _first_frame(data: bytes) -> np.ndarray:
    """The first compressed frame decoded by Pillow itself (not through pydicom's plugins)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    with Image.open(io.BytesIO(frame)) as img:
        return np.asarray(img)


def test_real_monochrome1_jpeg2000_equals_an_independent_decode():
    data = _real(J2K)
    # Pillow's OpenJPEG on the raw codestream returns I;16 scaled to the full 16 bits: the file stores 15.
    stored = _first_frame(data) >> (16 - 15)
    assert stored.shape == (1955, 1841) and stored.max() < 2 ** 15
    # Header: WindowCenter 15000, WindowWidth 30000, no rescale; MONOCHROME1 -> inverted.
    expected = 255 - linear_window(stored, 15000, 30000)
    got = grey(data)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    resized = read_image(J2K, 224, BIG).image
    assert np.abs(resized.astype(int) - expected_resized(expected).astype(int)).max() <= 1


def test_real_rsna_jpeg_equals_an_independent_decode():
    data = _real(RSNA)
    stored = _first_frame(data)          # Pillow's libjpeg on the raw JPEG frame
    expected = minmax(stored)            # no window in the header: its own min..max
    got = grey(data)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.array_equal(read_image(RSNA, 224, BIG).image, expected_resized(got))


@pytest.mark.parametrize("path", [J2K, RSNA])
def test_real_files_show_bone_bright_mediastinum_brighter_than_lungs(path):
    image = read_image(path, 224, BIG).image[:, :, 0].astype(float)
    rows = slice(int(224 * 0.30), int(224 * 0.60))
    mediastinum = image[rows, int(224 * 0.45):int(224 * 0.55)].mean()
    lungs = np.concatenate([image[rows, int(224 * 0.20):int(224 * 0.35)].ravel(),
                            image[rows, int(224 * 0.65):int(224 * 0.80)].ravel()]).mean()
    assert mediastinum > lungs + 20, (mediastinum, lungs)


def test_real_files_views_and_keyed_pseudonyms():
    for path in (J2K, RSNA):
        data = _real(path)
        raw_id = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).PatientID)
        read = read_image(path, 224, BIG, pseudonyms=Pseudonyms("a salt"))
        assert read.view == "PA"
        assert read.patient_id == hmac.new(b"a salt", raw_id.encode(), hashlib.sha256).hexdigest()[:16]
        assert read_image(path, 224, BIG, pseudonyms=Pseudonyms("another")).patient_id != read.patient_id
        assert "PatientID" in read_image(path, 224, BIG, pseudonyms=Pseudonyms(None)).error or SALT_ENV in \
            read_image(path, 224, BIG, pseudonyms=Pseudonyms(None)).error
        assert read_image(path, 224, BIG).patient_id == ""  # predict: ids not wanted


# ---------------------------------------------------------------- generated files: pixel maths

RAMP12 = (np.arange(40 * 30).reshape(40, 30) * 3 % 4096).astype(np.uint16)


def test_uncompressed_12_bit_maps_its_own_min_max():
    assert np.array_equal(grey(encoded(dataset(RAMP12, bits_stored=12))), minmax(RAMP12))


def test_uncompressed_16_bit_keeps_order_without_clipping():
    pixels = np.linspace(0, 65535, 50 * 20).reshape(50, 20).astype(np.uint16)
    got = grey(encoded(dataset(pixels)))
    assert np.array_equal(got, minmax(pixels)) and got.min() == 0 and got.max() == 255


def test_signed_pixels_with_rescale_then_window():
    stored = np.arange(-600, 600, 1).reshape(40, 30).astype(np.int16)
    hu = stored * 2.0 - 1024  # RescaleSlope 2, RescaleIntercept -1024
    got = grey(encoded(dataset(stored, bits_stored=16, RescaleSlope=2, RescaleIntercept=-1024,
                               WindowCenter=-1000, WindowWidth=800)))
    assert np.array_equal(got, linear_window(hu, -1000, 800))
    assert (got == 0).any() and (got == 255).any()  # values outside the window saturate


def test_window_center_width_saturates_outside_and_uses_the_first_pair():
    ds = dataset(RAMP12, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = [2000, 100], [1000, 50]
    got = grey(encoded(ds))
    assert np.array_equal(got, linear_window(RAMP12, 2000, 1000))
    assert got[RAMP12 < 1400].max() == 0 and got[RAMP12 > 2600].min() == 255


def test_voi_lut_sequence_wins_over_the_window():
    from pydicom.dataset import Dataset

    pixels = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint16)
    lut = (np.sqrt(np.arange(256) / 255.0) * 4095).astype(np.uint16)  # 12-bit output, first value 0
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.LUTData = lut.tolist()
    ds = dataset(pixels, bits_stored=8, WindowCenter=10, WindowWidth=2)
    ds.VOILUTSequence = [item]
    ds["VOILUTSequence"][0]["LUTData"].VR = "US"
    got = grey(encoded(ds))
    assert np.array_equal(got, np.rint(lut[pixels] / 4095 * 255).astype(np.uint8))


def test_pixel_padding_is_black_and_outside_min_max():
    pixels = RAMP12.copy()
    pixels[:5] = 4095  # padding drawn as the brightest value
    got = grey(encoded(dataset(pixels, bits_stored=12, PixelPaddingValue=4095)))
    body = RAMP12[5:].astype(float)
    expected = np.rint((body - body.min()) / (body.max() - body.min()) * 255).astype(np.uint8)
    assert (got[:5] == 0).all() and np.array_equal(got[5:], expected)


def test_multi_frame_uses_the_first_frame():
    frames = np.stack([RAMP12, 4095 - RAMP12, np.zeros_like(RAMP12)])
    assert np.array_equal(grey(encoded(dataset(frames, bits_stored=12))), minmax(RAMP12))


def test_monochrome1_is_inverted_so_bone_is_bright():
    plain = grey(encoded(dataset(RAMP12, bits_stored=12)))
    inverted = grey(encoded(dataset(RAMP12, bits_stored=12, photometric="MONOCHROME1")))
    assert np.array_equal(inverted, 255 - plain)


def test_rle_big_endian_and_implicit_vr_decode_alike():
    ds = dataset(RAMP12, bits_stored=12)
    plain = grey(encoded(ds))
    ds = dataset(RAMP12, bits_stored=12)
    encoded(ds)  # gives it file meta, which compress() needs
    ds.compress(RLELossless, encoding_plugin="pydicom")
    assert np.array_equal(grey(encoded(ds, RLELossless)), plain)
    assert np.array_equal(grey(encoded(dataset(RAMP12, bits_stored=12), ImplicitVRLittleEndian)), plain)
    big = dataset(RAMP12, bits_stored=12)
    buffer = io.BytesIO()
    from pydicom.dataset import FileMetaDataset

    big.file_meta = FileMetaDataset()
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    big.file_meta.MediaStorageSOPClassUID, big.file_meta.MediaStorageSOPInstanceUID = big.SOPClassUID, big.SOPInstanceUID
    big.PixelData = RAMP12.astype(">u2").tobytes()
    big.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=False)
    assert np.array_equal(grey(buffer.getvalue()), plain)


def test_recognised_by_content_without_preamble_or_extension(tmp_path):
    data = encoded(dataset(RAMP12, bits_stored=12, ViewPosition="PA"), preamble=False)
    assert data[128:132] != b"DICM" and looks_like_dicom(data)
    path = tmp_path / "IM000001"
    path.write_bytes(data)
    read = read_image(str(path), 30, BIG)
    assert read.error is None and read.view == "PA"
    assert np.array_equal(read.image[:, :, 0], expected_resized(minmax(RAMP12), 30)[:, :, 0])


def test_dicom_under_an_image_extension_is_read_as_dicom(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(encoded(dataset(RAMP12, bits_stored=12)))
    assert read_image(str(path), 30, BIG).error is None


@pytest.mark.parametrize("name", ["scan.dcm", "IM000002"])
def test_a_dicom_name_with_other_content_is_rejected(tmp_path, name):
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    (tmp_path / name).write_bytes(buffer.getvalue())
    assert "not DICOM" in read_image(str(tmp_path / name), 30, BIG).error


# ---------------------------------------------------------------- bad files

def test_no_pixel_data_is_rejected_by_name():
    ds = dataset(None)
    ds.Rows, ds.Columns = 10, 10
    with pytest.raises(ImageRejected, match="no pixel data"):
        decode_dicom(encoded(ds), BIG)


def test_a_transfer_syntax_without_decoder_names_its_uid():
    htj2k = "1.2.840.10008.1.2.4.201"  # High-Throughput JPEG 2000: no pinned decoder reads it
    data = encapsulated([b"\xff\x4f\xff\x51" + b"\x00" * 60], 8, 8, htj2k)
    with pytest.raises(ImageRejected, match=rf"transfer syntax {htj2k} \(.*\) has no decoder installed"):
        decode_dicom(data, BIG)


def test_truncated_files_are_rejected_as_truncated():
    data = encoded(dataset(RAMP12, bits_stored=12))
    header_end = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
    for cut in (len(data) - 1, header_end + 20, header_end - 5):
        with pytest.raises(ImageRejected, match="truncated"):
            decode_dicom(data[:cut], BIG)
    j2k = _real(J2K)
    with pytest.raises(ImageRejected, match="truncated"):
        decode_dicom(j2k[: len(j2k) // 2], BIG)


def test_rows_times_columns_checked_before_decoding():
    ds = dataset(RAMP12, bits_stored=12)
    ds.Rows, ds.Columns = 20_000, 10_000  # the pixel data is far too short: never read
    with pytest.raises(ImageRejected, match="10000x20000 exceeds the 50-megapixel limit"):
        decode_dicom(encoded(ds), BIG)


def test_read_image_never_raises_for_a_bad_dicom(tmp_path):
    path = tmp_path / "bad.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x40\x00" + b"1.2")
    assert read_image(str(path), 30, BIG).error


# ---------------------------------------------------------------- views

@pytest.mark.parametrize("value, view", [
    ("PA", "PA"), ("pa", "PA"), ("AP", "AP"), ("AP Supine", "AP"), ("AP_ERECT", "AP"), ("ap portable", "AP"),
    ("LL", "LATERAL"), ("RL", "LATERAL"), ("Lateral", "LATERAL"), ("", ""), (None, ""), ("LLD", "LLD"),
])
def test_normalise_view(value, view):
    assert normalise_view(value) == view


def test_view_filter_keeps_named_views_and_unknown_unless_excluded():
    views = ViewFilter.parse("PA,AP")
    assert views.reason("AP Supine") is None and views.reason("PA") is None and views.reason("") is None
    assert views.reason("LL") == "view LATERAL not in views PA,AP"
    strict = ViewFilter.parse("PA,AP,-unknown")
    assert "unknown" in strict.reason("") and strict.reason("PA") is None
    assert ViewFilter.parse("").reason("LL") is None
    with pytest.raises(ValueError, match="names no view"):
        ViewFilter.parse("-unknown")


def test_lateral_dicom_is_excluded_before_its_pixels_are_decoded():
    ds = dataset(RAMP12, bits_stored=12, ViewPosition="LL")
    ds.Rows = 20_000  # would be rejected if the size were checked first
    with pytest.raises(ImageExcluded, match="view LATERAL not in views PA,AP"):
        decode_file(encoded(ds), 30, BIG, views=ViewFilter.parse("PA,AP"))
    kept = decode_file(encoded(dataset(RAMP12, bits_stored=12, ViewPosition="AP SUPINE")), 30, BIG,
                       views=ViewFilter.parse("PA,AP"))
    assert kept.view == "AP"
    # A manifest's view wins over the header's.
    assert decode_file(encoded(dataset(RAMP12, bits_stored=12, ViewPosition="LL")), 30, BIG,
                       views=ViewFilter.parse("PA"), listed_view="PA").view == "PA"


# ---------------------------------------------------------------- pseudonyms

def test_no_salt_fails_before_any_work_naming_the_variable(spark, tmp_path, monkeypatch):
    from covid_spark.config import load_config
    from covid_spark.stages.preprocess import preprocess

    monkeypatch.delenv(SALT_ENV, raising=False)
    for label in ("covid", "normal"):
        os.makedirs(tmp_path / "in" / label)
        (tmp_path / "in" / label / "a.dcm").write_bytes(encoded(dataset(RAMP12, bits_stored=12, PatientID="P-77")))
    with pytest.raises(ValueError, match=SALT_ENV) as caught:
        preprocess(spark, str(tmp_path / "in"), str(tmp_path / "out"), load_config(None))
    assert "P-77" not in str(caught.value)
    assert not os.path.exists(tmp_path / "out") and not any(p.startswith("out") for p in os.listdir(tmp_path))
    require_no_patient_ids([str(tmp_path / "in" / "covid" / "missing.dcm")])  # unreadable: judged later


def test_the_salt_never_shows_in_a_repr_or_a_reason():
    assert "zz-secret" not in repr(Pseudonyms("zz-secret"))
    read = read_image(RSNA, 32, BIG, pseudonyms=Pseudonyms(None))
    assert SALT_ENV in read.error and read.image is None


def test_reading_a_header_emits_no_warning_or_log_line(caplog, capfd, recwarn):
    """pydicom's validation warns, and logs, about header values (some messages quote them: "Invalid value
    for VR DA: '…'"); reading stays silent, so no header value, an identifier among them, reaches a log."""
    import logging

    import pydicom.config

    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:  # an over-long PatientID and PatientName component: pydicom warns when reading them
        data = encoded(dataset(RAMP12, bits_stored=12, PatientID="QQLEAK-ID" * 9,
                               PatientName="Qqleak^Name" * 7, ViewPosition="PA"))
    finally:
        pydicom.config.settings.writing_validation_mode = mode
    caplog.set_level(logging.DEBUG)
    caplog.clear(), capfd.readouterr(), recwarn.clear()  # what making the file printed
    decoded = decode_dicom(data, BIG, pseudonyms=Pseudonyms("s"))
    assert decoded.patient_id and decoded.view == "PA"
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []
    assert len(recwarn) == 0 and capfd.readouterr() == ("", "")
