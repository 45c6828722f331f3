"""The paper's training augmentation (docs/protocol.md §2), on numpy images, one generator per sample.

Every random draw for a sample comes from a generator seeded by (seed, epoch, sample index),
so a sample's pixels do not depend on the number of data workers or processes, and a resumed
run sees exactly the images the interrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vgg_onnx.errors import ImageError
from vgg_onnx.scales import mirror, rescale, rescaled_size

# Stream tags keep the generators of different purposes apart for equal (seed, epoch, i).
SAMPLE_STREAM = 1
SHUFFLE_STREAM = 2
STEP_STREAM = 3
INIT_STREAM = 4

COLOUR_SHIFT_STD = 0.1  # alpha_i ~ N(0, 0.1), AlexNet's PCA lighting


def generator(stream: int, seed: int, a: int, b: int = 0) -> np.random.Generator:
    """A generator determined by (stream, seed, a, b) alone; all four fixed-length, so streams never collide."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([stream, seed, a, b])))


def derived_seed(stream: int, seed: int, a: int, b: int = 0) -> int:
    """A 63-bit seed for torch, derived like `generator`."""
    return int(generator(stream, seed, a, b).integers(0, 2 ** 63 - 1))


@dataclass(frozen=True)
class PCA:
    """Eigen decomposition of the training set's RGB pixel covariance, pixels in [0, 1] units.

    eigenvectors[:, i] belongs to eigenvalues[i]. The shift sum_i alpha_i * lambda_i * p_i is in
    [0, 1] units, as AlexNet and its reimplementations compute it; it is applied times 255.
    """

    eigenvalues: tuple[float, float, float]
    eigenvectors: tuple[tuple[float, float, float], ...]  # 3x3, columns are eigenvectors

    def shift(self, alpha: np.ndarray) -> np.ndarray:
        """RGB offset in 0..255 units for the draws alpha (3,)."""
        vectors = np.asarray(self.eigenvectors, np.float64)
        return 255.0 * vectors @ (alpha * np.asarray(self.eigenvalues, np.float64))


@dataclass(frozen=True)
class Draws:
    """Everything random about one training sample."""

    scale: int
    left: int
    top: int
    flip: bool
    alpha: np.ndarray


def jittered_scale(rng: np.random.Generator, scales: list[int]) -> int:
    """The paper's scale jittering: the training scale S drawn uniformly from the integers of
    [Smin, Smax] for each sample, or the fixed S (single-scale training) with no draw."""
    return int(scales[0]) if len(scales) == 1 else int(rng.integers(scales[0], scales[1] + 1))


def draw(rng: np.random.Generator, scales: list[int], width: int, height: int, crop: int) -> Draws:
    """Draw S (scale jittering), the crop, the mirror and the colour shift's alpha, in that order."""
    scale = jittered_scale(rng, scales)
    new_w, new_h = rescaled_size(width, height, scale)
    left = int(rng.integers(0, new_w - crop + 1))
    top = int(rng.integers(0, new_h - crop + 1))
    flip = bool(rng.integers(0, 2))
    alpha = rng.normal(0.0, COLOUR_SHIFT_STD, 3)
    return Draws(scale, left, top, flip, alpha)


def augment(image: np.ndarray, rng: np.random.Generator, scales: list[int], crop: int,
            pca: PCA | None) -> tuple[np.ndarray, Draws]:
    """HxWx3 uint8 RGB -> crop x crop x 3 float32 RGB (0..255 plus the colour shift), and the draws.

    Rescale (the runtime's rule) to S, random crop, random mirror, PCA colour shift. Mean
    subtraction is the caller's (the Normalization that export puts in the graph).
    """
    height, width = image.shape[:2]
    d = draw(rng, scales, width, height, crop)
    scaled = rescale(image, d.scale)
    if scaled.shape[0] < crop or scaled.shape[1] < crop:
        raise ImageError(f"rescaled to {scaled.shape[1]}x{scaled.shape[0]}, smaller than the crop {crop}")
    patch = scaled[d.top:d.top + crop, d.left:d.left + crop]
    if d.flip:
        patch = mirror(patch)
    out = patch.astype(np.float32)
    if pca is not None:
        out += pca.shift(d.alpha).astype(np.float32)
    return out, d


def centre_crop(image: np.ndarray, q: int, crop: int) -> np.ndarray:
    """Validation view: rescale so the shorter side is Q, then the central crop (uint8)."""
    scaled = rescale(image, q)
    height, width = scaled.shape[:2]
    top, left = (height - crop) // 2, (width - crop) // 2
    return scaled[top:top + crop, left:left + crop]
