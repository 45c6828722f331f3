"""The browser host (runtime/web, served by `vgg-onnx web`) in a real headless Chromium: Debian's
`chromium`, driven by playwright-core from npm through runtime/web/drive.mjs, which picks files in
the page as a user would and reads what the page shows. The page must agree with
`vgg-onnx infer --format json` and refuse bad files with the other hosts' one-line messages.

Skipped where node, chromium or runtime/web's npm packages are missing, except under CI (env CI
set), where that fails: `make host-deps` installs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES
from hostile_corpus import IMAGE_CASES
from test_hosts import assert_same_top5, python_infer, unavailable, without_metadata

WEB = REPO / "runtime" / "web"
CHROMIUM = os.environ.get("VGG_ONNX_CHROMIUM", "/usr/bin/chromium")
# files a browser's file picker can hand over (no FIFOs, devices or links), at the model's own scales
PAGE_CASES = [c for c in IMAGE_CASES if not c.options and c.name not in
              {"fifo", "dev-zero", "folder", "dangling-link", "oversized-file"}]
DRIVE_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def drive() -> list[str]:
    node = shutil.which("node")
    if not node:
        unavailable("node is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    for package in ("playwright-core", "onnxruntime-web"):
        if not (WEB / "node_modules" / package).is_dir():
            unavailable(f"runtime/web has no {package} (cd runtime/web && npm install --ignore-scripts)")
    return [node, str(WEB / "drive.mjs")]


@contextlib.contextmanager
def serving(model: Path):
    """`vgg-onnx web` serving `model` on a free port of 127.0.0.1: its URL."""
    server = subprocess.Popen([sys.executable, "-m", "vgg_onnx", "web", "--model", str(model), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line, server.stderr.read()
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def page_url(small_model):
    with serving(small_model) as url:
        yield url


def run_page(drive: list[str], url: str, images: list, *options) -> tuple[dict, subprocess.CompletedProcess]:
    result = subprocess.run([*drive, url, *map(str, images), *options], capture_output=True, text=True,
                            timeout=DRIVE_TIMEOUT_S, cwd=WEB)
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout), result


def test_page_matches_python_infer(drive, page_url, small_model, tmp_path):
    images = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    shot = tmp_path / "page.png"
    page, result = run_page(drive, page_url, images, "--screenshot", shot)
    assert result.returncode == 0, result.stderr
    assert page["isolated"] is True and page["threads"] >= 1  # COOP/COEP served: threads allowed
    assert page["load_seconds"] > 0
    expected = python_infer(small_model, images)
    assert [r["path"] for r in page["records"]] == images
    for record in page["records"]:
        # the page names the model by its URL; everything else as `vgg-onnx infer` writes it
        want = expected[record["path"]]
        assert record["models"] == ["model.onnx"]
        assert_same_top5({**record, "models": want["models"]}, want)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_page_runs_an_int8_model(drive, small_model, tmp_path):
    """onnxruntime-web runs the QDQ graph `vgg-onnx quantize` writes, as `vgg-onnx infer` does."""
    from test_hosts_int8 import assert_same_top5_int8, quantize_small_model

    model = quantize_small_model(small_model, tmp_path)
    images = [str(SAMPLES / "chelsea.png"), str(SAMPLES / "rocket.jpg")]
    with serving(model) as url:
        page, result = run_page(drive, url, images)
    assert result.returncode == 0, result.stderr
    expected = python_infer(model, images)
    assert [r["path"] for r in page["records"]] == images
    for record in page["records"]:
        assert_same_top5_int8(record, expected[record["path"]])


def test_bad_files_show_one_line_and_the_page_goes_on(drive, page_url, small_model, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    bad = [case.make(folder, small_model) for case in PAGE_CASES]
    good = SAMPLES / "chelsea.png"
    page, result = run_page(drive, page_url, [*bad, good])
    assert result.returncode == 1, result.stderr
    records = page["records"]
    for case, path, record in zip(PAGE_CASES, bad, records):
        assert set(record) == {"path", "error"}, (case.name, record)
        message = record["error"]
        assert message.startswith(f"{path.name}: ") and "\n" not in message, (case.name, message)
        assert case.fragment.lower() in message.lower(), (case.name, message)
    assert "top_k" in records[-1], records[-1]


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "no-metadata"])
def test_page_reads_the_sidecar_or_says_the_model_has_no_metadata(drive, small_model, tmp_path, sidecar):
    import onnx

    from vgg_onnx.metadata import ModelInfo, sidecar_path

    bare = without_metadata(small_model, tmp_path)
    if sidecar:
        info = ModelInfo.from_metadata_props({p.key: p.value for p in onnx.load(str(small_model)).metadata_props})
        Path(sidecar_path(str(bare))).write_text(json.dumps(info.to_json_dict()))
    with serving(bare) as url:
        page, result = run_page(drive, url, [SAMPLES / "rocket.jpg"])
    if sidecar:
        assert result.returncode == 0, result.stderr
        assert page["records"][0]["scales"] == [64, 96, 128]
    else:
        assert result.returncode == 1
        assert page == {"error": "model.onnx: no vgg-onnx metadata (not exported by vgg-onnx export)"}


def test_server_serves_the_page_isolated_and_nothing_else(page_url, small_model):
    with urllib.request.urlopen(page_url) as response:
        assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert b"app.js" in response.read()
    with urllib.request.urlopen(page_url + "model.onnx") as response:
        assert response.read() == Path(small_model).read_bytes()
    for path in ("../pyproject.toml", "ort/../package.json", "ort/package.json", "drive.mjs", "node_modules/"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(page_url + path)
        assert refused.value.code == 404, path


@pytest.mark.parametrize("args, message", [
    (["--model", "missing.onnx"], "--model missing.onnx: cannot read: No such file or directory"),
    (["--model", "."], "--model .: cannot read: not a regular file"),
])
def test_web_command_refuses_a_bad_model_in_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "vgg_onnx", "web", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"vgg-onnx: error: {message}"
    assert not result.stdout


def test_web_command_imports_no_torch():
    code = ("import sys; import vgg_onnx.runtime.webserver; "
            "assert 'torch' not in sys.modules, 'the web server imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
