"""Packaging: the core and the runtime import without torch; the wheel holds one namespace."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile

from conftest import PYTHON, REPO

BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test ({name})", name=name)
            return None

    sys.meta_path.insert(0, BlockTorch())
""")


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO)


def test_core_and_runtime_import_without_torch():
    result = run_without_torch("""
        import vgg_onnx, vgg_onnx.preprocessing, vgg_onnx.metadata, vgg_onnx.cli, vgg_onnx.configs, vgg_onnx.classes
        import vgg_onnx.decoding, vgg_onnx.scales, vgg_onnx.normalization, vgg_onnx.params
        import vgg_onnx.runtime
        import vgg_onnx.export.flops, vgg_onnx.export.inspect, vgg_onnx.export.cli
        try:
            import torch
        except ImportError:
            print("torch blocked")
        assert "torch" not in sys.modules
    """)
    assert result.returncode == 0, result.stderr
    assert "torch blocked" in result.stdout


def test_help_and_inspect_work_without_torch(small_model):
    result = run_without_torch("""
        import sys
        from vgg_onnx.cli import main
        sys.argv = ["vgg-onnx", "--help"]
        try:
            main()
        except SystemExit as e:
            assert e.code == 0, e.code
    """)
    assert result.returncode == 0, result.stderr
    assert "export" in result.stdout and "inspect" in result.stdout
    for args in (["export", "--help"], ["inspect", str(small_model), "--size", "96x128"]):
        result = run_without_torch(f"""
            import sys
            from vgg_onnx.cli import main
            sys.argv = ["vgg-onnx", *{args!r}]
            main()
        """)
        assert result.returncode == 0, result.stderr
    assert "score map 2 x 3" in result.stdout
    result = subprocess.run([PYTHON, "-m", "vgg_onnx", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_wheel_holds_only_the_vgg_onnx_namespace(tmp_path):
    # build from a copy, so the working tree gets no build/ folder
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "build", "node_modules", "*.egg-info", "*.onnx")
    for folder in ("vgg_onnx", "train", "export", "runtime"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("vgg_onnx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"vgg_onnx"}, top
    for required in ("vgg_onnx/train/model.py", "vgg_onnx/export/weights.py", "vgg_onnx/export/compiler.py",
                     "vgg_onnx/export/cli.py", "vgg_onnx/runtime/__init__.py", "vgg_onnx/data/imagenet1k_classes.tsv"):
        assert required in names, required


def resolved_extras() -> dict[str, set[str]]:
    """Every extra of pyproject.toml with the extras it names expanded: {extra: requirement strings}."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(name: str) -> set[str]:
        out = set()
        for requirement in extras[name]:
            if requirement.startswith("vgg-onnx["):
                for inner in requirement[len("vgg-onnx["):-1].split(","):
                    out |= expand(inner.strip())
            else:
                out.add(requirement)
        return out

    return {name: expand(name) for name in extras}


def test_no_extra_installs_both_onnxruntime_wheels():
    """The GPU and CPU wheels install the same module: one extra must never bring both on one platform."""
    from packaging.requirements import Requirement

    platforms = [{"platform_system": "Linux", "platform_machine": "x86_64"},
                 {"platform_system": "Linux", "platform_machine": "aarch64"},
                 {"platform_system": "Darwin", "platform_machine": "arm64"},
                 {"platform_system": "Windows", "platform_machine": "AMD64"}]
    extras = resolved_extras()
    for name, requirements in extras.items():
        for platform in platforms:
            wheels = {r.name for r in map(Requirement, requirements)
                      if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(platform))}
            assert len(wheels) <= 1, (name, platform, wheels)
    assert {Requirement(r).name for r in extras["runtime-cpu"]} == {"onnxruntime"}
    assert not any(Requirement(r).name == "onnxruntime-gpu" for r in extras["all-cpu"])
    assert not any(Requirement(r).name.startswith("torch") for r in extras["runtime"] | extras["runtime-cpu"])
