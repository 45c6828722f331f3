"""int8 models (`vgg-onnx quantize`, QDQ) in the embedding hosts: the Node host (onnxruntime-node)
runs them as `vgg-onnx infer` does; the C++ host (OpenCV 4.6 DNN, whose importer rejects the QDQ
graph) refuses them in one line before OpenCV sees the file.

Skipped where a host's toolchain is missing, except under CI, as tests/test_hosts.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLES
from test_hosts import (TENSOR_TOLERANCE, classify, cpp_host, node_host, one_error_line,  # noqa: F401 (fixtures)
                        onnxruntime_outputs, preprocessed, python_infer, run)
from test_quantize import write_images

# The hosts' decoders and resizers differ from Python's by one level on a few pixels (as for
# float32, where probabilities agree within 1e-3); in an int8 graph such a pixel can cross a
# rounding boundary of the input's quantization, a whole step that the quantized layers carry
# on. Measured on the sample photos with this model: up to 1.3e-3 at three scales with mirrors
# and 7.2e-3 at one scale without; on identical input tensors the outputs are identical.
INT8_PROB_TOLERANCE = 1e-2
SCALES = "64,96,128"  # the small model's test scales


def quantize_small_model(small_model: Path, folder: Path) -> Path:
    """The small test model quantized on a few generated images; --force: whether random weights
    keep top-1 under int8 is not what these tests are about."""
    out = folder / "vgg_A_small.int8.onnx"
    images = write_images(folder / "calibration", 8)
    result = subprocess.run([sys.executable, "-m", "vgg_onnx", "quantize", str(small_model), "--calibration",
                             str(images), "--out", str(out), "--limit", "4", "--held-out", "4", "--seed", "3",
                             "--force"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def int8_model(small_model, tmp_path_factory) -> Path:
    return quantize_small_model(small_model, tmp_path_factory.mktemp("int8"))


@pytest.fixture(scope="module")
def photos() -> list[str]:
    return sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))


def assert_same_top5_int8(record: dict, expected: dict) -> None:
    """Same top-5 classes as `vgg-onnx infer`, probabilities within INT8_PROB_TOLERANCE."""
    got = {entry["index"]: entry["prob"] for entry in record["top_k"]}
    want = {entry["index"]: entry["prob"] for entry in expected["top_k"]}
    assert set(got) == set(want), f"{record['path']}: top-5 {list(got)} != {list(want)}"
    for index, prob in want.items():
        assert got[index] == pytest.approx(prob, abs=INT8_PROB_TOLERANCE), record["path"]
    assert (record["method"], record["scales"]) == (expected["method"], expected["scales"])


@pytest.mark.parametrize("options", [("--scales", SCALES), ("--scales", "96", "--no-flip")],
                         ids=["three-scales", "one-scale-no-flip"])
def test_node_host_classifies_with_an_int8_model_as_python_does(node_host, int8_model, photos, options):
    expected = python_infer(int8_model, photos, *options)
    records, result = classify(node_host, int8_model, photos, *options)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip()
    assert [r["path"] for r in records] == photos
    for record in records:
        assert_same_top5_int8(record, expected[record["path"]])


@pytest.mark.parametrize("image, q", [("chelsea.png", 96), ("rocket.jpg", 64)])
def test_node_host_runs_the_int8_graph_as_onnxruntime_does(node_host, int8_model, tmp_path, image, q):
    """The same input tensor (the image and its mirror): the same outputs as Python's ONNX Runtime."""
    tensor = preprocessed(SAMPLES / image, q)
    tensor = np.concatenate([tensor, tensor[..., ::-1]])
    raw = tmp_path / "input.f32"
    np.ascontiguousarray(tensor).tofile(raw)
    result = run(node_host, int8_model, "--raw-input", raw, "--shape", ",".join(map(str, tensor.shape)))
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    scores, probs = onnxruntime_outputs(int8_model, np.ascontiguousarray(tensor))
    host_scores = np.array(outputs["scores"]["data"]).reshape(outputs["scores"]["shape"])
    host_probs = np.array(outputs["probs"]["data"]).reshape(outputs["probs"]["shape"])
    assert host_scores.shape == scores.shape and host_probs.shape == probs.shape
    assert np.max(np.abs(host_scores - scores)) / np.max(np.abs(scores)) < TENSOR_TOLERANCE
    assert np.max(np.abs(host_probs - probs)) < TENSOR_TOLERANCE


def with_precision(model: Path, precision: str, out: Path) -> Path:
    """A copy of `model` whose metadata states `precision` (no sidecar beside it)."""
    from metadata_edit import edited_model

    return edited_model(model, out, precision=precision)


@pytest.mark.parametrize("variant, evidence", [
    ("as-quantized", 'metadata precision "int8"'),
    ("graph-only", "QuantizeLinear/DequantizeLinear nodes in its graph"),  # metadata says fp32
    ("metadata-only", 'metadata precision "int8"'),  # a float32 graph
])
def test_cpp_host_refuses_an_int8_model_in_one_line(cpp_host, small_model, int8_model, tmp_path, variant, evidence):
    model = {"as-quantized": lambda: int8_model,
             "graph-only": lambda: with_precision(int8_model, "fp32", tmp_path / "forged.onnx"),
             "metadata-only": lambda: with_precision(small_model, "int8", tmp_path / "labelled.onnx")}[variant]()
    records, result = classify(cpp_host, model, [SAMPLES / "chelsea.png"])
    assert result.returncode == 1 and records is None
    line = one_error_line(result, str(model), f"an int8 model ({evidence})", "does not run int8 models")
    assert "OpenCV cannot load the graph" not in line  # refused before the importer

