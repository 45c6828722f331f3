"""The embedding hosts (runtime/cpp: OpenCV DNN; runtime/node: onnxruntime-node + sharp) agree with
`vgg-onnx infer` on the same .onnx file, and with ONNX Runtime on an identical input tensor.

The hosts are skipped where their toolchain is missing, except under CI (env CI set), where a
missing toolchain fails: `make host-deps` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SAMPLES

SCALES = "64,96,128"  # the small model's crop is 64
HOSTS = ("cpp", "node")
PROB_TOLERANCE = 1e-3  # the resizers may differ by one level on a few pixels
TENSOR_TOLERANCE = 1e-5


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must have it: make host-deps)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cpp_host() -> list[str]:
    """runtime/cpp built into runtime/cpp/build (ignored by git; rebuilt only where changed)."""
    if not shutil.which("cmake") or not shutil.which("c++"):
        unavailable("cmake or a C++ compiler is not installed")
    build = REPO / "runtime" / "cpp" / "build"
    configure = subprocess.run(["cmake", "-S", str(REPO / "runtime" / "cpp"), "-B", str(build),
                                "-DCMAKE_BUILD_TYPE=Release"], capture_output=True, text=True)
    if configure.returncode:
        unavailable(f"cmake cannot configure runtime/cpp (OpenCV or nlohmann-json dev files missing?): "
                    f"{configure.stderr.strip().splitlines()[-1] if configure.stderr.strip() else ''}")
    built = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return [str(build / "classify")]


@pytest.fixture(scope="session")
def node_host() -> list[str]:
    node = shutil.which("node")
    if not node:
        unavailable("node is not installed")
    modules = REPO / "runtime" / "node" / "node_modules"
    if not (modules / "onnxruntime-node").is_dir() or not (modules / "sharp").is_dir():
        unavailable("runtime/node has no node_modules (cd runtime/node && npm install --ignore-scripts)")
    return [node, str(REPO / "runtime" / "node" / "classify.js")]


@pytest.fixture(params=HOSTS)
def host(request) -> list[str]:
    return request.getfixturevalue(f"{request.param}_host")


def run(command: list[str], *args) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300)


def classify(host: list[str], model, images, *options) -> tuple[list[dict], subprocess.CompletedProcess]:
    result = run(host, model, *images, *options)
    return json.loads(result.stdout) if result.stdout.strip() else None, result


def python_infer(model, images, *options) -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-m", "vgg_onnx", "infer", *map(str, images), "--model", str(model),
                             "--format", "json", "--provider", "cpu", *options], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {record["path"]: record for record in json.loads(result.stdout)}


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[str]:
    """The sample photos, plus files that exercise the decoding conventions: 16-bit, grey with
    alpha, palette, RGBA, and a JPEG whose EXIF orientation turns it."""
    import cv2
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    base = cv2.resize((rng.random((12, 16, 3)) * 255).astype(np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(folder / "wide16.png"), base.astype(np.uint16) * 257 + rng.integers(0, 257, base.shape, np.uint16))
    Image.fromarray(np.dstack([base[..., 0], base[..., 1]]), "LA").save(folder / "grey_alpha.png")
    Image.fromarray(base).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    cv2.imwrite(str(folder / "rgba.png"), np.dstack([base, base[..., 2]]))
    rotated = Image.fromarray(base[..., ::-1].copy())
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    samples = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    return samples + sorted(str(p) for p in folder.iterdir())


def assert_same_top5(record: dict, expected: dict) -> None:
    assert set(record) == set(expected), record
    got = {entry["index"]: entry for entry in record["top_k"]}
    want = {entry["index"]: entry for entry in expected["top_k"]}
    assert set(got) == set(want), f"{record['path']}: top-5 {list(got)} != {list(want)}"
    for index, entry in want.items():
        assert got[index]["prob"] == pytest.approx(entry["prob"], abs=PROB_TOLERANCE), record["path"]
        assert (got[index]["synset"], got[index]["name"]) == (entry["synset"], entry["name"])
    probs = [entry["prob"] for entry in record["top_k"]]
    assert probs == sorted(probs, reverse=True)
    for key in ("method", "scales", "models"):
        assert record[key] == expected[key]
    assert isinstance(record["seconds"], float) and record["seconds"] >= 0


@pytest.mark.parametrize("options", [("--scales", SCALES), ("--scales", "96", "--no-flip")],
                         ids=["three-scales", "one-scale-no-flip"])
def test_host_matches_python_infer(host, small_model, images, options):
    expected = python_infer(small_model, images, *options)
    records, result = classify(host, small_model, images, *options)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip()  # nor a decoder's own warnings (libpng prints some of these files')
    assert [r["path"] for r in records] == images
    for record in records:
        assert_same_top5(record, expected[record["path"]])


@pytest.mark.parametrize("config, normalization", [("A-LRN", "torchvision"), ("C", "caffe")])
def test_host_runs_each_graph_variant(host, tmp_path, config, normalization):
    """LRN (A-LRN), Div (torchvision's std), 1x1 convs (C), BGR weights (caffe) in the graph."""
    from conftest import export_small_model

    model = export_small_model(tmp_path / f"vgg_{config}.onnx", config=config, normalization=normalization)
    images = [str(SAMPLES / "rocket.jpg"), str(SAMPLES / "camera.png")]
    expected = python_infer(model, images, "--scales", "64,96")
    records, result = classify(host, model, images, "--scales", "64,96")
    assert result.returncode == 0, result.stderr
    for record in records:
        assert_same_top5(record, expected[record["path"]])


def test_default_scales_come_from_metadata(host, small_model):
    records, result = classify(host, small_model, [SAMPLES / "chelsea.png"])
    assert result.returncode == 0, result.stderr
    assert records[0]["scales"] == [64, 96, 128]


def preprocessed(path, q: int) -> np.ndarray:
    from vgg_onnx.decoding import load_image
    from vgg_onnx.scales import rescale

    return rescale(load_image(path), q).transpose(2, 0, 1)[None].astype(np.float32)


def onnxruntime_outputs(model, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return tuple(session.run(["scores", "probs"], {"image": tensor}))


@pytest.mark.parametrize("image, q", [("chelsea.png", 96), ("camera.png", 128), ("rocket.jpg", 64)])
def test_identical_tensor_gives_identical_outputs(host, small_model, tmp_path, image, q):
    from vgg_onnx.scales import mirror

    tensor = preprocessed(SAMPLES / image, q)
    if host[0].endswith("node"):  # onnxruntime-node takes a batch; OpenCV 4.6 runs batch 1 only
        tensor = np.concatenate([tensor, mirror(tensor[0].transpose(1, 2, 0)).transpose(2, 0, 1)[None]])
    raw = tmp_path / "input.f32"
    tensor.tofile(raw)
    result = run(host, small_model, "--raw-input", raw, "--shape", ",".join(map(str, tensor.shape)))
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    scores, probs = onnxruntime_outputs(small_model, tensor)
    assert scores.shape[2:] != (1, 1)  # a real score map, so the spatial mean is exercised
    host_scores = np.array(outputs["scores"]["data"]).reshape(outputs["scores"]["shape"])
    host_probs = np.array(outputs["probs"]["data"]).reshape(outputs["probs"]["shape"])
    assert host_scores.shape == scores.shape and host_probs.shape == probs.shape
    # scores are O(10): compare relative to their range; probabilities absolutely
    assert np.max(np.abs(host_scores - scores)) / np.max(np.abs(scores)) < TENSOR_TOLERANCE
    assert np.max(np.abs(host_probs - probs)) < TENSOR_TOLERANCE


def without_metadata(model, folder):
    import onnx

    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    path = folder / "bare.onnx"
    onnx.save(proto, str(path))
    return path


def test_sidecar_json_stands_in_for_metadata_props(host, small_model, tmp_path):
    import onnx

    from vgg_onnx.metadata import ModelInfo, sidecar_path

    bare = without_metadata(small_model, tmp_path)
    info = ModelInfo.from_metadata_props({p.key: p.value for p in onnx.load(str(small_model)).metadata_props})
    with open(sidecar_path(str(bare)), "w") as f:
        json.dump(info.to_json_dict(), f)
    image = SAMPLES / "coffee.png"
    expected, _ = classify(host, small_model, [image])
    records, result = classify(host, bare, [image])
    assert result.returncode == 0, result.stderr
    assert [e["index"] for e in records[0]["top_k"]] == [e["index"] for e in expected[0]["top_k"]]
    assert records[0]["top_k"][0]["prob"] == pytest.approx(expected[0]["top_k"][0]["prob"], abs=1e-7)


def one_error_line(result: subprocess.CompletedProcess, *fragments) -> str:
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr  # nor a JavaScript stack:
    assert not any(line.strip().startswith("at ") for line in result.stderr.splitlines())
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_bad_images_are_reported_and_the_batch_goes_on(host, small_model, tmp_path):
    missing, not_image, good = tmp_path / "missing.jpg", tmp_path / "notes.png", SAMPLES / "chelsea.png"
    not_image.write_text("not an image\n")
    records, result = classify(host, small_model, [missing, good, not_image], "--scales", "64")
    assert result.returncode == 1
    assert [r["path"] for r in records] == [str(missing), str(good), str(not_image)]
    assert set(records[0]) == {"path", "error"} and "No such file" in records[0]["error"]
    assert "top_k" in records[1]
    assert set(records[2]) == {"path", "error"} and "not a supported image" in records[2]["error"]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 2 and str(missing) in errors[0] and str(not_image) in errors[1]


def test_model_without_metadata_is_refused(host, small_model, tmp_path):
    records, result = classify(host, without_metadata(small_model, tmp_path), [SAMPLES / "chelsea.png"])
    assert result.returncode == 1 and records is None
    one_error_line(result, "no vgg-onnx metadata")


@pytest.mark.parametrize("content, fragment", [(None, "cannot read"), ("hello", "no vgg-onnx metadata")],
                         ids=["missing", "not-onnx"])
def test_unusable_model_file_is_one_line(host, tmp_path, content, fragment):
    model = tmp_path / "model.onnx"
    if content is not None:
        model.write_text(content)
    records, result = classify(host, model, [SAMPLES / "chelsea.png"])
    assert result.returncode == 1 and records is None
    one_error_line(result, str(model), fragment)


@pytest.mark.parametrize("options, fragment", [
    (("--scales", "abc"), "comma-separated"),
    (("--scales", "32"), "smaller than the model's crop size 64"),
    (("--frobnicate",), "unknown option"),
    (("--max-pixels", "0"), "--max-pixels 0 must be positive"),
], ids=["not-numbers", "below-crop", "unknown-option", "max-pixels-zero"])
def test_usage_errors_exit_2(host, small_model, options, fragment):
    records, result = classify(host, small_model, [SAMPLES / "chelsea.png"], *options)
    assert result.returncode == 2 and records is None
    one_error_line(result, fragment)


def python_infer_errors(model, images, *options) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "vgg_onnx", "infer", *map(str, images), "--model", str(model),
                             "--format", "json", "--provider", "cpu", *options], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    return {record["path"]: record.get("error") for record in json.loads(result.stdout)}


@pytest.mark.parametrize("max_pixels, scales, message", [
    # chelsea.png is 451 x 300: over a limit of 100,000 itself; rescaled to 384, over 200,000
    ("100000", "64", "451x300 image exceeds the pixel limit of 100000 (--max-pixels)"),
    ("200000", "384", "rescaled to 577x384 it would exceed the pixel limit of 200000"),
], ids=["image", "rescaled"])
def test_pixel_limit_is_pythons(host, small_model, tmp_path, max_pixels, scales, message):
    """The same limit, option and message as vgg-onnx infer; the other images still classified."""
    import cv2

    image, small = str(SAMPLES / "chelsea.png"), str(tmp_path / "small.png")
    cv2.imwrite(small, np.full((60, 80, 3), 90, np.uint8))  # within both limits at every scale used
    options = ("--max-pixels", max_pixels, "--scales", scales, "--no-flip")
    records, result = classify(host, small_model, [image, small], *options)
    assert result.returncode == 1
    assert records[0] == {"path": image, "error": f"{image}: {message}"}
    assert "top_k" in records[1]
    assert python_infer_errors(small_model, [image, small], *options)[image] == records[0]["error"]
    one_error_line(result, message)


def test_node_takes_a_command_line_longer_than_onnxruntime_can(node_host, small_model, tmp_path):
    """onnxruntime-node 1.30 segfaults when its process's command line is over ~16,000 bytes: the
    CLI hands long argument lists to a copy of itself over a pipe."""
    stem = "a-long-file-name-" * 6
    images = []
    for i in range(240):  # 240 paths of ~140 bytes: over 32,000 bytes of arguments
        path = tmp_path / f"{stem}{i:03d}.png"
        if i % 40 == 0:
            path.symlink_to(SAMPLES / "chelsea.png")
        images.append(str(path))
    assert sum(len(p) + 1 for p in images) > 32_000
    records, result = classify(node_host, small_model, images, "--scales", "64", "--no-flip")
    assert result.returncode == 1, result.stderr  # the paths that do not exist
    assert [r["path"] for r in records] == images
    assert all(("top_k" in r) == (i % 40 == 0) for i, r in enumerate(records))


def test_node_with_a_long_command_line_stops_on_sigint(node_host, small_model, tmp_path):
    """The copy that classifies ends with the process the user interrupts."""
    import signal
    import time

    images = []
    for i in range(300):
        path = tmp_path / f"{'photo-' * 16}{i:03d}.png"
        path.symlink_to(SAMPLES / "chelsea.png")
        images.append(str(path))
    process = subprocess.Popen([*node_host, str(small_model), *images], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not children.read_text().split():
        time.sleep(0.1)
    child = children.read_text().split()
    assert child, "no classifying copy started"
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert process.returncode == -signal.SIGINT
    time.sleep(0.5)
    assert not Path(f"/proc/{child[0]}").exists() or "Z" in Path(f"/proc/{child[0]}/stat").read_text().split()[2]


def test_node_module_refuses_a_session_under_a_long_command_line(node_host, small_model):
    script = ("require(process.argv[1]).loadModel(process.argv[2])"
              ".then(() => console.log('created'), (e) => console.log(e.message))")
    result = run([node_host[0], "-e", script], node_host[1], small_model, "x" * 20_000)
    assert result.returncode == 0, result.stderr
    assert "command line is" in result.stdout and "crashes above about 16000" in result.stdout


def docs_block(language: str) -> str:
    """The README's example for this language, from its section on embedding the model."""
    text = (REPO / "README.md").read_text()
    text = text[text.index("## Using the model from C++ and Node.js"):]
    start = text.index(f"```{language}\n") + len(language) + 4
    return text[start:text.index("```", start)]


@pytest.fixture
def model_with_sidecar(small_model, tmp_path):
    import onnx

    from vgg_onnx.metadata import ModelInfo, sidecar_path

    model = tmp_path / "vgg_A.onnx"
    shutil.copy(small_model, model)
    info = ModelInfo.from_metadata_props({p.key: p.value for p in onnx.load(str(model)).metadata_props})
    with open(sidecar_path(str(model)), "w") as f:
        json.dump(info.to_json_dict(), f)
    return model


def check_example_output(output: str, host: list[str], model) -> None:
    records, _ = classify(host, model, [SAMPLES / "rocket.jpg"])
    name, prob = output.split()
    assert name == records[0]["top_k"][0]["name"]
    assert float(prob) == pytest.approx(records[0]["top_k"][0]["prob"], abs=1e-5)


def test_docs_cpp_example_builds_and_agrees(cpp_host, model_with_sidecar, tmp_path):
    if not shutil.which("pkg-config"):
        unavailable("pkg-config is not installed")
    source = tmp_path / "example.cpp"
    source.write_text(docs_block("cpp"))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "opencv4"], capture_output=True, text=True).stdout.split()
    built = subprocess.run(["c++", "-std=c++17", "-O1", str(source), *flags, "-o", str(tmp_path / "example")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    result = run([str(tmp_path / "example")], model_with_sidecar, SAMPLES / "rocket.jpg")
    assert result.returncode == 0, result.stderr
    check_example_output(result.stdout, cpp_host, model_with_sidecar)


def test_docs_node_example_agrees(node_host, model_with_sidecar, tmp_path):
    source = tmp_path / "example.js"
    source.write_text(docs_block("js").replace("./runtime/node/classify.js", node_host[1]))
    result = run([node_host[0], str(source)], model_with_sidecar, SAMPLES / "rocket.jpg")
    assert result.returncode == 0, result.stderr
    check_example_output(result.stdout, node_host, model_with_sidecar)
