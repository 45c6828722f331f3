"""The `vgg-onnx` command. Subcommands load lazily, so `--help` and the runtime need no torch."""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import VggOnnxError

# name -> (module, attribute, one-line help shown by `vgg-onnx --help`)
COMMANDS = {
    "export": ("vgg_onnx.export.cli", "export_command", "Compile a VGG net to one verified dynamic-shape ONNX graph."),
    "inspect": ("vgg_onnx.export.cli", "inspect_command", "Show an exported model's interface, metadata and FLOPs."),
    "infer": ("vgg_onnx.runtime.cli", "infer_command", "Classify images: dense, multi-crop or both, several scales and models."),
    "eval": ("vgg_onnx.runtime.cli", "eval_command", "Top-1/top-5 error on an ImageFolder, per evaluation method."),
    "bench": ("vgg_onnx.runtime.cli", "bench_command", "Measure network, pipeline and matrix-multiply throughput."),
    "train": ("vgg_onnx.train.cli", "train_command", "Train a VGG net with the paper's recipe (one process or torchrun)."),
    "stats": ("vgg_onnx.train.cli", "stats_command", "Compute a training set's mean RGB and PCA colour statistics."),
    "plot": ("vgg_onnx.train.cli", "plot_command", "Draw a training run's loss and error curves to curves.png."),
}


def fail(error: VggOnnxError) -> "NoReturn":  # noqa: F821
    click.echo(f"vgg-onnx: error: {error}", err=True)
    sys.exit(error.exit_code)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            missing = e.name or str(e)
            extra = module_name.split(".")[1]
            click.echo(f"vgg-onnx: error: '{name}' needs {missing}, which is not installed: "
                       f"pip install 'vgg-onnx[{extra}]'", err=True)
            sys.exit(2)
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        # the listing uses the table above: no stage (and no torch) is imported for `--help`
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VggOnnxError as e:
            fail(e)
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
