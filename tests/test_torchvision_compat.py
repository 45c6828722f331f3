"""torchvision's own VGG state dicts compile to graphs that reproduce torchvision's outputs.

torchvision (0.29.1, with torch 2.14.1) lives in its own interpreter, named by the environment
variable VGG_ONNX_TORCHVISION_PYTHON (`make torchvision-env` builds one); tests/torchvision_reference.py
runs there. The exported vgg16 is also the issue's full VGG-D check at the three sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import PYTHON, REPO
from vgg_onnx.export.compiler import relative_error
from vgg_onnx.configs import score_map_size
from vgg_onnx.export.flops import conv_flops

TORCHVISION_PYTHON = os.environ.get("VGG_ONNX_TORCHVISION_PYTHON", str(REPO / ".venv-torchvision" / "bin" / "python"))
MODELS = {"vgg11": "A", "vgg16": "D", "vgg16_bn": "D-BN"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    if not Path(TORCHVISION_PYTHON).exists():
        reason = f"no torchvision interpreter at {TORCHVISION_PYTHON} (make torchvision-env, or set VGG_ONNX_TORCHVISION_PYTHON)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("torchvision")
    result = subprocess.run([TORCHVISION_PYTHON, str(REPO / "tests" / "torchvision_reference.py"), str(folder),
                             *MODELS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def exported(reference) -> dict[str, Path]:
    """Each state dict compiled by the CLI, as a user would, with torchvision's normalisation."""
    models = {}
    for name, config in MODELS.items():
        out = reference / f"{name}.onnx"
        result = subprocess.run([PYTHON, "-m", "vgg_onnx", "export", "--config", config, "--weights",
                                 str(reference / f"{name}.pth"), "--normalization", "torchvision", "--out", str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "verified" in result.stderr
        (reference / f"{name}.pth").unlink()  # 0.5 GB each
        models[name] = out
    return models


@pytest.mark.parametrize("name", list(MODELS))
def test_probs_on_raw_pixels_match_torchvision(reference, exported, name):
    image = np.load(reference / "image.npy").astype(np.float32).transpose(2, 0, 1)[None]  # 0..255 RGB, NCHW
    session = ort.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    scores, probs = session.run(None, {"image": image})
    expected_probs = np.load(reference / f"{name}_probs.npy")
    assert probs.shape == (1, 1000) and scores.shape == (1, 1000, 1, 1)
    assert relative_error(probs, expected_probs) < 1e-4
    assert relative_error(scores[:, :, 0, 0], np.load(reference / f"{name}_logits.npy")) < 1e-4
    assert probs.argmax() == expected_probs.argmax()
    metadata = json.loads(exported[name].with_suffix(".json").read_text())
    assert metadata["weights_source"] == f"{name}.pth" and metadata["config"] == MODELS[name]
    assert metadata["classes"][0]["synset"] == "n01440764" and metadata["normalization"]["preset"] == "torchvision"


def test_vgg_d_runs_at_the_issues_sizes(exported):
    """The issue's "done when": a VGG-16 graph that ONNX Runtime runs at 224x224, 256x341 and 512x683,
    batch 1 and 4, from one session."""
    session = ort.InferenceSession(str(exported["vgg16"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for height, width in [(224, 224), (256, 341), (512, 683)]:
        images = (rng.random((4, 3, height, width)) * 255).astype(np.float32)
        scores1, probs1 = session.run(None, {"image": images[:1]})
        scores4, probs4 = session.run(None, {"image": images})
        assert scores4.shape == (4, 1000, *score_map_size(height, width, 224)) and probs4.shape == (4, 1000)
        assert np.isfinite(scores4).all()
        np.testing.assert_allclose(probs4.sum(1), 1, rtol=1e-5)
        assert relative_error(probs4[:1], probs1) < 1e-4 and relative_error(scores4[:1], scores1) < 1e-4
    # VGG-16 at 224x224: 15.47 G multiply-adds, the well-known figure
    assert conv_flops(str(exported["vgg16"]), 224, 224) == 2 * 15_470_264_320
