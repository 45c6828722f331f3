"""Every host on the hostile-input corpus (tests/hostile_corpus.py; the rules: docs/decoding.md).

Each case runs through the C++ host, the Node host and `vgg-onnx infer --format json`, and must
end within a bounded time with the documented exit code (1), one clear error line (no traceback,
no JavaScript stack, no core dump), an error record for a bad image beside the good image's
result, a peak memory under 2 GB, and no file changed.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SAMPLES
from hostile_corpus import CASES, Case
from test_hosts import cpp_host, node_host  # noqa: F401 (fixtures)

TIMEOUT_S = 120  # a cold `vgg-onnx infer` on a busy machine takes seconds; a hang takes forever
PEAK_MEMORY_LIMIT = 2 << 30
# The machine is protected from a host that does allocate gigabytes: its address space is capped
# above the limit measured, so such a run fails fast instead of swapping.
ADDRESS_SPACE_CAP = 4 << 30
GOOD_IMAGE = SAMPLES / "chelsea.png"

@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int
    timed_out: bool


def cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


def run_measured(argv: list[str], cwd: Path, cap_memory: bool) -> Outcome:
    """Run argv in its own process group; kill the group at TIMEOUT_S. The peak memory is the
    child's own (wait4), which covers the processes it waited for."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd,
                                   start_new_session=True, preexec_fn=cap_address_space if cap_memory else None)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(TIMEOUT_S, kill)
        timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Outcome(process.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                       seconds, usage.ru_maxrss * 1024, timed_out.is_set())


def snapshot(folder: Path) -> dict[str, tuple]:
    """What each entry is, its size and modification time, links not followed."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            entries[str(path.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return entries


@pytest.fixture
def python_host() -> list[str]:
    return [sys.executable, "-m", "vgg_onnx", "infer"]


def command(host: str, executable: list[str], model: Path, paths: list[Path], options: tuple) -> list[str]:
    if host == "python":
        return [*executable, *map(str, paths), "--model", str(model), "--format", "json", "--provider", "cpu", *options]
    return [*executable, str(model), *map(str, paths), *options]


def assert_one_clear_error_line(outcome: Outcome, *fragments: str, record_suffices: bool = False) -> None:
    """One line on stderr names the problem; where the JSON error record already does (Python's
    infer sums up its failures on stderr instead), there may be none."""
    lines = [line for line in outcome.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 or (record_suffices and not lines), outcome.stderr
    for fragment in fragments if lines else ():
        assert fragment.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in outcome.stderr and "core dumped" not in outcome.stderr
    assert not any(line.strip().startswith("at ") for line in outcome.stderr.splitlines()), outcome.stderr


def check_image_case(host: str, outcome: Outcome, bad: Path, case: Case) -> None:
    records = json.loads(outcome.stdout)
    if host == "python" and case.name == "folder":  # Python searches folders: an empty one adds nothing
        assert outcome.returncode == 0 and [r["path"] for r in records] == [str(GOOD_IMAGE)]
        return
    assert outcome.returncode == 1, outcome.stderr
    assert [r["path"] for r in records] == [str(bad), str(GOOD_IMAGE)]
    assert set(records[0]) == {"path", "error"} and case.fragment.lower() in records[0]["error"].lower(), records[0]
    assert "top_k" in records[1], records[1]
    assert_one_clear_error_line(outcome, str(bad), case.fragment, record_suffices=host == "python")


def check_model_case(outcome: Outcome, model: Path, case: Case) -> None:
    assert outcome.returncode == 1, outcome.stderr
    assert not outcome.stdout.strip() or json.loads(outcome.stdout) in ([], None), outcome.stdout
    assert_one_clear_error_line(outcome, str(model), case.fragment)


def parameters() -> list:
    params = []
    for host in ("cpp", "node", "python"):
        for case in CASES:
            params.append(pytest.param(host, case, id=f"{host}-{case.name}"))
    return params


@pytest.mark.parametrize("host, case", parameters())
def test_hostile_input(request, host, case, small_model, tmp_path):
    executable = request.getfixturevalue(f"{host}_host")
    folder = tmp_path / "corpus"
    folder.mkdir()
    model = folder / "model.onnx"
    model.write_bytes(Path(small_model).read_bytes())
    made = case.make(folder, model)
    before = snapshot(tmp_path)
    if case.kind == "image":
        argv = command(host, executable, model, [made, GOOD_IMAGE], case.options)
    else:
        argv = command(host, executable, made, [GOOD_IMAGE], case.options)
    outcome = run_measured(argv, tmp_path, cap_memory=host != "node")  # V8 reserves more address space
    assert not outcome.timed_out, f"no end within {TIMEOUT_S} s: {outcome.stderr[-2000:]}"
    assert outcome.returncode >= 0, f"killed by signal {-outcome.returncode}: {outcome.stderr[-2000:]}"
    assert outcome.peak_bytes < PEAK_MEMORY_LIMIT, f"peak memory {outcome.peak_bytes / 2**30:.2f} GiB"
    if case.kind == "image":
        check_image_case(host, outcome, made, case)
    else:
        check_model_case(outcome, made, case)
    assert snapshot(tmp_path) == before
