"""What the runtime accepts as an image: a file path, encoded bytes, or an RGB numpy array.

All three end as an H x W x 3 uint8 RGB array under the same rules (docs/protocol.md §5): files
and bytes through the project's decoder, arrays checked and converted as `to_rgb` says. The
pixel limit applies to all three.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from vgg_onnx.decoding import DEFAULT_MAX_PIXELS, decode_image, load_image
from vgg_onnx.errors import ImageError

__all__ = ["ImageInput", "to_rgb", "source_label"]

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]
"""A path, the bytes of an encoded image (JPEG, PNG...), or an H x W x 3 RGB uint8 array."""


def source_label(source: ImageInput, index: int = 0) -> str:
    """How results and errors name an input: its path, else `<bytes #i>` / `<array #i>`."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, np.ndarray):
        return f"<array #{index}>"
    return f"<bytes #{index}>"


def array_to_rgb(array: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An array as the decoder would have produced it, or ImageError saying why not."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"array of shape {array.shape}: expected H x W x 3 (RGB), H x W x 4 or H x W")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} image exceeds the pixel limit of {max_pixels} (--max-pixels)")
    if array.dtype == np.uint16:  # the decoder's 16-bit rule: round(v * 255 / 65535)
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"{array.dtype} array: expected uint8 RGB 0..255 (for floats in 0..1, pass "
                         "(x * 255).round().astype(np.uint8))")
    if array.shape[2] == 1:  # gray, replicated as the decoder does
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    return np.ascontiguousarray(array[:, :, :3])  # alpha dropped, as the decoder does


def to_rgb(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path, encoded bytes or an array -> H x W x 3 uint8 RGB.

    Arrays are taken as RGB: a BGR array from OpenCV's imread gives wrong colours (pass
    `image[..., ::-1]`). Gray (H x W or H x W x 1) is replicated to three channels and an alpha
    channel dropped, as the decoder does for files; uint16 is scaled to 8 bits by the decoder's
    rule; float and other types are refused, since 0..1 and 0..255 cannot be told apart.
    Raises ImageError (one line) for anything unusable.
    """
    if isinstance(source, (str, os.PathLike)):
        return load_image(source, max_pixels)
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), max_pixels)
    raise ImageError(f"cannot classify a {type(source).__name__}: give a path, encoded bytes or a numpy array")
