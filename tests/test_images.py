"""Tests for covid_spark.inputs.images: decoding rules and rejections."""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_spark.inputs.images import DEFAULT_MAX_PIXELS, decode_image
from covid_spark.inputs.rejects import ImageRejected
from covid_spark.inputs.sources import skip_reason
from tests.imaging import encode, smooth_noise

REAL_COVID_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr3" / "covid"


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim width x height (CRC fixed)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    # signature(8) + length(4) + b"IHDR"(4) + width(4) + height(4) + 5 more bytes, then CRC
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---------------------------------------------------------------- output contract


def test_output_contract_and_determinism():
    data = encode(Image.fromarray(smooth_noise(0, 300)), "JPEG", quality=90)
    first = decode_image(data)
    second = decode_image(data)
    assert first.shape == (224, 224, 3)
    assert first.dtype == np.uint8
    assert first.flags.c_contiguous
    np.testing.assert_array_equal(first, second)


def test_tiny_image_is_upscaled():
    data = encode(Image.new("RGB", (5, 7), (10, 120, 230)), "PNG")
    out = decode_image(data)
    assert out.shape == (224, 224, 3)
    # bilinear interpolation of a constant image is that constant
    assert (out == np.array([10, 120, 230], dtype=np.uint8)).all()


def test_non_square_image_is_stretched_not_padded():
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, :20] = 255  # left half white
    out = decode_image(encode(Image.fromarray(stored), "PNG"), size=40)
    # stretched: every row is the same, left half white, right half black (no padding bands)
    assert (out[:, :19] == 255).all()
    assert (out[:, 21:] == 0).all()


def test_size_argument_is_validated():
    data = encode(Image.new("RGB", (4, 4)), "PNG")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        decode_image(data, size=0)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        decode_image(data, max_pixels=0)


def test_large_jpeg_decodes_with_draft():
    data = encode(Image.fromarray(smooth_noise(3, 1800)), "JPEG", quality=85)
    out = decode_image(data, size=224)
    assert out.shape == (224, 224, 3)
    reference = np.asarray(
        Image.fromarray(smooth_noise(3, 1800)).resize((224, 224), Image.Resampling.BILINEAR),
        dtype=np.int16)
    # DCT-scaled decoding of a smooth picture stays close to a full-size resize
    assert np.abs(out.astype(np.int16) - reference).mean() < 6


# ---------------------------------------------------------------- modes


def test_16bit_gradient_keeps_order_and_spans_full_range():
    low, step = 1000, 200
    row = low + step * np.arange(256)  # 1000 .. 52000, all below 65535
    stored = np.tile(row, (256, 1)).astype(np.uint16)
    img = Image.fromarray(stored)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, size=256)  # same size: no resampling
    expected = np.rint((row - row.min()) * 255.0 / (row.max() - row.min())).astype(np.uint8)
    np.testing.assert_array_equal(out[0, :, 0], expected)
    assert (out == out[:1, :, :1]).all()  # every row and channel identical
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()
    assert out.min() == 0 and out.max() == 255
    assert not (out == 255).all()


def test_16bit_gradient_resized_is_monotonic():
    stored = np.tile(np.linspace(3000, 60000, 300), (100, 1)).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(stored), "PNG"))
    profile = out[112, :, 0].astype(int)
    assert (np.diff(profile) >= 0).all()
    assert profile[0] <= 2 and profile[-1] >= 253


def test_constant_16bit_image_becomes_zero():
    stored = np.full((10, 10), 4321, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(stored), "PNG"), size=10)
    assert (out == 0).all()


def test_float_tiff_is_rescaled_by_its_own_range():
    stored = np.tile(np.array([-1.0, 0.0, 1.0, 3.0], dtype=np.float32), (4, 1))
    data = encode(Image.fromarray(stored), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = decode_image(data, size=4)
    np.testing.assert_array_equal(out[0, :, 1], [0, 64, 128, 255])  # (v+1)/4*255 rounded


def test_grayscale_jpeg_replicates_channels():
    grey = smooth_noise(4, 256)[:, :, 0]
    out = decode_image(encode(Image.fromarray(grey), "JPEG", quality=95))
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    assert out.std() > 5


def test_bilevel_image():
    stored = Image.new("1", (8, 8), 0)
    stored.paste(1, (0, 0, 4, 8))
    out = decode_image(encode(stored, "PNG"), size=8)
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()


def test_cmyk_jpeg_becomes_roughly_the_right_colour():
    red = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # no cyan, full magenta+yellow
    out = decode_image(encode(red, "JPEG", quality=95)).astype(int)
    assert np.abs(out.reshape(-1, 3).mean(axis=0) - [255, 0, 0]).max() < 12


def test_palette_png_without_transparency():
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 0, 200, 0, 0, 0, 180] + [0] * (256 * 3 - 9))
    img.paste(2, (16, 0, 32, 32))
    out = decode_image(encode(img, "PNG"), size=32)
    assert (out[:, :16] == [0, 200, 0]).all()
    assert (out[:, 16:] == [0, 0, 180]).all()


def test_palette_png_transparent_index_becomes_black():
    img = Image.new("P", (32, 32), 1)
    img.putpalette([255, 255, 255, 0, 200, 0] + [0] * (256 * 3 - 6))
    img.paste(0, (16, 0, 32, 32))  # right half uses index 0 (white, but transparent)
    out = decode_image(encode(img, "PNG", transparency=0), size=32)
    assert (out[:, :16] == [0, 200, 0]).all()
    assert (out[:, 16:] == 0).all()


def test_rgba_transparent_region_is_black():
    stored = np.zeros((16, 16, 4), dtype=np.uint8)
    stored[:, :8] = [255, 0, 0, 255]      # opaque red
    stored[:, 8:12] = [255, 255, 255, 0]  # fully transparent white
    stored[:, 12:] = [200, 100, 50, 128]  # half transparent
    out = decode_image(encode(Image.fromarray(stored), "PNG"), size=16).astype(int)
    assert (out[:, :8] == [255, 0, 0]).all()
    assert (out[:, 8:12] == 0).all()
    expected = np.array([200, 100, 50]) * 128 / 255  # over black: colour * alpha
    assert np.abs(out[:, 12:] - expected).max() <= 1


def test_la_alpha_composited_over_black():
    stored = np.zeros((8, 8, 2), dtype=np.uint8)
    stored[:, :, 0] = 200
    stored[:, :4, 1] = 255
    img = Image.fromarray(stored[:, :, 0]).convert("LA")
    img.putalpha(Image.fromarray(stored[:, :, 1]))
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = decode_image(data, size=8)
    assert (out[:, :4] == 200).all()
    assert (out[:, 4:] == 0).all()


def test_multiframe_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data, size=16).astype(int)
    assert np.abs(out - [255, 0, 0]).max() <= 2


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    # Stored pixels are laid out so that, displayed per the EXIF spec, the top half is white.
    #   1/None: as stored -> stored top white
    #   3: rotate 180     -> stored bottom white
    #   6: rotate 90 CW   -> stored left column becomes the top row -> stored left white
    #   8: rotate 90 CCW  -> stored right column becomes the top row -> stored right white
    width, height = (96, 48) if orientation in (6, 8) else (48, 96)
    stored = np.zeros((height, width), dtype=np.uint8)
    if orientation is None:
        stored[: height // 2] = 255
    elif orientation == 3:
        stored[height // 2:] = 255
    elif orientation == 6:
        stored[:, : width // 2] = 255
    else:
        stored[:, width // 2:] = 255
    params = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    out = decode_image(encode(Image.fromarray(stored).convert("RGB"), "JPEG", **params), size=64)
    assert out[:28].mean() > 240, "top half should be white"
    assert out[36:].mean() < 15, "bottom half should be black"


# ---------------------------------------------------------------- rejections


def test_empty_bytes_rejected():
    with pytest.raises(ImageRejected, match=r"^empty file \(0 bytes\)$") as info:
        decode_image(b"")
    assert info.value.reason == "empty file (0 bytes)"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("content", [
    b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    b"  \n\t<html><head></head></html>",
    b"\xef\xbb\xbf<?xml version='1.0'?><Error>AccessDenied</Error>",
])
def test_html_saved_as_jpg_rejected(tmp_path, content):
    path = tmp_path / "scan.jpg"
    path.write_bytes(content)
    assert skip_reason(str(path)) is None  # the name looks fine; the content is not
    with pytest.raises(ImageRejected, match="not an image: looks like HTML/XML"):
        decode_image(path.read_bytes())


def test_pdf_rejected():
    with pytest.raises(ImageRejected, match="not an image: looks like PDF"):
        decode_image(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")


def test_random_bytes_rejected_with_hex_prefix():
    data = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert not data.lstrip().startswith(b"<")
    with pytest.raises(ImageRejected, match=r"unrecognised format \(first bytes: ") as info:
        decode_image(data)
    assert " ".join(f"{b:02x}" for b in data[:16]) in info.value.reason


def test_truncated_jpeg_rejected():
    data = encode(Image.fromarray(smooth_noise(1, 256)), "JPEG", quality=90)
    with pytest.raises(ImageRejected, match="truncated or corrupt JPEG"):
        decode_image(data[: len(data) // 2])


def test_truncated_png_rejected():
    noise = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(ImageRejected, match="truncated or corrupt PNG"):
        decode_image(data[: len(data) // 2])


def test_bomb_beyond_pillow_limit_rejected_from_header():
    data = png_with_size(30000, 30000)
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(ImageRejected, match=r"^30000x30000 exceeds the 50-megapixel limit$"):
        decode_image(data)
    assert time.perf_counter() - started < 1.0  # nothing was decoded or allocated


def test_bomb_below_pillow_limit_rejected_by_our_limit():
    # 80 MP is under Pillow's own warning threshold (~89 MP), so only our check can catch it
    data = png_with_size(10000, 8000)
    with pytest.raises(ImageRejected, match=r"^10000x8000 exceeds the 50-megapixel limit$"):
        decode_image(data)


def test_max_pixels_is_configurable():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageRejected, match=r"100x100 exceeds the 0\.005-megapixel limit"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10_000).shape == (224, 224, 3)
    assert DEFAULT_MAX_PIXELS == 50_000_000


def test_pillow_global_limit_untouched():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected):
        decode_image(png_with_size(30000, 30000))
    assert Image.MAX_IMAGE_PIXELS == before


# ---------------------------------------------------------------- real X-rays


def test_real_xrays_decode():
    if not REAL_COVID_DIR.is_dir():
        pytest.skip(f"real data not found at {REAL_COVID_DIR}")
    paths = sorted(p for p in REAL_COVID_DIR.iterdir() if skip_reason(str(p)) is None)[:3]
    assert len(paths) == 3
    for path in paths:
        data = path.read_bytes()
        out = decode_image(data)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert out.std() > 10, f"{path.name} decoded to a nearly constant image"
        np.testing.assert_array_equal(out, decode_image(data))


def test_read_image_reports_every_bad_file_and_never_raises(tmp_path):
    from covid_spark.inputs.images import read_image

    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 30), 120, dtype=np.uint8)).save(good)
    image, error = read_image(str(good), 32, 50_000_000)[:2]
    assert error is None and image.shape == (32, 32, 3) and int(image[16, 16, 0]) == 120
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    assert read_image(str(tmp_path / "missing.png"), 32, 50_000_000)[:2] == (None, "file not found")
    image, error = read_image(str(tmp_path / "junk.png"), 32, 50_000_000)[:2]
    assert image is None and error
    image, error = read_image(str(folder), 32, 50_000_000)[:2]
    assert image is None and error.startswith("cannot read file")
