"""The trained network the repository ships (samples/vgg_A_imagenette/): a real model, so these
tests check real behaviour: it classifies Imagenette's validation photos far better than chance,
its checkpoint compiles to the very model shipped, and the model is a complete vgg-onnx file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA

SHIPPED = REPO / "samples" / "vgg_A_imagenette"
MODEL = SHIPPED / "vgg_A_imagenette.onnx"
CHECKPOINT = SHIPPED / "checkpoint" / "best.safetensors"
IMAGENETTE_VAL = SHARED_DATA / "imagenette" / "val"


def test_shipped_files_are_small_and_described():
    for path in (MODEL, CHECKPOINT):
        assert path.stat().st_size < 5 << 20, f"{path} is over 5 MiB"
    info = json.loads(MODEL.with_suffix(".json").read_text())
    assert info["config"] == "A" and info["num_classes"] == 10 and info["precision"] == "fp32"
    assert [c["synset"] for c in info["classes"]][:2] == ["n01440764", "n02102040"]  # tench, springer


def test_checkpoint_compiles_to_the_shipped_model(tmp_path):
    """`vgg-onnx export --weights` on the shipped checkpoint gives the shipped model's posteriors."""
    from vgg_onnx.export.exporter import export_model
    from vgg_onnx.runtime import load_model

    out = tmp_path / "again.onnx"
    export_model(str(out), weights=str(CHECKPOINT), log=lambda *a, **k: None)
    photo = REPO / "samples" / "chelsea.png"
    shipped = load_model(MODEL, provider="cpu").classify(photo).posterior
    again = load_model(out, provider="cpu").classify(photo).posterior
    assert np.abs(shipped - again).max() < 1e-5


def validation_errors(limit: int, scales: list[int] | None = None) -> float:
    """Top-1 error, dense, on the first `limit` validation photos taken a class at a time."""
    from vgg_onnx.runtime import load_model
    from vgg_onnx.runtime.imagefolder import labelled_images, limit_round_robin

    model = load_model(MODEL, provider="cpu")
    items = limit_round_robin(labelled_images(str(IMAGENETTE_VAL), model.classes), limit)
    assert len(items) == limit
    wrong = sum(model.classify(path, scales=scales).top_k(1)[0].index != truth for path, truth in items)
    return wrong / limit


needs_imagenette = pytest.mark.skipif(not IMAGENETTE_VAL.is_dir(), reason="needs ../shared/data/imagenette")


@needs_imagenette
def test_far_better_than_chance_on_imagenette_validation():
    """Dense at the model's scales: 30.3 % top-1 error on all 3,925 validation photos
    (samples/vgg_A_imagenette/README.md); chance is 90 %."""
    assert validation_errors(200) < 0.45


@needs_imagenette
def test_multi_scale_dense_beats_a_single_scale():
    """The paper's Table 4 in kind, on a trained net: averaging the posteriors over the test scales
    {128, 146, 178} beats the training scale alone (on all 3,925: 30.3 % against 34.1 %)."""
    assert validation_errors(400) < validation_errors(400, scales=[146])
