"""The trained networks the repository ships (samples/vgg_A_imagenette/, samples/vgg_D_imagenette/):
real models, so these tests check real behaviour: they classify Imagenette's validation photos far
better than chance, the deeper net beats the shallower one, multi-scale testing beats one scale,
each checkpoint compiles to the very model shipped, and each model is a complete vgg-onnx file."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA

SHIPPED = {config: REPO / "samples" / f"vgg_{config}_imagenette" for config in ("A", "D")}
IMAGENETTE_VAL = SHARED_DATA / "imagenette" / "val"


def model_file(config: str):
    return SHIPPED[config] / f"vgg_{config}_imagenette.onnx"


def checkpoint_file(config: str):
    return SHIPPED[config] / "checkpoint" / "best.safetensors"


@pytest.mark.parametrize("config", sorted(SHIPPED))
def test_shipped_files_are_small_and_described(config):
    for path in (model_file(config), checkpoint_file(config), SHIPPED[config] / "README.md"):
        assert path.stat().st_size < 5 << 20, f"{path} is over 5 MiB"
    info = json.loads(model_file(config).with_suffix(".json").read_text())
    assert info["config"] == config and info["num_classes"] == 10 and info["precision"] == "fp32"
    assert [c["synset"] for c in info["classes"]][:2] == ["n01440764", "n02102040"]  # tench, springer


@pytest.mark.parametrize("config", sorted(SHIPPED))
def test_checkpoint_compiles_to_the_shipped_model(config, tmp_path):
    """`vgg-onnx export --weights` on the shipped checkpoint gives the shipped model's posteriors."""
    from vgg_onnx.export.exporter import export_model
    from vgg_onnx.runtime import load_model

    out = tmp_path / "again.onnx"
    export_model(str(out), weights=str(checkpoint_file(config)), log=lambda *a, **k: None)
    photo = REPO / "samples" / "chelsea.png"
    shipped = load_model(model_file(config), provider="cpu").classify(photo).posterior
    again = load_model(out, provider="cpu").classify(photo).posterior
    assert np.abs(shipped - again).max() < 1e-5


@functools.lru_cache(maxsize=None)
def validation_errors(config: str, limit: int, scales: tuple[int, ...] | None = None) -> float:
    """Top-1 error, dense, on the first `limit` validation photos taken a class at a time."""
    from vgg_onnx.runtime import load_model
    from vgg_onnx.runtime.imagefolder import labelled_images, limit_round_robin

    model = load_model(model_file(config), provider="cpu")
    items = limit_round_robin(labelled_images(str(IMAGENETTE_VAL), model.classes), limit)
    assert len(items) == limit
    chosen = list(scales) if scales else None
    wrong = sum(model.classify(path, scales=chosen).top_k(1)[0].index != truth for path, truth in items)
    return wrong / limit


needs_imagenette = pytest.mark.skipif(not IMAGENETTE_VAL.is_dir(), reason="needs ../shared/data/imagenette")


@needs_imagenette
@pytest.mark.parametrize("config, most", [("A", 0.45), ("D", 0.35)])
def test_far_better_than_chance_on_imagenette_validation(config, most):
    """Dense at the model's scales, on all 3,925 validation photos: A 30.3 %, D 22.5 % top-1
    error (their READMEs); chance is 90 %."""
    assert validation_errors(config, 400) < most


@needs_imagenette
def test_multi_scale_dense_beats_a_single_scale():
    """The paper's Table 4 in kind, on a trained net: averaging the posteriors over the test scales
    {128, 146, 178} beats the training scale alone (A, on all 3,925: 30.3 % against 34.1 %)."""
    assert validation_errors("A", 400) < validation_errors("A", 400, scales=(146,))


@needs_imagenette
def test_the_deeper_net_is_better():
    """The paper's Table 3 in kind: the 16-layer D beats the 11-layer A on the same photos."""
    assert validation_errors("D", 400) < validation_errors("A", 400)
