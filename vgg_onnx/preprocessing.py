"""The project's preprocessing conventions (docs/protocol.md §5), shared by training and the runtime.

numpy and OpenCV only. Every implementation (Python, the C++ and Node hosts) follows these
rules so that all produce the same numbers; export records them in the model's metadata.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import asdict, dataclass

import numpy as np

from .atomic import file_kind
from .errors import UsageError, VggOnnxError

__all__ = ["CONVENTIONS", "DECODER_MAX_PIXELS", "DEFAULT_MAX_PIXELS", "GRID_SIZE", "IMAGE_EXTENSIONS",
           "IMAGENET_MEAN_RGB", "NORMALIZATIONS", "ImageError", "Normalization", "check_pixel_limit",
           "check_scales", "check_train_scales", "crop_boxes", "decode_image", "default_test_scales", "grid_offsets",
           "image_size_from_header", "load_image", "MAX_FILE_BYTES", "mirror", "normalization_preset", "parse_scales",
           "read_image_file", "rescale", "rescaled_size"]

DEFAULT_MAX_PIXELS = 100_000_000  # refuse larger images from their header, before decoding
# OpenCV's own limit, the backstop behind the header check: it reads OPENCV_IO_MAX_IMAGE_PIXELS
# when it first decodes an image, so it is set here (unless the user set it) before any decode.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))
try:
    DECODER_MAX_PIXELS = int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])
except ValueError:
    DECODER_MAX_PIXELS = DEFAULT_MAX_PIXELS
GRID_SIZE = 5  # multi-crop: a 5x5 grid of crops per scale


class ImageError(VggOnnxError):
    """An image that cannot be used; the message names the problem, the caller adds the path."""


# --- rescale rule, crop grid, scales -------------------------------------------------------

def rescaled_size(width: int, height: int, q: int) -> tuple[int, int]:
    """Isotropic rescale: the shorter side becomes exactly q, the longer floor(L*q/short + 0.5).

    Integer arithmetic, so every host computes the same size: floor(L*q/s + 1/2) = (2Lq + s) // 2s.
    """
    if width <= height:
        return q, (2 * height * q + width) // (2 * width)
    return (2 * width * q + height) // (2 * height), q


def rescale(image: np.ndarray, q: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Rescale an HxWxC image so its shorter side is q: INTER_AREA shrinking, INTER_LINEAR enlarging."""
    import cv2

    height, width = image.shape[:2]
    new_w, new_h = rescaled_size(width, height, q)
    if new_w * new_h > max_pixels:
        raise ImageError(f"rescaled to {new_w}x{new_h} it would exceed the pixel limit of {max_pixels}")
    if (new_w, new_h) == (width, height):
        return image
    interpolation = cv2.INTER_AREA if q < min(width, height) else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def mirror(image: np.ndarray) -> np.ndarray:
    """Horizontal flip of an HxWxC image."""
    return np.ascontiguousarray(image[:, ::-1])


def grid_offsets(length: int, crop: int, n: int = GRID_SIZE) -> list[int]:
    """round(linspace(0, length - crop, n)), rounding halves up: floor(i*(L-c)/(n-1) + 1/2)."""
    if length < crop:
        raise ImageError(f"side {length} is smaller than the crop {crop}")
    span = length - crop
    return [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def crop_boxes(width: int, height: int, crop: int, n: int = GRID_SIZE) -> list[tuple[int, int]]:
    """(left, top) of the n x n crop grid, row by row."""
    return [(x, y) for y in grid_offsets(height, crop, n) for x in grid_offsets(width, crop, n)]


def default_test_scales(train_scales: list[int], crop: int = 0) -> list[int]:
    """docs/protocol.md §3: {S-32, S, S+32} for fixed S, {Smin, (Smin+Smax)/2, Smax} for jittered S.

    A scale under the crop size cannot be evaluated: it is raised to the crop (S-32 < crop
    happens for small training scales such as S = 146 with crop 128).
    """
    if len(train_scales) == 1:
        s = train_scales[0]
        scales = [s - 32, s, s + 32]
    else:
        lo, hi = train_scales
        scales = [lo, (lo + hi) // 2, hi]
    return sorted({max(q, crop) for q in scales})


def parse_scales(text: str) -> list[int]:
    """'256' -> [256]; '256,512' -> [256, 512]. An empty item ('256,,384', '256,') is an error."""
    try:
        scales = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"scales {text!r} are not comma-separated integers") from None
    if any(s <= 0 for s in scales):
        raise UsageError(f"scales {text!r} must be positive integers")
    return scales


def check_scales(scales: list[int], crop: int) -> list[int]:
    """Scales (training S or test Q) none of which is below the crop size."""
    small = [s for s in scales if s < crop]
    if small:
        raise UsageError(f"scale {small[0]} is smaller than the model's crop size {crop}")
    return scales


def check_train_scales(scales: list[int], crop: int | None = None) -> list[int]:
    """Training scales, the one rule for train and export: [S] (single-scale) or [Smin, Smax] with
    Smin < Smax (scale jittering), none below the crop size when it is given."""
    if len(scales) not in (1, 2) or (len(scales) == 2 and scales[0] >= scales[1]):
        raise UsageError(f"training scales {','.join(map(str, scales))}: give S, or Smin,Smax with Smin < Smax")
    return scales if crop is None else check_scales(scales, crop)


# --- normalisation presets ----------------------------------------------------------------

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)  # the paper's mean pixel (Caffe release), 0..255


@dataclass(frozen=True)
class Normalization:
    """What the weights expect of a 0..255 RGB image: (x[channels] - mean) / std.

    mean and std are per channel in RGB order and 0..255 units; channel_order is the order
    the weights' first layer reads ("BGR" for Caffe weights). Export puts this in the graph.
    """

    preset: str
    mean_rgb: tuple[float, float, float]
    std_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"

    def apply(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 RGB 0..255 -> float32 HxWx3 as the weights expect (channel order included)."""
        out = (image.astype(np.float32) - np.float32(self.mean_rgb)) / np.float32(self.std_rgb)
        return out[..., ::-1] if self.channel_order == "BGR" else out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(d["preset"], tuple(map(float, d["mean_rgb"])), tuple(map(float, d["std_rgb"])),
                   d.get("channel_order", "RGB"))


NORMALIZATIONS = {
    # subtract the training set's mean RGB; this default is ImageNet's, a checkpoint brings its own
    "paper": Normalization("paper", IMAGENET_MEAN_RGB),
    # torchvision: RGB / 255, then (x - mean) / std
    "torchvision": Normalization("torchvision", (0.485 * 255, 0.456 * 255, 0.406 * 255),
                                 (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    # the original Caffe release: BGR, minus the mean pixel B 103.939, G 116.779, R 123.68
    "caffe": Normalization("caffe", IMAGENET_MEAN_RGB, channel_order="BGR"),
}


def normalization_preset(preset: str, mean_rgb=None) -> Normalization:
    """A named preset of NORMALIZATIONS (with the training set's own mean RGB when given)."""
    if preset not in NORMALIZATIONS:
        raise UsageError(f"unknown normalization {preset!r}; valid: {', '.join(NORMALIZATIONS)}")
    norm = NORMALIZATIONS[preset]
    if mean_rgb is not None:
        norm = Normalization(norm.preset, tuple(map(float, mean_rgb)), norm.std_rgb, norm.channel_order)
    return norm


# --- decoding -----------------------------------------------------------------------------

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
    """The largest ImageWidth and ImageLength declared in the first directory (the one OpenCV reads).

    A tag may appear more than once; libtiff keeps the first, other readers the last. Whichever
    copy a decoder uses, it is one of these values, so their maximum bounds the decoded size.
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
            found[tag] = max(found.get(tag, value), value)
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


# --- the conventions as data, for the model's metadata ------------------------------------

CONVENTIONS = {
    "decode": "8-bit RGB; grayscale replicated to 3 channels; alpha dropped; 16-bit scaled to 8 bits "
              "(round(v*255/65535)); EXIF orientation applied; embedded ICC profiles not applied (values as stored)",
    "rescale": "isotropic: shorter side = Q exactly, longer side = floor(L*Q/shorter + 0.5) "
               "= (2*L*Q + shorter) // (2*shorter); OpenCV INTER_AREA when shrinking, INTER_LINEAR when enlarging",
    "input": "float32 N x 3 x H x W, RGB, values 0..255, H and W at least crop_size; normalisation is inside the graph",
    "dense": "per scale: softmax of the spatial mean of the score map (output 'probs'), mean over "
             "{image, mirrored image}; then mean over scales",
    "multi_crop": "per scale: crops of crop_size at left = floor(i*(W-c)/4 + 0.5), top = floor(j*(H-c)/4 + 0.5), "
                  "i, j in 0..4, plus their mirror images (50 crops); mean of all posteriors over all scales",
    "combination": "equal-weight mean of posteriors (dense and multi-crop; several models)",
}
