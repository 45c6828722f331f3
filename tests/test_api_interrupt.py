"""Ctrl-C in the runtime: a run ends within seconds even while a decode worker is blocked for
good (as in open() on a FIFO), and `eval` still reports the images done so far, marked partial."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest

from conftest import PYTHON, REPO

# Runs the CLI with decoding of any file named "block*" stuck forever (after saying so in a
# marker file), the way a worker hangs in open() on a FIFO.
BLOCKING_CLI = """
import faulthandler, pathlib, signal, sys, threading
# Ctrl-C works as in a terminal even when the test runner was started in the background (`cmd &`
# ignores SIGINT, and the ignoring is inherited); every thread's stack is printed on SIGUSR1
signal.signal(signal.SIGINT, signal.default_int_handler)
faulthandler.register(signal.SIGUSR1, all_threads=True)
import vgg_onnx.runtime.evaluate as evaluate
marker, real = pathlib.Path(sys.argv[1]), evaluate.to_rgb
def to_rgb(source, max_pixels):
    if pathlib.Path(str(source)).name.startswith("block"):
        marker.write_text("blocked")
        threading.Event().wait()
    return real(source, max_pixels)
evaluate.to_rgb = to_rgb
from vgg_onnx.cli import main
main(sys.argv[2:])
"""


def interrupted_run(marker, cli_env, args: list[str], seconds: float = 120.0):
    """Start the CLI, wait until a worker is blocked (it writes `marker`), press Ctrl-C;
    (exit code, stdout, stderr, seconds from Ctrl-C to the end)."""
    proc = subprocess.Popen([PYTHON, "-c", BLOCKING_CLI, str(marker), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env, cwd=REPO)
    deadline = time.monotonic() + seconds
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=10)
    time.sleep(1.5)  # let the images before the blocked one reach the network
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # where it hangs, for the failure message
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running 20 s after Ctrl-C; its threads then:\n{err[-6000:]}")
    finally:
        proc.kill()
    return proc.returncode, out, err, time.monotonic() - sent


def image_folder(root, names):
    rng = np.random.default_rng(1)
    folder = root / "class_1"
    folder.mkdir(parents=True)
    for name in names:
        cv2.imwrite(str(folder / name), cv2.GaussianBlur(rng.integers(0, 256, (70, 90, 3), np.uint8), (0, 0), 2))
    return root


def test_ctrl_c_ends_infer_while_a_worker_is_blocked(small_model, tmp_path, cli_env):
    data = image_folder(tmp_path / "data", ["a.png", "block.png", "c.png"])
    code, out, err, took = interrupted_run(tmp_path / "marker", cli_env, ["infer", str(data), "-m", str(small_model),
                                                               "--format", "jsonl"])
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert took < 4, f"{took:.1f} s after Ctrl-C"


def test_ctrl_c_in_eval_reports_the_images_done(small_model, tmp_path, cli_env):
    data = image_folder(tmp_path / "data", ["a.png", "b.png", "block.png", "d.png"])
    out_file = tmp_path / "report.json"
    code, out, err, took = interrupted_run(tmp_path / "marker", cli_env, [
        "eval", str(data), "-m", str(small_model), "--methods", "dense", "--batch-size", "2", "--workers", "1",
        "--format", "json", "--output", str(out_file)])
    assert code == 130 and "Traceback" not in err and took < 4
    assert "interrupted: the report covers the 2 image(s) done of 4" in err
    report = json.loads(out_file.read_text())
    assert report["partial"] is True and report["images"] == 2 and report["planned"] == 4
    table_code, table, _, _ = interrupted_run(tmp_path / "marker2", cli_env, [
        "eval", str(data), "-m", str(small_model), "--methods", "dense", "--batch-size", "2"])
    assert table_code == 130
    lines = table.splitlines()
    assert lines[0] == "top-1 / top-5 error (%) -- PARTIAL: interrupted after 2 of 4 images"
    assert lines[1].split() == ["model", "dense"] and lines[-1].startswith("2 images (0 failed)")
