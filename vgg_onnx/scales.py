"""Image geometry of the protocol (docs/protocol.md §2, §3, §5): the integer rescale rule, the
mirror, the 5x5 crop grid, and the training and test scales.

Integer arithmetic throughout, so every host (Python, C++, Node) computes the same sizes and
offsets. numpy and OpenCV only.
"""

from __future__ import annotations

import numpy as np

from .decoding import DEFAULT_MAX_PIXELS
from .errors import ImageError, UsageError

__all__ = ["GRID_SIZE", "check_scales", "check_train_scales", "crop_boxes", "default_test_scales", "grid_offsets",
           "mirror", "parse_scales", "rescale", "rescaled_size"]

GRID_SIZE = 5  # multi-crop: a 5x5 grid of crops per scale


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
