"""A newcomer's first hour: the CPU-only runtime install from the clone runs infer, eval and inspect
without torch or onnx; commands that need another extra say which in one line; the repository's
documentation refers to nothing outside it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
import venv
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, SAMPLES

from vgg_onnx.errors import UsageError
from vgg_onnx.scales import parse_scales

# the extra the README tells CPU-only users to install
CPU_EXTRA = "runtime-cpu"


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The single `vgg-onnx: error:` line of a failed command, after checking its exit code."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vgg-onnx: error:"), result.stderr
    return lines[0]


# --- usage mistakes ----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["256,,384", "256,", ",256", " , "])
def test_an_empty_scale_is_an_error(text):
    with pytest.raises(UsageError, match="not comma-separated integers"):
        parse_scales(text)
    assert parse_scales(" 256, 384 ") == [256, 384]


# --- missing extras, in the developers' environment with the packages hidden ---------------

HIDE_PACKAGES = textwrap.dedent("""
    import importlib.abc, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    from vgg_onnx.cli import main
    sys.argv = ["vgg-onnx", *ARGS]
    main()
""")


def run_with_hidden(hidden: set[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"HIDDEN = {sorted(hidden)!r}\nARGS = {list(args)!r}\n" + HIDE_PACKAGES
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("hidden, args, extra", [
    ({"torch"}, ["export", "--config", "A", "--out", "m.onnx"], "export"),
    ({"onnx", "onnxsim"}, ["export", "--config", "A", "--out", "m.onnx"], "export"),
    ({"torch"}, ["train", "--config", "A", "--data", ".", "--out", "run"], "train"),
    ({"matplotlib"}, ["plot", "."], "train"),
    ({"onnxruntime"}, ["infer", "x.jpg", "--model", "m.onnx"], "runtime"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, hidden, args, extra):
    line = one_error_line(run_with_hidden(hidden, *args, cwd=tmp_path), 2)
    assert f"{args[0]} needs the {extra} extra: pip install '.[{extra}]'" in line, line
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run").exists()


def test_a_missing_module_of_no_extra_keeps_its_traceback(tmp_path):
    """Only the extras' packages are explained; any other missing module is a bug to see whole."""
    result = run_with_hidden({"numpy"}, "inspect", "m.onnx", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "needs the" not in result.stderr


# --- the CPU-only runtime install, in a clean virtualenv -------------------------------

def copy_source(target: Path) -> Path:
    """The package's sources without build outputs, so the working tree gets no build/ folder."""
    ignore = shutil.ignore_patterns("__pycache__", "build", "node_modules", "*.egg-info", "*.onnx")
    target.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, target / name)
    for folder in ("vgg_onnx", "train", "export", "runtime"):
        shutil.copytree(REPO / folder, target / folder, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A virtualenv without system site packages holding only `pip install '.[runtime-cpu]'`."""
    root = tmp_path_factory.mktemp("first_hour")
    source = copy_source(root / "clone")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # from the clone's folder, as the README says: pip install '.[runtime-cpu]'
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f".[{CPU_EXTRA}]"], cwd=source,
                            capture_output=True, text=True, env=clean_env(), timeout=900)
    if result.returncode != 0:
        pytest.fail(f"pip install '.[{CPU_EXTRA}]' failed:\n{result.stderr[-3000:]}")
    return env_dir


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "VGG_ONNX_MODEL")}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def run_in(env_dir: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_dir / "bin" / "vgg-onnx"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=clean_env(), timeout=600)


def test_runtime_install_holds_no_torch_onnx_or_gpu_wheel(runtime_venv, tmp_path):
    listing = subprocess.run([str(runtime_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                             capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    installed = {p["name"].lower() for p in json.loads(listing.stdout)}
    assert {"vgg-onnx", "onnxruntime", "opencv-python-headless", "numpy"} <= installed, installed
    assert not installed & {"torch", "onnx", "onnxsim", "safetensors", "matplotlib", "onnxruntime-gpu"}, installed


def test_runtime_install_runs_infer_eval_and_inspect(runtime_venv, small_model, tmp_path):
    infer = run_in(runtime_venv, "infer", SAMPLES / "chelsea.png", SAMPLES / "rocket.jpg", "--model", small_model,
                   "--method", "both", "--format", "json", cwd=tmp_path)
    assert infer.returncode == 0, infer.stderr
    records = json.loads(infer.stdout)
    assert [Path(r["path"]).name for r in records] == ["chelsea.png", "rocket.jpg"]
    assert all(len(r["top_k"]) == 5 for r in records)

    data = tmp_path / "val"
    for index, image in enumerate(["chelsea.png", "coffee.png"]):
        (data / str(index)).mkdir(parents=True)
        shutil.copy(SAMPLES / image, data / str(index) / image)
    evaluation = run_in(runtime_venv, "eval", data, "--model", small_model, "--methods", "dense",
                        "--format", "json", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "dense" in evaluation.stdout and "2" in evaluation.stdout

    inspect = run_in(runtime_venv, "inspect", small_model, "--size", "96x128", "--format", "json", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    details = json.loads(inspect.stdout)
    assert details["config"] == "A" and details["at_size"]["score_map"] == [2, 3]
    assert details["parameters"] == details["metadata"]["param_count"] > 0
    assert details["inputs"][0]["shape"] == ["N", 3, "H", "W"] and details["at_size"]["flops"] > 0


def test_runtime_install_inspect_refuses_empty_and_foreign_files(runtime_venv, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_text("not a model at all")
    for name in ("empty.onnx", "text.onnx"):
        line = one_error_line(run_in(runtime_venv, "inspect", tmp_path / name, cwd=tmp_path), 1)
        assert f"{name}: not an ONNX model" in line, line


@pytest.mark.parametrize("args, extra", [
    (["export", "--config", "vgg16", "--out", "m.onnx"], "export"),
    (["train", "--config", "A", "--data", "data", "--out", "run"], "train"),
    (["stats", "data", "--out", "stats.json"], "train"),
    (["plot", "run"], "train"),
])
def test_runtime_install_names_the_extra_other_commands_need(runtime_venv, tmp_path, args, extra):
    line = one_error_line(run_in(runtime_venv, *args, cwd=tmp_path), 2)
    assert f"needs the {extra} extra: pip install '.[{extra}]'" in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written, no empty run folder


# --- the repository stands on its own ------------------------------------------------------

# The files of this change; the integrator extends the list to train/, runtime/ and docs/training.md
# once their references are converted.
SELF_CONTAINED = ["README.md", "Makefile", "pyproject.toml", "docs/protocol.md", "docs/benchmarks.md",
                  "vgg_onnx", "export/cli.py", "export/inspect.py", "export/flops.py"]


def test_documentation_and_code_refer_to_nothing_outside_the_repository():
    outside = re.compile(r"PAPER\.md|\.\./shared|issue \d+ §")
    found = []
    for name in SELF_CONTAINED:
        path = REPO / name
        files = [p for p in path.rglob("*") if p.suffix in (".py", ".md")] if path.is_dir() else [path]
        for file in files:
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if outside.search(line):
                    found.append(f"{file.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_protocol_doc_has_the_sections_the_code_cites():
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (\d)\. (.+)$", text, re.M)
    assert [n for n, _ in headings] == ["1", "2", "3", "4", "5"], headings
    for fact in ("138,357,544", "arXiv:1409.1556", "Table 3", "Table 5", "Table 6", "24.4 / 7.2", "23.7 / 6.8"):
        assert fact in text, fact
    cited = set()
    for file in [*(REPO / "vgg_onnx").rglob("*.py"), REPO / "README.md", REPO / "export" / "cli.py"]:
        cited |= set(re.findall(r"docs/protocol\.md §(\d)", file.read_text(encoding="utf-8")))
    assert cited and cited <= {n for n, _ in headings}


def test_inspect_reads_the_json_beside_a_model_without_metadata(small_model, tmp_path):
    """Hosts that strip metadata_props keep the JSON copy; a foreign graph is still counted from its layers."""
    import onnx

    from vgg_onnx.export.inspect import describe

    proto = onnx.load(str(small_model))
    props = {p.key: p.value for p in proto.metadata_props}
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    foreign = describe(str(tmp_path / "plain.onnx"), (96, 128))
    assert foreign["config"] is None and foreign["metadata"] == {}
    with_sidecar = describe(str(small_model), (96, 128))
    assert foreign["at_size"]["flops"] == with_sidecar["at_size"]["flops"]
    assert foreign["parameters"] == with_sidecar["parameters"]

    from vgg_onnx.metadata import ModelInfo

    info = ModelInfo.from_metadata_props(props)
    (tmp_path / "plain.json").write_text(json.dumps(info.to_json_dict()), encoding="utf-8")
    described = describe(str(tmp_path / "plain.onnx"), (96, 128))
    assert described["config"] == "A" and described["metadata"]["num_classes"] == 10
    assert described["at_size"] == {**with_sidecar["at_size"]}


# --- make demo rebuilds its model only when needed ----------------------------------------------

def make_dry_run(tree: Path, *args: str) -> str:
    result = subprocess.run(["make", "-n", "demo", f"PYTHON={PYTHON}", *args], cwd=tree, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_compiles_the_model_only_when_missing_or_stale(tmp_path):
    tree = copy_source(tmp_path / "clone")
    shutil.copy(REPO / "Makefile", tree / "Makefile")
    past = time.time() - 10_000  # the clone's files, an hour or more ago; make writes its stamps now

    def age(path: Path, seconds: float) -> None:
        os.utime(path, (past + seconds, past + seconds))

    for path in tree.rglob("*"):
        age(path, 0)
    exports = "vgg_onnx export --config D"
    assert exports in make_dry_run(tree)  # no model yet
    model = tree / "models" / "vgg_D.onnx"
    model.parent.mkdir()
    model.write_bytes(b"")
    output = make_dry_run(tree)  # the model was written after the weights stamp: up to date
    assert exports not in output and "infer samples/ --model models/vgg_D.onnx --method dense" in output
    assert "--method both" in output  # the next step, printed
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"")
    age(weights, 0)
    assert f"{exports} --weights {weights}" in make_dry_run(tree, f"WEIGHTS={weights}")  # other weights
    model.touch()
    assert exports not in make_dry_run(tree, f"WEIGHTS={weights}")
    time.sleep(0.01)
    assert exports in make_dry_run(tree)  # back to random weights: the file holds the other weights
    model.touch()
    assert exports not in make_dry_run(tree)
    (tree / "export" / "compiler.py").touch()
    assert exports in make_dry_run(tree)  # the compiler changed
