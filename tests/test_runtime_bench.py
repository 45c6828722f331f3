"""`vgg-onnx bench` on a small model: every figure present, FLOPs of the work done exact."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vgg_onnx.cli import main
from vgg_onnx.runtime.flops import dense_flops
from vgg_onnx.runtime.session import ModelSession


def test_bench_reports_network_pipeline_and_peak(small_model):
    result = CliRunner().invoke(main, ["bench", "--model", str(small_model), "--provider", "cpu", "--limit", "3",
                                       "--repeat", "1", "--matmul-size", "256", "--matmul-seconds", "0.2", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    info = ModelSession(small_model, "cpu").info
    # synthetic 500 x 375 images at 64, 96, 128 -> 85x64, 128x96, 171x128, each with its mirror
    per_image = 2 * sum(dense_flops(info, h, w) for w, h in [(85, 64), (128, 96), (171, 128)])
    assert report["gflop_per_image"] == pytest.approx(per_image / 1e9)
    assert report["images"] == 3 and report["scales"] == [64, 96, 128] and report["flip"] is True
    for key in ("network_images_per_second", "pipeline_images_per_second", "network_gflops_per_second",
                "matmul_peak_gflops_per_second", "network_gflop_per_cpu_second", "matmul_gflop_per_cpu_second"):
        assert report[key] > 0
    assert report["network_vs_peak"] == pytest.approx(report["network_gflops_per_second"]
                                                      / report["matmul_peak_gflops_per_second"])
    assert report["pipeline_vs_network"] == pytest.approx(report["pipeline_images_per_second"]
                                                          / report["network_images_per_second"])


def test_bench_table_and_usage_error(small_model, tmp_path):
    result = CliRunner().invoke(main, ["bench", "-m", str(small_model), "--provider", "cpu", "--limit", "1",
                                       "--repeat", "1", "--matmul-size", "128", "--matmul-seconds", "0.2", "--method", "multi-crop"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("network alone") and "GFLOP/s" in lines[0]
    assert "% of the network alone" in lines[1] and lines[2].startswith("MatMul peak")
    empty = CliRunner().invoke(main, ["bench", "-m", str(small_model), "--images", str(tmp_path)])
    assert empty.exit_code == 2 and "no images found" in empty.stderr


@pytest.fixture(scope="module")
def int8_model(small_model, tmp_path_factory):
    from test_quantize import write_images

    from vgg_onnx.export.quantize import quantize_model

    folder = write_images(tmp_path_factory.mktemp("bench-calibration") / "photos", 4)
    out = tmp_path_factory.mktemp("bench-int8") / "small.int8.onnx"
    quantize_model(str(small_model), str(folder), str(out), limit=2, held_out=2, min_agreement=0)
    return out


def test_bench_peers_compares_every_engine_on_the_same_inputs(small_model, int8_model):
    result = CliRunner().invoke(main, ["bench", "--model", str(small_model), "--int8", str(int8_model), "--peers",
                                       "--repeat", "1", "--shapes", "1x3x64x64,2x3x96x128", "--matmul-size", "128",
                                       "--matmul-seconds", "0.1", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    engines = {row["engine"]: row for row in report["engines"]}
    assert report["engines"][0]["engine"] == "ONNX Runtime fp32"
    assert engines["ONNX Runtime fp32"]["vs_onnxruntime_fp32"] == pytest.approx(1.0)
    expected = {"ONNX Runtime int8"}
    expected |= {"OpenVINO f32", "OpenVINO int8"} if _installed("openvino") else set()
    expected |= {"PyTorch eager fp32"} if _installed("torch") else set()
    assert expected <= set(engines)
    peaks = report["matmul_peaks_gops_per_second"]
    assert peaks["fp32"] > 0 and (peaks["int8"] > 0) == _installed("onnx")
    info = ModelSession(small_model, "cpu").info
    flops = dense_flops(info, 64, 64) + 2 * dense_flops(info, 96, 128)
    for row in report["engines"]:
        assert len(row["seconds"]) == 2
        assert row["gflops_per_second"] == pytest.approx(flops / sum(row["seconds"]) / 1e9, rel=1e-2)
        assert row["vs_onnxruntime_fp32"] == pytest.approx(row["gflops_per_second"]
                                                           / engines["ONNX Runtime fp32"]["gflops_per_second"])


def test_bench_peers_refuses_a_shape_under_the_crop(small_model):
    result = CliRunner().invoke(main, ["bench", "--model", str(small_model), "--peers", "--shapes", "1x3x32x32"])
    assert result.exit_code == 2 and "at least the crop size 64" in result.output


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None
