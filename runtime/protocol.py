"""The paper's test protocol (docs/protocol.md §3, §5) as named, pure functions.

Each concept has its own function, and the runtime's batched scheduler (evaluate.py), the
Python API (api.py) and the `infer`, `eval` and `bench` commands all compute with these:

- the network inputs of one image at one scale: `dense_views` (the rescaled image and its
  mirror) and `crop_views` (the 5x5 grid of crops and their mirrors);
- `view_posterior`: the mean of the network's posteriors over those views (the graph's `probs`
  output is already the softmax of the score map's spatial mean);
- `dense_posterior` and `multi_crop_posterior`: one image, one scale, one network;
- `multi_scale_posterior`: the mean over test scales;
- `combine_dense_multi_crop`: the dense + multi-crop combination (their mean);
- `fuse_posteriors`: fusion of several models (the mean of their posteriors);
- `classify_image`: all of it for one image and one network, unbatched.

Nothing here batches, times or reads files: the functions take arrays (and, where they run
the network, a callable `network(batch) -> probs`) and return arrays.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from vgg_onnx.decoding import DEFAULT_MAX_PIXELS
from vgg_onnx.scales import crop_boxes, mirror, rescale

__all__ = ["METHODS", "Network", "dense_views", "crop_views", "view_posterior", "dense_posterior",
           "multi_crop_posterior", "multi_scale_posterior", "combine_dense_multi_crop", "fuse_posteriors",
           "classify_image"]

METHODS = ("dense", "multi-crop", "both")

Network = Callable[[np.ndarray], np.ndarray]
"""float32 N x 3 x H x W batch (RGB, 0..255) -> N x classes posteriors (the graph's `probs`)."""


def to_chw(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW uint8 (the float32 cast happens per batch, to keep queued images small)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def dense_views(scaled: np.ndarray, flip: bool = True) -> np.ndarray:
    """Dense evaluation's inputs at one scale: uint8 R x 3 x H x W, the whole rescaled image
    and (with flip) its mirror image."""
    rows = [to_chw(scaled)] + ([to_chw(mirror(scaled))] if flip else [])
    return np.stack(rows)


def crop_views(scaled: np.ndarray, crop: int, flip: bool = True) -> np.ndarray:
    """Multi-crop evaluation's inputs at one scale: uint8 R x 3 x crop x crop, the 5x5 grid of
    crops row by row, then (with flip) their mirror images in the same order."""
    height, width = scaled.shape[:2]
    crops = [scaled[y:y + crop, x:x + crop] for x, y in crop_boxes(width, height, crop)]
    if flip:
        crops += [mirror(c) for c in crops]
    return np.stack(crops).transpose(0, 3, 1, 2).copy()


def view_posterior(probs: np.ndarray) -> np.ndarray:
    """The posterior of a set of views of one image: the mean of their posteriors (float64)."""
    return np.asarray(probs, dtype=np.float64).mean(axis=0)


def dense_posterior(network: Network, scaled: np.ndarray, flip: bool = True) -> np.ndarray:
    """Dense evaluation of one rescaled image: the fully-convolutional net on the image and its
    mirror; each view's posterior is the softmax of its score map's spatial mean; their mean."""
    return view_posterior(network(dense_views(scaled, flip).astype(np.float32)))


def multi_crop_posterior(network: Network, scaled: np.ndarray, crop: int, flip: bool = True) -> np.ndarray:
    """Multi-crop evaluation of one rescaled image: the mean posterior of its 25 grid crops and
    their 25 mirror images."""
    return view_posterior(network(crop_views(scaled, crop, flip).astype(np.float32)))


def multi_scale_posterior(per_scale: Sequence[np.ndarray]) -> np.ndarray:
    """Multi-scale evaluation: the mean of the posteriors at each test scale."""
    return np.mean(np.stack(per_scale), axis=0)


def combine_dense_multi_crop(dense: np.ndarray, multi_crop: np.ndarray) -> np.ndarray:
    """The paper's dense + multi-crop combination: the mean of the two posteriors."""
    return (dense + multi_crop) / 2


def fuse_posteriors(per_model: Sequence[np.ndarray]) -> np.ndarray:
    """Fusion of several networks: the mean of their posteriors (same class list)."""
    return np.mean(np.stack(per_model), axis=0)


def classify_image(network: Network, image: np.ndarray, scales: Sequence[int], crop: int,
                   method: str = "dense", flip: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The whole protocol for one RGB image and one network, one network call per scale and
    method (the reference that the batched scheduler reproduces)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    dense, crops = [], []
    for q in scales:
        scaled = rescale(image, q, max_pixels)
        if method in ("dense", "both"):
            dense.append(dense_posterior(network, scaled, flip))
        if method in ("multi-crop", "both"):
            crops.append(multi_crop_posterior(network, scaled, crop, flip))
    if method == "dense":
        return multi_scale_posterior(dense)
    if method == "multi-crop":
        return multi_scale_posterior(crops)
    return combine_dense_multi_crop(multi_scale_posterior(dense), multi_scale_posterior(crops))
