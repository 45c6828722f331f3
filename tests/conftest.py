"""Shared fixtures: small exported models (width-reduced) built on the fly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLES = REPO / "samples"


def export_small_model(path: Path, config: str = "A", num_classes: int = 10, width_mult: float = 0.125,
                       crop: int = 64, normalization: str = "paper", train_scales=(96,), seed: int = 0,
                       init: str = "glorot") -> Path:
    """Export a small random-weight VGG with the project's compiler (no verification run)."""
    import torch

    from vgg_onnx.atomic import atomic_write_bytes
    from vgg_onnx.classes import default_classes
    from vgg_onnx.export.compiler import compile_model
    from vgg_onnx.metadata import ModelInfo
    from vgg_onnx.normalization import normalization_preset
    from vgg_onnx.train.model import VGG, count_parameters, init_weights

    torch.manual_seed(seed)
    model = init_weights(VGG(config, num_classes, width_mult, crop), init).eval()
    info = ModelInfo(config, default_classes(num_classes), normalization_preset(normalization), crop_size=crop,
                     width_mult=width_mult, train_scales=list(train_scales),
                     param_count=count_parameters(model))
    proto, _ = compile_model(model, info)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """VGG-A at width 1/8, 10 classes, crop 64, trained scale 96 (test scales 64, 96, 128)."""
    return export_small_model(tmp_path_factory.mktemp("models") / "vgg_A_small.onnx")


@pytest.fixture
def cli_env() -> dict:
    """Environment for running `python -m vgg_onnx` in a subprocess."""
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


PYTHON = sys.executable
