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
