"""The values the commands share (config name, crop, training scales) are parsed by one click type
each and follow one rule in train and export: one line, exit 2, before any slow work."""

from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON
from vgg_onnx.errors import UsageError
from vgg_onnx.params import CONFIG, CROP, TRAIN_SCALES


def run_cli(*args, cwd):
    return subprocess.run([PYTHON, "-m", "vgg_onnx", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_types_parse_and_check():
    assert CONFIG.convert("vgg16_bn", None, None) == "D-BN"
    assert CROP.convert("64", None, None) == 64
    assert TRAIN_SCALES.convert("256", None, None) == [256]
    assert TRAIN_SCALES.convert("256,512", None, None) == [256, 512]
    for bad in ("512,256", "256,256", "1,2,3"):
        with pytest.raises(UsageError, match="give S, or Smin,Smax with Smin < Smax"):
            TRAIN_SCALES.convert(bad, None, None)
    with pytest.raises(UsageError, match="multiple of 32"):
        CROP.convert("100", None, None)


@pytest.mark.parametrize("option, value, message", [
    ("scale", "48,48", "training scales 48,48: give S, or Smin,Smax with Smin < Smax"),
    ("crop", "100", "crop size 100 is not a positive multiple of 32"),
    ("config", "F", "unknown config 'F'"),
])
def test_train_and_export_refuse_the_same_values_alike(tmp_path, option, value, message):
    values = {"config": "A", "scale": "48", "crop": "32", option: value}
    train = run_cli("train", "--config", values["config"], "--scale", values["scale"], "--crop", values["crop"],
                    "--data", tmp_path, "--out", tmp_path / "run", cwd=tmp_path)
    export_scale = ["--train-scale", values["scale"]] if option == "scale" else []
    export = run_cli("export", "--config", values["config"], "--crop", values["crop"], *export_scale,
                     "--out", tmp_path / "m.onnx", cwd=tmp_path)
    for result in (train, export):
        errors = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.onnx").exists()
