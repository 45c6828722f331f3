"""The PyTorch eager peer of `vgg-onnx bench --peers`: the graph's torch twin (export/compiler.py's
DenseVGG, random weights: speed does not depend on them). It lives in the export stage, which owns
torch; the runtime loads it only where torch is installed, and never imports torch itself."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from vgg_onnx.metadata import ModelInfo
from vgg_onnx.train.model import VGG

from .compiler import DenseVGG

__all__ = ["torch_network"]


def torch_network(info: ModelInfo, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """`network(batch) -> probs` on float32 N x 3 x H x W (0..255), eager PyTorch on the CPU."""
    if threads:
        torch.set_num_threads(threads)
    dense = DenseVGG(VGG(info.config, info.num_classes, info.width_mult, info.crop_size), info.normalization).eval()

    def network(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return dense(torch.from_numpy(batch))[1].numpy()

    return network
