"""`vgg-onnx quantize`: an int8 model calibrated on images, verified against float32 before it is
written, that the runtime runs as any other model and that says what it is."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import PYTHON

from vgg_onnx.metadata import ModelInfo
from vgg_onnx.runtime.session import ModelSession


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "vgg_onnx", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """Smooth random colour fields with noise, of varied sizes: images with structure at every scale."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        height, width = (int(v) for v in rng.integers(80, 170, 2))
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(int)
        image = np.clip(image + rng.integers(-30, 30, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"image_{i:02d}.png"), image)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("calibration") / "photos", 14)


@pytest.fixture(scope="module")
def quantized(small_model, images, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("int8") / "vgg_A_small.int8.onnx"
    result = run_cli("quantize", small_model, "--calibration", images, "--out", out, "--limit", "6",
                     "--held-out", "6", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement" in result.stderr and "largest probability difference" in result.stderr
    return out, json.loads(result.stdout)


def test_quantize_then_infer_round_trip(small_model, images, quantized):
    out, report = quantized
    assert report["written"] and report["verification"]["images"] == 6
    assert report["verification"]["top1_agreement"] >= 0.99
    picked = sorted(images.iterdir())[:3]
    fp32 = json.loads(run_cli("infer", *picked, "--model", small_model, "--format", "json").stdout)
    result = run_cli("infer", *picked, "--model", out, "--format", "json")
    assert result.returncode == 0, result.stderr
    int8 = json.loads(result.stdout)
    assert [r["top_k"][0]["index"] for r in int8] == [r["top_k"][0]["index"] for r in fp32]
    for a, b in zip(int8, fp32):
        assert abs(a["top_k"][0]["prob"] - b["top_k"][0]["prob"]) < 0.05


def test_the_int8_model_keeps_the_interface_and_says_what_it_is(small_model, images, quantized):
    out, _ = quantized
    fp32, int8 = ModelSession(small_model, "cpu", 1), ModelSession(out, "cpu", 1)  # the runtime's own checks
    assert int8.info.precision == "int8" and fp32.info.precision == "fp32"
    assert [i.name for i in int8.session.get_inputs()] == [i.name for i in fp32.session.get_inputs()]
    assert [o.name for o in int8.session.get_outputs()] == [o.name for o in fp32.session.get_outputs()]
    assert int8.info.classes == fp32.info.classes and int8.info.test_scales == fp32.info.test_scales
    calibration = int8.info.calibration
    assert calibration["method"] == "minmax" and calibration["images"] == 6
    assert calibration["folder"] == images.name and str(images.parent) not in json.dumps(calibration)
    sidecar = ModelInfo.from_json_dict(json.loads(out.with_suffix(".json").read_text()))
    assert sidecar.precision == "int8" and sidecar.calibration == calibration
    table = run_cli("inspect", out).stdout
    assert "precision int8" in table and f"minmax on 6 image(s) of {images.name}/" in table


def test_the_int8_graph_holds_int8_convolutions(quantized):
    import onnx

    out, _ = quantized
    graph = onnx.load(str(out)).graph
    weights = {i.name: i for i in graph.initializer}
    quantized_weights = [weights[n.input[0]] for n in graph.node
                         if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert any(w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4 for w in quantized_weights)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 3  # activations too, not just weights


def test_every_conv_but_the_first_is_int8(quantized):
    """conv1_1 reads the image and stays float32 (the recipe in docs/benchmarks.md); the rest are int8."""
    import onnx

    out, report = quantized
    graph = onnx.load(str(out)).graph
    weights = {i.name: i for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs[0].name == "conv1_1" and weights[convs[0].input[1]].data_type == onnx.TensorProto.FLOAT
    assert all(conv.input[1] in dequantized for conv in convs[1:])
    assert report["calibration"]["float32_layers"] == ["conv1_1"]


def test_int8_first_conv_quantizes_conv1_1_too(small_model, images, tmp_path):
    import onnx

    out = tmp_path / "all.int8.onnx"
    result = run_cli("quantize", small_model, "--calibration", images, "--out", out, "--limit", "3",
                     "--held-out", "3", "--min-agreement", "0", "--int8-first-conv")
    assert result.returncode == 0, result.stderr
    graph = onnx.load(str(out)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert all(n.input[1] in dequantized for n in graph.node if n.op_type == "Conv")
    assert json.loads(result.stdout)["calibration"]["float32_layers"] == []


def test_a_constant_calibration_image_is_refused_and_nothing_is_written(small_model, images, tmp_path):
    constant = tmp_path / "grey"
    constant.mkdir()
    cv2.imwrite(str(constant / "grey.png"), np.full((120, 150, 3), 128, np.uint8))
    out = tmp_path / "out" / "broken.int8.onnx"
    line = error_line(run_cli("quantize", small_model, "--calibration", constant, "--held-out-dir", images,
                              "--out", out), 1)
    assert "not written" in line and "below --min-agreement 99.0%" in line
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not any(out.parent.iterdir()) if out.parent.exists() else True  # no temporary file left behind

    forced = run_cli("quantize", small_model, "--calibration", constant, "--held-out-dir", images, "--out", out,
                     "--force")
    assert forced.returncode == 0 and out.exists(), forced.stderr
    assert json.loads(forced.stdout)["verification"]["top1_agreement"] < 0.99


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_each_calibration_method_is_used_and_recorded(small_model, images, tmp_path, method):
    out = tmp_path / f"{method}.onnx"
    result = run_cli("quantize", small_model, "--calibration", images, "--out", out, "--method", method,
                     "--limit", "3", "--held-out", "3", "--min-agreement", "0")
    assert result.returncode == 0, result.stderr
    assert ModelSession(out, "cpu", 1).info.calibration["method"] == method
    # stdout is the JSON report alone (ONNX Runtime's histogram calibrators print to stdout)
    assert json.loads(result.stdout)["calibration"]["method"] == method
    assert "histogram" not in result.stderr


def test_an_unreadable_image_is_skipped_and_reported(small_model, images, tmp_path):
    folder = write_images(tmp_path / "mixed", 6, seed=1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "mixed.int8.onnx"
    result = run_cli("quantize", small_model, "--calibration", folder, "--held-out-dir", images, "--out", out,
                     "--min-agreement", "0")
    assert result.returncode == 1 and out.exists(), result.stderr
    assert "Traceback" not in result.stderr and "broken.png" in result.stderr
    report = json.loads(result.stdout)
    assert report["calibration"]["images"] == 6 and any("broken.png" in s for s in report["skipped"])


@pytest.mark.parametrize("args, message", [
    (["--out", "{model}"], "would replace the input model"),
    (["--out", "{dir}/x.bin"], "ending in .onnx"),
    (["--out", "{dir}/x.onnx", "--method", "kl"], "Invalid value for '--method'"),
])
def test_usage_mistakes_exit_2_with_one_line(small_model, images, tmp_path, args, message):
    args = [a.format(model=small_model, dir=tmp_path) for a in args]
    result = run_cli("quantize", small_model, "--calibration", images, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr, result.stderr
    assert small_model.exists() and not list(tmp_path.iterdir())


HIDING = textwrap.dedent("""
    import importlib.abc, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    from vgg_onnx.cli import main
    sys.argv = ["vgg-onnx", *ARGS]
    main()
""")


def run_hiding(package: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """`vgg-onnx ARGS` in a process where `package` cannot be imported, as if not installed."""
    code = f"HIDDEN = {package!r}\nARGS = {[str(a) for a in args]!r}\n" + HIDING
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_a_missing_onnx_names_the_export_extra(small_model, images, tmp_path):
    line = error_line(run_hiding("onnx", "quantize", small_model, "--calibration", images, "--out", "m.onnx",
                                 cwd=tmp_path), 2)
    assert "quantize needs the export extra: pip install '.[export]'" in line and "(onnx is not installed)" in line
    assert not (tmp_path / "m.onnx").exists()


def test_min_agreement_is_held_against_what_the_held_out_images_allow():
    """Sampling noise on a good model is not a refusal: 98 of 100 may still be 99 % (upper bound
    99.3 %); 97 of 100, or 15 of 16, rule 99 % out; 7 of 14 (a broken calibration) is far below."""
    from vgg_onnx.export.quantize import agreement_upper_bound

    assert 0.99 < agreement_upper_bound(98, 100) < 0.995
    assert agreement_upper_bound(97, 100) < 0.99 and agreement_upper_bound(15, 16) < 0.99
    assert agreement_upper_bound(7, 14) < 0.75 and agreement_upper_bound(16, 16) == pytest.approx(1.0)
    assert agreement_upper_bound(396, 400) < agreement_upper_bound(99, 100)  # more images, a tighter bound
