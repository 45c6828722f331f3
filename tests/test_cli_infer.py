"""`vgg-onnx infer` end to end: output schemas, exit codes, every bad input of issue 3 §8,
heatmaps, and a run with torch (and onnx) impossible to import."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import zlib

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import PYTHON, REPO, SAMPLES
from vgg_onnx.cli import main

RECORD_KEYS = ["path", "top_k", "method", "scales", "models", "seconds"]
ENTRY_KEYS = {"index": int, "synset": str, "name": str, "prob": float}


def infer(*args):
    result = CliRunner().invoke(main, ["infer", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def save(path, image, fmt=None, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt or path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **kwargs)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Issue 3 §8's bad and odd images. name -> (path, expected error fragment or None for success)."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    colour = cv2.GaussianBlur(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), (0, 0), 2)
    jpeg = save(d / "ok.jpg", colour)
    cases = {}
    (d / "truncated.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    cases["truncated"] = (d / "truncated.jpg", "truncated JPEG")
    (d / "empty.jpg").write_bytes(b"")
    cases["zero-byte"] = (d / "empty.jpg", "empty file")
    (d / "text.jpg").write_text("I am text\n")
    cases["text"] = (d / "text.jpg", "not a supported image")
    (d / "huge.png").write_bytes(png_claiming(100_000, 100_000))
    cases["huge-header"] = (d / "huge.png", "100000x100000 image exceeds the pixel limit")
    cases["thin"] = (save(d / "thin.png", np.zeros((8, 20000, 3), np.uint8)), "exceed the pixel limit")
    cases["gray"] = (save(d / "gray.png", colour[..., 0]), None)
    cases["rgba"] = (save(d / "rgba.png", np.dstack([colour, np.full((70, 90), 9, np.uint8)])), None)
    ok, sixteen = cv2.imencode(".png", colour.astype(np.uint16) * 257)
    (d / "sixteen.png").write_bytes(sixteen.tobytes())
    cases["16-bit"] = (d / "sixteen.png", None)
    cmyk = io.BytesIO()
    Image.fromarray(colour).convert("CMYK").save(cmyk, "JPEG")
    (d / "cmyk.jpg").write_bytes(cmyk.getvalue())
    cases["cmyk"] = (d / "cmyk.jpg", None)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases["exif"] = (save(d / "rotated.jpg", colour, exif=exif.tobytes()), None)
    cases["non-ascii"] = (save(d / "chat_ünï_猫.jpg", colour), None)
    (d / "missing-target.jpg").symlink_to(d / "gone.jpg")  # unreadable whoever runs the tests
    cases["dangling-link"] = (d / "missing-target.jpg", "cannot read: No such file or directory")
    if os.geteuid() != 0:  # root reads files whatever their mode
        locked = save(d / "locked.jpg", colour)
        locked.chmod(0)
        cases["unreadable"] = (locked, "cannot read: Permission denied")
    return cases


def test_every_bad_input_gives_its_record_and_the_run_goes_on(small_model, bad_inputs):
    paths = [p for p, _ in bad_inputs.values()]
    result = infer(*paths, "--model", small_model, "--scales", "256", "--format", "jsonl")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    by_path = {r["path"]: r for r in records}
    assert len(records) == len(paths) == len(by_path)
    for name, (path, error) in bad_inputs.items():
        record = by_path[str(path)]
        if error is None:
            assert "error" not in record, (name, record)
            assert list(record) == RECORD_KEYS
        else:
            assert list(record) == ["path", "error"], name
            assert error in record["error"] and str(path) in record["error"], (name, record)
            assert "\n" not in record["error"]
    assert "Traceback" not in result.stderr
    ok = sum(e is None for _, e in bad_inputs.values())
    assert f"{ok} done, {len(paths) - ok} failed" in result.stderr


def test_exif_rotated_image_is_upright(small_model, bad_inputs):
    """The rotated JPEG gives the posterior of its upright pixels, not of the stored ones."""
    path = bad_inputs["exif"][0]
    upright = Image.open(path).transpose(Image.Transpose.ROTATE_270)  # orientation 6 = 90 degrees clockwise
    upright_path = path.with_name("upright.png")
    upright.save(upright_path)
    a = json.loads(infer(path, "--model", small_model, "--format", "json").stdout)[0]["top_k"]
    b = json.loads(infer(upright_path, "--model", small_model, "--format", "json").stdout)[0]["top_k"]
    assert [e["index"] for e in a] == [e["index"] for e in b]
    np.testing.assert_allclose([e["prob"] for e in a], [e["prob"] for e in b], atol=0.02)  # JPEG vs PNG pixels


def test_json_schema_and_top_k(small_model):
    result = infer(SAMPLES, "--model", small_model, "--format", "json", "--top-k", "3", "--method", "both")
    assert result.exit_code == 0
    records = json.loads(result.stdout)
    # the photos of samples/: the folder is searched for images only (not its README or the shipped model)
    photos = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    assert [os.path.basename(r["path"]) for r in records] == photos and len(photos) == 5
    for record in records:
        assert list(record) == RECORD_KEYS
        assert record["method"] == "both" and record["scales"] == [64, 96, 128]
        assert record["models"] == [str(small_model)] and isinstance(record["seconds"], float)
        assert len(record["top_k"]) == 3
        for entry in record["top_k"]:
            assert {k: type(v) for k, v in entry.items()} == ENTRY_KEYS
        probs = [e["prob"] for e in record["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert "images/s" in result.stderr and "5 done, 0 failed" in result.stderr
    assert f"{small_model.name} has random weights" in result.stderr  # the test model is untrained


def test_formats_agree(small_model, tmp_path):
    sample = SAMPLES / "chelsea.png"
    jsonl = json.loads(infer(sample, "-m", small_model, "--format", "jsonl").stdout)
    rows = list(csv.DictReader(io.StringIO(infer(sample, "-m", small_model, "--format", "csv").stdout)))
    assert [int(r["index"]) for r in rows] == [e["index"] for e in jsonl["top_k"]]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([float(r["prob"]) for r in rows], [e["prob"] for e in jsonl["top_k"]], atol=1e-6)
    table = infer(sample, "-m", small_model).stdout
    assert table.splitlines()[0].startswith(str(sample)) and f"  1. {jsonl['top_k'][0]['prob']:7.4f}" in table
    out = tmp_path / "sub" / "out.json"
    result = infer(sample, "-m", small_model, "--format", "json", "--output", out)
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text())[0]["top_k"] == jsonl["top_k"]
    assert [p.name for p in out.parent.iterdir()] == ["out.json"]  # no temporary left behind


def test_heatmaps(small_model, tmp_path):
    """Each PNG: the image with the heat over it, and beneath it a band with the class name and
    a blue-to-red colour scale for this image's own score range; its path is in the record."""
    result = infer(SAMPLES / "rocket.jpg", SAMPLES / "camera.png", "-m", small_model, "--method", "multi-crop",
                   "--heatmap", tmp_path / "heat", "--format", "json")
    assert result.exit_code == 0
    assert sorted(os.listdir(tmp_path / "heat")) == ["camera.png", "rocket.png"]
    records = json.loads(result.stdout)
    assert [r["heatmap"] for r in records] == [str(tmp_path / "heat" / n) for n in ("rocket.png", "camera.png")]
    documented = (REPO / "docs" / "api.md").read_text()
    for key in list(records[0]) + [f"top_k[].{k}" for k in ENTRY_KEYS]:  # every field is documented
        assert f"| `{key}` |" in documented, key
    heat = cv2.imread(str(tmp_path / "heat" / "rocket.png"))
    height, width = cv2.imread(str(SAMPLES / "rocket.jpg")).shape[:2]
    assert heat.shape == (height + 44, width, 3)  # the legend band beneath the image
    assert heat[:height].std() > 0
    band = heat[height:]
    assert (band[:20] < 128).any()  # the class name is written in the band
    ramp = band[31]
    coloured = np.flatnonzero(ramp.max(axis=1) - ramp.min(axis=1) > 60)
    left, right = ramp[coloured[0]].astype(int), ramp[coloured[-1]].astype(int)
    assert left[0] > left[2] and right[2] > right[0]  # BGR: blue at the low end, red at the high end


def test_heatmap_folder_that_cannot_be_written_fails_each_image(small_model, tmp_path, monkeypatch):
    import tempfile

    folder = tmp_path / "heat"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse file creation in that folder instead
        real = tempfile.mkstemp
        def refuse(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, folder):
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        folder.chmod(0o500)
    result = infer(SAMPLES / "rocket.jpg", SAMPLES / "camera.png", "-m", small_model, "--heatmap", folder,
                   "--format", "jsonl")
    folder.chmod(0o700)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2
    for record in records:
        assert list(record) == ["path", "error"] and "cannot write heatmap" in record["error"]
        assert "Permission denied" in record["error"]
    assert "0 done, 2 failed" in result.stderr


def test_table_has_column_headers(small_model):
    table = infer(SAMPLES / "chelsea.png", "-m", small_model, "--top-k", "3").stdout.splitlines()
    assert table[1].split() == ["#", "prob", "index", "class"]
    assert len(table) == 5 and table[2].startswith("  1. ")


@pytest.mark.parametrize("command", ["infer", "bench"])
def test_options_have_help(command):
    text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).stdout
    for option, words in (("--top-k", "classes each record"), ("--format", "json"), ("--method", "5x5 grid"),
                          ("--threads", "the CPUs available")):
        if command == "bench" and option == "--top-k":
            continue
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert words in " ".join(text[text.index(line):].split()[:40]), (option, line)


def test_expected_work_is_announced(small_model):
    from vgg_onnx.runtime.flops import format_flops, image_flops
    from vgg_onnx.runtime.session import ModelSession

    result = infer(SAMPLES / "chelsea.png", SAMPLES / "coffee.png", "-m", small_model, "--method", "both")
    expected = format_flops(image_flops(ModelSession(small_model, "cpu").info, "both", [64, 96, 128]))
    assert f"both at 3 scale(s): about {expected} per image" in result.stderr
    assert "for 2 image(s)" in result.stderr


def test_fusion_through_the_cli(small_model, tmp_path):
    from conftest import export_small_model

    other = export_small_model(tmp_path / "other.onnx", seed=2)
    sample = SAMPLES / "coffee.png"
    probs = {}
    for models in ([small_model], [other], [small_model, other]):
        args = [a for m in models for a in ("--model", m)]
        record = json.loads(infer(sample, *args, "--format", "json", "--top-k", "10").stdout)[0]
        probs[len(probs)] = {e["index"]: e["prob"] for e in record["top_k"]}
        assert record["models"] == [str(m) for m in models]
    for i in range(10):
        assert probs[2][i] == pytest.approx((probs[0][i] + probs[1][i]) / 2, abs=1e-6)


@pytest.mark.parametrize("args,code,message", [
    ([], 2, "no model given"),
    (["--scales", "32"], 2, "scale 32 is smaller than the model's crop size 64"),
    (["--scales", "a,b"], 2, "not comma-separated integers"),
    (["--top-k", "0"], 2, "--top-k 0"),
    (["--method", "five-crop"], 2, "Invalid value"),
    (["--batch-size", "0"], 2, "batch size 0"),
    (["--threads", "100000"], 2, "--threads 100000 must be between 1 and"),
    (["--threads", "0"], 2, "--threads 0 must be between 1 and"),
    (["--heatmap", str(SAMPLES / "rocket.jpg" / "sub")], 2, "cannot create the folder"),
    (["--output", str(SAMPLES / "rocket.jpg" / "out.json")], 2, "cannot write there"),
])
def test_usage_errors(small_model, args, code, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/vgg_D.onnx to fall back on
    monkeypatch.delenv("VGG_ONNX_MODEL", raising=False)
    model_args = [] if not args else ["--model", str(small_model)]
    result = infer(SAMPLES / "rocket.jpg", *model_args, *args)
    assert result.exit_code == code
    assert message in result.stderr and "Traceback" not in result.stderr


def test_default_model_from_environment_or_models_folder(small_model, tmp_path, monkeypatch):
    sample = SAMPLES / "coffee.png"
    expected = json.loads(infer(sample, "--model", small_model, "--format", "json").stdout)[0]["top_k"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VGG_ONNX_MODEL", str(small_model))
    record = json.loads(infer(sample, "--format", "json").stdout)[0]
    assert record["models"] == [str(small_model)] and record["top_k"] == expected
    monkeypatch.delenv("VGG_ONNX_MODEL")
    (tmp_path / "models").mkdir()
    shutil.copy(small_model, tmp_path / "models" / "vgg_D.onnx")
    result = infer(sample, "--format", "json")
    assert result.exit_code == 0 and "using models/vgg_D.onnx" in result.stderr
    assert json.loads(result.stdout)[0]["top_k"] == expected


def test_folder_without_images(small_model, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    result = infer(tmp_path, "--model", small_model)
    assert result.exit_code == 1
    assert result.stderr.strip().endswith(f"vgg-onnx: error: no images found in {tmp_path}")


def test_missing_and_corrupt_model_files(tmp_path):
    (tmp_path / "corrupt.onnx").write_bytes(b"not a protobuf at all" * 10)
    for model, message in ((tmp_path / "missing.onnx", "no such model file"),
                           (tmp_path / "corrupt.onnx", "not a loadable ONNX model")):
        result = infer(SAMPLES / "rocket.jpg", "--model", model)
        assert result.exit_code == 1
        lines = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_fusion_of_different_class_lists_is_refused(small_model, tmp_path):
    from conftest import export_small_model

    five = export_small_model(tmp_path / "five.onnx", num_classes=5)
    result = infer(SAMPLES / "rocket.jpg", "--model", small_model, "--model", five)
    assert result.exit_code == 2 and "same class list" in result.stderr


BLOCKER = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx', 'onnxsim'):
            raise ImportError(f'{name} is blocked for this test')
sys.meta_path.insert(0, Refuse())
from vgg_onnx.cli import main
try:
    main(sys.argv[1:])
finally:
    assert not any(m.split('.')[0] in ('torch', 'onnx') for m in sys.modules), 'torch or onnx got imported'
"""


@pytest.mark.parametrize("command", [
    ["infer", str(SAMPLES / "camera.png"), "--method", "both", "--format", "json"],
    ["bench", "--limit", "1", "--repeat", "1", "--matmul-size", "64", "--matmul-seconds", "0.05", "--format", "json"],
])
def test_runtime_runs_without_torch_or_onnx(small_model, cli_env, command):
    proc = subprocess.run([PYTHON, "-c", BLOCKER, *command, "--model", str(small_model)],
                          capture_output=True, text=True, env=cli_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    output = json.loads(proc.stdout)
    assert output[0]["method"] == "both" if command[0] == "infer" else output["network_images_per_second"] > 0


def test_file_name_that_is_not_utf8(small_model, tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8, os gives surrogates
    ok, data = cv2.imencode(".png", np.zeros((70, 70, 3), np.uint8))  # (cv2.imwrite crashes on such names)
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), "wb") as f:
        f.write(data.tobytes())
    assert os.listdir(tmp_path) == [name]
    result = infer(tmp_path, "--model", small_model, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(tmp_path / "caf\ufffd.png")


def test_closed_pipe_is_quiet(small_model, cli_env):
    script = ("import subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, "
              "stderr=subprocess.PIPE); p.stdout.close(); err = p.stderr.read().decode(); "
              "sys.exit(0 if p.wait() == 1 and 'Traceback' not in err else 3)")
    proc = subprocess.run([PYTHON, "-c", script, PYTHON, "-m", "vgg_onnx", "infer", str(SAMPLES), "--model",
                           str(small_model), "--format", "jsonl"], env=cli_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0


@pytest.mark.parametrize("target", ["image", "image-link", "model"])
def test_output_never_replaces_an_input(small_model, tmp_path, target):
    """`--output` naming an input image or the model (by any name) is a usage error, and the
    input is untouched."""
    image = tmp_path / "a.png"
    shutil.copy(SAMPLES / "coffee.png", image)
    (tmp_path / "link.png").symlink_to(image)
    output = {"image": image, "image-link": tmp_path / "link.png", "model": small_model}[target]
    before = output.read_bytes()
    result = infer(image, "--model", small_model, "--output", output)
    assert result.exit_code == 2, result.output
    assert "is one of this command's inputs" in result.output
    assert output.read_bytes() == before
