"""Image files and encoded bytes -> H x W x 3 uint8 RGB, by the project's decoding convention
(docs/protocol.md §5, docs/decoding.md), with the pixel and file-size limits every host applies.

numpy and OpenCV only. The pixel limit is checked from the file's header before decoding (the
header readers below give an upper bound of what the decoder will allocate), by OpenCV's own
limit while decoding, and on the decoded image.
"""

from __future__ import annotations

import os
import stat
import struct

import numpy as np

from .atomic import file_kind
from .errors import ImageError

__all__ = ["DECODER_MAX_PIXELS", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "MAX_FILE_BYTES", "check_pixel_limit",
           "decode_image", "image_size_from_header", "load_image", "read_image_file"]

DEFAULT_MAX_PIXELS = 100_000_000  # refuse larger images from their header, before decoding
# OpenCV's own limit, the backstop behind the header check: it reads OPENCV_IO_MAX_IMAGE_PIXELS
# when it first decodes an image, so it is set here (unless the user set it) before any decode.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))
try:
    DECODER_MAX_PIXELS = int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])
except ValueError:
    DECODER_MAX_PIXELS = DEFAULT_MAX_PIXELS


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError("corrupt JPEG (bad marker)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            # a truncated file has no end-of-image marker after its scans
            if b"\xff\xd9" not in data[pos:]:
                raise ImageError("truncated JPEG (no end-of-image marker)")
            return width, height
        if marker in (0xDA, 0xD9):
            break
        pos += 2 + length
    raise ImageError("truncated or corrupt JPEG (no frame header)")


# TIFF field types that libtiff converts to an integer ImageWidth/ImageLength: type -> (format, size)
TIFF_INTEGER_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 6: ("b", 1), 8: ("h", 2), 9: ("i", 4)}


def _tiff_size(data: bytes) -> tuple[int, int]:
    """ImageWidth and ImageLength of the first directory (the one OpenCV reads).

    A tag may appear more than once: the first copy counts, as in libtiff, which decodes TIFF for
    OpenCV here and for the Node host's sharp (docs/decoding.md §2); OpenCV's own pixel limit
    stays the backstop should a decoder disagree.
    """
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
        found: dict[int, int] = {}
        for i in range(count):
            entry = data[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
            tag, typ, n = struct.unpack(order + "HHI", entry[:8])
            if tag not in (256, 257):
                continue
            if typ not in TIFF_INTEGER_TYPES or n != 1:
                raise ImageError(f"corrupt TIFF header (tag {tag} has type {typ}, count {n})")
            fmt, size = TIFF_INTEGER_TYPES[typ]
            value = struct.unpack(order + fmt, entry[8:8 + size])[0]
            found.setdefault(tag, value)
        return found[256], found[257]
    except (struct.error, KeyError):
        raise ImageError("truncated or corrupt TIFF header") from None


def _pnm_size(data: bytes) -> tuple[int, int]:
    tokens, pos = [], 2
    while len(tokens) < 2 and pos < min(len(data), 4096):
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        tokens.append(data[start:pos])
    try:
        return int(tokens[0]), int(tokens[1])
    except (IndexError, ValueError):
        raise ImageError("corrupt PNM header") from None


def image_size_from_header(data: bytes) -> tuple[int, int]:
    """(width, height) read from the file header alone, so huge images are refused undecoded."""
    try:
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            if data[12:16] != b"IHDR":
                raise ImageError("corrupt PNG header")
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM":
            if struct.unpack("<I", data[14:18])[0] == 12:
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", data[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L":
                b0, b1, b2, b3 = data[21:25]
                return 1 + (((b1 & 0x3F) << 8) | b0), 1 + (((b3 & 0xF) << 10) | (b2 << 2) | (b1 >> 6))
            if chunk == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            raise ImageError("corrupt WebP header")
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if data[:1] == b"P" and data[1:2] in b"123456":
            return _pnm_size(data)
    except (struct.error, ValueError):
        raise ImageError("truncated or corrupt image header") from None
    raise ImageError("not a supported image (JPEG, PNG, BMP, GIF, WebP, TIFF or PNM)")


_OPENCV_QUIET = False  # set once OpenCV's logging is silenced


def _opencv():
    """cv2, with its own log lines silenced: every failure reaches the user as one ImageError line."""
    import cv2

    global _OPENCV_QUIET
    if not _OPENCV_QUIET:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _OPENCV_QUIET = True
    return cv2


def check_pixel_limit(width: int, height: int, max_pixels: int) -> None:
    """Refuse a width x height image over `max_pixels` (or of no size) with the user's option named."""
    if width <= 0 or height <= 0:
        raise ImageError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} image exceeds the pixel limit of {max_pixels} (--max-pixels)")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB, by the project's decoding convention.

    Grayscale is replicated to three channels, alpha dropped, 16-bit scaled to 8 bits, EXIF
    orientation applied. The size is checked against max_pixels from the header first (an
    upper bound of what the decoder will allocate), by OpenCV's own limit while decoding
    (OPENCV_IO_MAX_IMAGE_PIXELS, see DECODER_MAX_PIXELS) and on the decoded image.
    """
    if not data:
        raise ImageError("empty file")
    check_pixel_limit(*image_size_from_header(data), max_pixels)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data:
        raise ImageError("truncated PNG (no IEND chunk)")
    cv2 = _opencv()
    # ANYDEPTH keeps 16-bit samples; ANYCOLOR gives 1 or 3 channels (alpha dropped, CMYK
    # converted); any flag but IMREAD_UNCHANGED applies the EXIF orientation.
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE" in str(e):
            raise ImageError(f"image exceeds the decoder's pixel limit of {DECODER_MAX_PIXELS} "
                             "(OPENCV_IO_MAX_IMAGE_PIXELS)") from None
        raise ImageError("cannot decode image (corrupt or unsupported)") from None
    if image is None:
        raise ImageError("cannot decode image (corrupt or unsupported)")
    check_pixel_limit(image.shape[1], image.shape[0], max_pixels)
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"unsupported sample type {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


MAX_FILE_BYTES = 1 << 30
"""The largest image file any host reads (docs/decoding.md): 1 GiB holds the largest image within
the default pixel limit in any supported format (16-bit RGBA uncompressed: 8 bytes a pixel, 800 MB
at 100 megapixels) and bounds what a hostile file can make a host hold in memory."""


def read_image_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; anything else is an ImageError naming it.

    A FIFO or a device named like an image would block or never end: the name is checked with
    stat, opened non-blocking (so a FIFO cannot hang open()), and the open file checked again
    (the name may have been replaced in between).
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"{path}: cannot read: {file_kind(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None
    with open(fd, "rb") as f:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ImageError(f"{path}: cannot read: {file_kind(opened.st_mode)}, not a regular file")
        if opened.st_size > max_bytes:
            raise ImageError(f"{path}: file of {opened.st_size} bytes exceeds the size limit of {max_bytes} bytes")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:  # it grew while being read
        raise ImageError(f"{path}: file of more than {max_bytes} bytes exceeds the size limit of {max_bytes} bytes")
    return data


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file; errors name the file and the problem in one line.

    Only regular files of at most MAX_FILE_BYTES are read (see read_image_file).
    """
    data = read_image_file(path)
    try:
        return decode_image(data, max_pixels)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
