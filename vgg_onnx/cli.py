"""The `vgg-onnx` command. Subcommands load lazily, so `--help` and the runtime need no torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from . import __version__
from .errors import VggOnnxError

__all__ = ["COMMANDS", "main"]

# name -> (module, attribute, one-line help shown by `vgg-onnx --help`)
COMMANDS = {
    "export": ("vgg_onnx.export.cli", "export_command", "Compile a VGG net to one verified dynamic-shape ONNX graph."),
    "quantize": ("vgg_onnx.export.quantize_cli", "quantize_command",
                 "Quantize a model to int8, calibrated on real images and verified against float32."),
    "inspect": ("vgg_onnx.export.cli", "inspect_command", "Show an exported model's interface, metadata and FLOPs."),
    "infer": ("vgg_onnx.runtime.cli", "infer_command", "Classify images: dense, multi-crop or both, several scales and models."),
    "eval": ("vgg_onnx.runtime.cli", "eval_command", "Top-1/top-5 error on an ImageFolder, per evaluation method."),
    "bench": ("vgg_onnx.runtime.cli", "bench_command", "Measure network, pipeline and matrix-multiply throughput."),
    "train": ("vgg_onnx.train.cli", "train_command", "Train a VGG net with the paper's recipe (one process or torchrun)."),
    "stats": ("vgg_onnx.train.cli", "stats_command", "Compute a training set's mean RGB and PCA colour statistics."),
    "plot": ("vgg_onnx.train.cli", "plot_command", "Draw a training run's loss and error curves to curves.png."),
    "web": ("vgg_onnx.runtime.webserver", "web_command", "Serve a web page that classifies images in the browser (onnxruntime-web)."),
}


# the extra each command needs beyond the core, and the packages that extra brings
# (pyproject.toml's optional-dependencies); checked before the command runs
COMMAND_EXTRAS = {"export": "export", "quantize": "export", "inspect": "runtime", "infer": "runtime",
                  "eval": "runtime", "bench": "runtime", "train": "train", "stats": "train", "plot": "train"}
EXTRA_PACKAGES = {"runtime": ("onnxruntime",), "export": ("torch", "onnx", "safetensors", "onnxruntime"),
                  "train": ("torch", "safetensors", "matplotlib")}
# commands that need only part of their extra (quantize: onnx and onnxruntime, no torch)
COMMAND_PACKAGES = {"quantize": ("onnx", "onnxruntime")}
# a ModuleNotFoundError of any other module is a bug, and keeps its traceback
PACKAGE_EXTRAS = {"torch": None, "safetensors": None, "onnx": "export",
                  "matplotlib": "train", "onnxruntime": "runtime"}


def fail(error: VggOnnxError) -> "NoReturn":  # noqa: F821
    click.echo(f"vgg-onnx: error: {error}", err=True)
    sys.exit(error.exit_code)


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def exit_needing_extra(command: str, extra: str, package: str) -> "NoReturn":  # noqa: F821
    also = " (or '.[runtime-cpu]' on a machine without an NVIDIA GPU)" if extra == "runtime" else ""
    click.echo(f"vgg-onnx: error: {command} needs the {extra} extra: pip install '.[{extra}]'{also} "
               f"({package} is not installed)", err=True)
    sys.exit(2)


def check_extra(command: str) -> None:
    """Exit 2 with one line when a package of the command's extra is not installed."""
    extra = COMMAND_EXTRAS.get(command)
    for package in COMMAND_PACKAGES.get(command, EXTRA_PACKAGES.get(extra, ())):
        if not installed(package):
            exit_needing_extra(command, "runtime" if package == "onnxruntime" else extra, package)


def exit_for_missing_extra(command: str, error: ModuleNotFoundError) -> None:
    """The same line for an extra's package that fails to import after all; returns for any other module."""
    package = (error.name or "").split(".")[0]
    if package in PACKAGE_EXTRAS:
        exit_needing_extra(command, PACKAGE_EXTRAS[package] or COMMAND_EXTRAS.get(command, "runtime"), package)


HELP_REQUESTED = {"-h", "--help"}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            exit_for_missing_extra(name, e)
            raise
        return getattr(module, attr)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not HELP_REQUESTED & set(rest):  # `COMMAND --help` works without the extra
            check_extra(name)
        return name, command, rest

    def format_commands(self, ctx, formatter):
        # the listing uses the table above: no stage (and no torch) is imported for `--help`
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VggOnnxError as e:
            fail(e)
        except ModuleNotFoundError as e:  # the commands import their extras' packages when they run
            exit_for_missing_extra(ctx.invoked_subcommand or "vgg-onnx", e)
            raise
        except OSError as e:  # a file problem no command anticipated: still one line, not a traceback
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"vgg-onnx: error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("vgg-onnx: interrupted", err=True)
            sys.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="vgg-onnx")
def main():
    """Train, compile and deploy the VGG networks of Simonyan & Zisserman (ICLR 2015).

    Stages: `train` (PyTorch) -> `export` (one dynamic-shape ONNX graph) -> `infer` / `eval`
    (ONNX Runtime and OpenCV, no torch). Run `vgg-onnx COMMAND --help` for each command's options.
    """
