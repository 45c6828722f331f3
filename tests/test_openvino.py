"""The OpenVINO backend: the same models and protocol code as ONNX Runtime, its float32 posteriors
equal to ONNX Runtime's, int8 graphs too, and one line naming the extra when it is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_quantize import error_line, run_cli, run_hiding, write_images

from vgg_onnx.decoding import load_image
from vgg_onnx.runtime.protocol import classify_image
from vgg_onnx.runtime.session import ModelSession

# float32 on both engines: the same arithmetic up to summation order
F32_TOLERANCE = 1e-4
# bf16 keeps 8 bits of mantissa; int8 graphs differ by the engines' requantisation rounding
REDUCED_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def openvino_session_class():
    if not os.environ.get("CI"):  # `make install` brings openvino: under CI a missing one is a failure
        pytest.importorskip("openvino")
    from vgg_onnx.runtime.openvino_backend import OpenVinoSession

    return OpenVinoSession


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return sorted(write_images(tmp_path_factory.mktemp("ov") / "photos", 4, seed=5).iterdir())


def posteriors(session, photos: list[Path], method: str) -> np.ndarray:
    network = lambda batch: session.run(batch)[0]  # noqa: E731
    return np.stack([classify_image(network, load_image(p), session.info.test_scales, session.info.crop_size,
                                    method) for p in photos])


@pytest.mark.parametrize("method", ["dense", "multi-crop"])
def test_openvino_f32_posteriors_equal_onnx_runtime(openvino_session_class, small_model, photos, method):
    reference = posteriors(ModelSession(small_model, "cpu"), photos, method)
    openvino = openvino_session_class(small_model, precision="f32")
    assert openvino.provider == "openvino-f32"
    assert openvino.info.classes == ModelSession(small_model, "cpu").info.classes
    assert np.abs(posteriors(openvino, photos, method) - reference).max() < F32_TOLERANCE


def test_the_python_api_and_infer_take_the_openvino_backend(openvino_session_class, small_model, photos):
    from vgg_onnx.runtime import load_model

    reference = load_model(small_model, "cpu").classify(str(photos[0]))
    result = load_model(small_model, backend="openvino").classify(str(photos[0]))
    assert np.abs(result.posterior - reference.posterior).max() < REDUCED_TOLERANCE
    cli = run_cli("infer", photos[0], "--model", small_model, "--backend", "openvino", "--format", "json")
    assert cli.returncode == 0, cli.stderr
    assert "OpenVINO on the CPU in" in cli.stderr  # bf16 or f32: it says which
    assert json.loads(cli.stdout)[0]["top_k"][0]["index"] == reference.top_k(1)[0].index


def test_openvino_runs_int8_graphs(openvino_session_class, small_model, photos, tmp_path):
    from vgg_onnx.export.quantize import quantize_model

    out = tmp_path / "small.int8.onnx"
    quantize_model(str(small_model), str(photos[0].parent), str(out), limit=2, held_out=2, min_agreement=0)
    reference = posteriors(ModelSession(out, "cpu"), photos, "dense")
    openvino = openvino_session_class(out, precision="f32")
    assert openvino.info.precision == "int8"
    assert np.abs(posteriors(openvino, photos, "dense") - reference).max() < REDUCED_TOLERANCE


def test_a_gpu_provider_with_openvino_is_a_usage_error(small_model, photos):
    line = error_line(run_cli("infer", photos[0], "--model", small_model, "--backend", "openvino",
                              "--provider", "cuda"), 2)
    assert "the openvino backend runs on the CPU" in line


def test_a_missing_openvino_names_the_extra(small_model, photos, tmp_path):
    result = run_hiding("openvino", "infer", photos[0], "--model", small_model, "--backend", "openvino", cwd=tmp_path)
    line = error_line(result, 2)
    assert "needs the openvino extra: pip install '.[openvino]'" in line and "openvino is not installed" in line
