"""The preprocessing conventions (docs/protocol.md §5) and the decoder's handling of bad and odd images."""

from __future__ import annotations

import io
import os
import struct
import zlib
from fractions import Fraction

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from vgg_onnx.decoding import decode_image, image_size_from_header, load_image
from vgg_onnx.errors import ImageError, UsageError
from vgg_onnx.scales import (check_scales, crop_boxes, default_test_scales, grid_offsets, mirror, parse_scales,
                             rescale, rescaled_size)


def encode(image: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-checked) IHDR claims width x height, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + png_chunk(b"IEND", b""))


def two_colour(height=20, width=40) -> np.ndarray:
    """Red left half, blue right half: shows mirroring and rotation."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (255, 0, 0)
    image[:, width // 2:] = (0, 0, 255)
    return image


# --- rescale rule ----------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,q,expected", [
    (500, 375, 256, (341, 256)),  # 500*256/375 = 341.33
    (375, 500, 256, (256, 341)),
    (300, 200, 256, (384, 256)),  # exact
    (3, 2, 3, (5, 3)),  # 4.5 rounds half up
    (224, 224, 384, (384, 384)),
    (20000, 8, 256, (640000, 256)),
])
def test_rescaled_size_examples(width, height, q, expected):
    assert rescaled_size(width, height, q) == expected


def test_rescaled_size_matches_the_rule_exactly():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(1, 5000, 2))
        q = int(rng.integers(32, 1024))
        short, long_ = min(width, height), max(width, height)
        expected_long = int(Fraction(long_ * q, short) + Fraction(1, 2))  # floor(L*Q/s + 1/2), exact
        new_w, new_h = rescaled_size(width, height, q)
        assert (new_w, new_h) == ((q, expected_long) if width <= height else (expected_long, q))


def test_rescale_interpolation_follows_direction():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    small = rescale(image, 150)
    assert small.shape == (150, 200, 3)
    np.testing.assert_array_equal(small, cv2.resize(image, (200, 150), interpolation=cv2.INTER_AREA))
    large = rescale(image, 450)
    assert large.shape == (450, 600, 3)
    np.testing.assert_array_equal(large, cv2.resize(image, (600, 450), interpolation=cv2.INTER_LINEAR))
    assert rescale(image, 300) is image  # already the right size


def test_rescale_refuses_a_rescaled_size_over_the_limit():
    thin = np.zeros((8, 20000, 3), np.uint8)  # 160,000 pixels: under the limit as decoded
    with pytest.raises(ImageError, match="640000x256 it would exceed the pixel limit"):
        rescale(thin, 256)
    assert rescale(thin, 64, max_pixels=200_000_000).shape == (64, 160000, 3)


def test_mirror():
    image = two_colour()
    flipped = mirror(image)
    assert flipped.flags.c_contiguous
    np.testing.assert_array_equal(flipped[:, 0], image[:, -1])
    np.testing.assert_array_equal(mirror(flipped), image)


# --- crop grid and scales ------------------------------------------------------------------------

def test_grid_offsets_are_rounded_linspace_halves_up():
    assert grid_offsets(224, 224) == [0, 0, 0, 0, 0]
    assert grid_offsets(256, 224) == [0, 8, 16, 24, 32]
    assert grid_offsets(341, 224) == [0, 29, 59, 88, 117]  # 29.25, 58.5 (half up), 87.75
    assert grid_offsets(226, 224) == [0, 1, 1, 2, 2]  # 0.5 -> 1, 1.5 -> 2
    for length in range(224, 800):
        expected = [int(Fraction(i * (length - 224), 4) + Fraction(1, 2)) for i in range(5)]
        assert grid_offsets(length, 224) == expected
    with pytest.raises(ImageError):
        grid_offsets(223, 224)


def test_crop_boxes_row_by_row_inside_the_image():
    boxes = crop_boxes(341, 256, 224)
    assert len(boxes) == 25
    assert boxes[:5] == [(0, 0), (29, 0), (59, 0), (88, 0), (117, 0)]
    assert boxes[5] == (0, 8) and boxes[-1] == (117, 32)
    assert all(0 <= x <= 341 - 224 and 0 <= y <= 256 - 224 for x, y in boxes)


def test_default_test_scales_and_parsing():
    assert default_test_scales([256]) == [224, 256, 288]
    assert default_test_scales([384]) == [352, 384, 416]
    assert default_test_scales([256, 512]) == [256, 384, 512]
    # a scale under the crop cannot be evaluated: raised to the crop
    assert default_test_scales([146], crop=128) == [128, 146, 178]
    assert default_test_scales([224], crop=224) == [224, 256]
    assert parse_scales("256,384, 512") == [256, 384, 512]
    for bad in ("abc", "256;384", "0", "-5", ""):
        with pytest.raises(UsageError):
            parse_scales(bad)
    assert check_scales([224, 256], 224) == [224, 256]
    with pytest.raises(UsageError, match="scale 200 is smaller than the model's crop size 224"):
        check_scales([256, 200], 224)


# --- headers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("BMP", {}),
                                        ("GIF", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}),
                                        ("WEBP", {}), ("WEBP", {"lossless": True}), ("PPM", {})])
def test_header_size_of_every_format(fmt, kwargs):
    data = encode(two_colour(21, 43), fmt, **kwargs)
    assert image_size_from_header(data) == (43, 21)
    assert decode_image(data).shape == (21, 43, 3)


# --- decoding: odd but valid images --------------------------------------------------------------

def test_grayscale_is_replicated():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    image = decode_image(encode(gray))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], gray)


def test_rgba_drops_alpha_whatever_its_value():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 0  # fully transparent: the colour is kept, not composited
    image = decode_image(encode(rgba))
    assert image.shape == (8, 8, 3)
    assert (image == (10, 20, 30)).all()


def test_gray_alpha_and_palette():
    la = decode_image(encode(np.dstack([np.full((4, 4), 77, np.uint8), np.zeros((4, 4), np.uint8)])))
    assert la.shape == (4, 4, 3) and (la == 77).all()
    palette = decode_image(encode(two_colour(), "GIF"))  # GIF is palette-based
    assert tuple(palette[0, 0]) == (255, 0, 0) and tuple(palette[0, -1]) == (0, 0, 255)


def test_16_bit_png_scaled_to_8_bits():
    values = (np.arange(256, dtype=np.uint16) * 257)[None, :].repeat(2, 0)  # k*257 -> k exactly
    values[1, :4] = (128, 129, 65534, 32896)  # rounding: 0.498 -> 0, 0.502 -> 1, 254.996 -> 255, 128
    ok, data = cv2.imencode(".png", values)
    image = decode_image(data.tobytes())
    assert image.dtype == np.uint8 and image.shape == (2, 256, 3)
    np.testing.assert_array_equal(image[0, :, 0], np.arange(256))
    assert list(image[1, :4, 0]) == [0, 1, 255, 128]
    ok, data = cv2.imencode(".png", np.dstack([values] * 3))  # 16-bit colour too
    assert (decode_image(data.tobytes())[0, :, 1] == np.arange(256)).all()


def test_cmyk_jpeg_becomes_rgb():
    data = _cmyk_jpeg(two_colour())
    image = decode_image(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert image.shape == (20, 40, 3)
    assert np.abs(image.astype(int) - expected).max() <= 3


def _cmyk_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "CMYK"
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(two_colour(), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert image.shape == expected.shape == ((20, 40, 3) if orientation == 3 else (40, 20, 3))
    assert np.abs(image.astype(int) - expected).max() <= 2


def test_non_ascii_file_name(tmp_path):
    path = tmp_path / "chat_ünïcödé_猫.png"
    path.write_bytes(encode(two_colour()))
    assert load_image(path).shape == (20, 40, 3)


# --- decoding: bad input gives one line naming the problem ---------------------------------------

def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(path)


def test_text_named_jpg():
    with pytest.raises(ImageError, match="not a supported image"):
        decode_image(b"hello, I am not a picture\n")


def test_truncated_jpeg():
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(ImageError, match="truncated JPEG"):
            decode_image(data[:cut])
    with pytest.raises(ImageError, match="JPEG"):
        decode_image(data[:100])  # ends inside the headers


def test_truncated_png():
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="truncated PNG"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageError):
        decode_image(data[:20])  # not even a whole IHDR


def test_png_header_claiming_100000_squared_is_refused_undecoded():
    data = png_header_only(100_000, 100_000)
    assert image_size_from_header(data) == (100_000, 100_000)
    with pytest.raises(ImageError, match="100000x100000 image exceeds the pixel limit of 100000000"):
        decode_image(data)


def test_pixel_limit_is_configurable():
    data = encode(np.zeros((100, 200, 3), np.uint8))
    with pytest.raises(ImageError, match="200x100 image exceeds the pixel limit of 19999"):
        decode_image(data, max_pixels=19_999)
    assert decode_image(data, max_pixels=20_000).shape == (100, 200, 3)


def test_extreme_aspect_ratio_decodes_but_its_rescale_is_refused():
    data = encode(np.zeros((8, 20000, 3), np.uint8))
    image = decode_image(data)  # 160,000 pixels decode fine
    assert image.shape == (8, 20000, 3)
    with pytest.raises(ImageError, match="exceed the pixel limit"):
        rescale(image, 256)  # 640000 x 256 = 163.8 MP


def test_unreadable_file(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop root from reading (see the folder case)")
    path = tmp_path / "locked.png"
    path.write_bytes(encode(two_colour()))
    path.chmod(0)
    with pytest.raises(ImageError, match=r"locked\.png: cannot read: Permission denied"):
        load_image(path)


def test_a_folder_or_missing_file_cannot_be_read(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match=r"folder\.jpg: cannot read"):
        load_image(tmp_path / "folder.jpg")
    with pytest.raises(ImageError, match=r"missing\.jpg: cannot read: No such file"):
        load_image(tmp_path / "missing.jpg")
