"""What the weights expect of a 0..255 RGB image: the normalisation presets (paper, torchvision,
Caffe). Export puts the chosen one inside the graph; training applies it to its batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import UsageError

__all__ = ["IMAGENET_MEAN_RGB", "NORMALIZATIONS", "Normalization", "normalization_preset"]

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
