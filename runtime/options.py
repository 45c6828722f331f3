"""What `infer`, `eval` and `bench` share: model options, the scheduler they build, the cost
they announce and their progress bar (stderr, never mixed into results on stdout)."""

from __future__ import annotations

import contextlib
import os
import sys

import click

from vgg_onnx.decoding import DEFAULT_MAX_PIXELS
from vgg_onnx.errors import UsageError
from vgg_onnx.scales import parse_scales

from .evaluate import DEFAULT_BATCH_SIZE, Evaluator, configure_opencv_threads, load_sessions
from .flops import format_flops, image_flops
from .protocol import METHODS
from .session import BACKENDS, PROVIDERS, open_session

DEFAULT_MODEL = os.path.join("models", "vgg_D.onnx")  # where `make export` and `make demo` write
METHOD_HELP = "dense (whole image and mirror), multi-crop (5x5 grid of crops and mirrors), or both (their mean)."


def resolve_models(models: tuple[str, ...]) -> list[str]:
    """--model, else $VGG_ONNX_MODEL, else models/vgg_D.onnx when it exists (said on stderr)."""
    if models:
        return list(models)
    from_env = [m for m in os.environ.get("VGG_ONNX_MODEL", "").split(os.pathsep) if m]
    if from_env:
        return from_env
    if os.path.isfile(DEFAULT_MODEL):
        click.echo(f"vgg-onnx: no --model given: using {DEFAULT_MODEL}", err=True)
        return [DEFAULT_MODEL]
    raise UsageError(f"no model given: use --model FILE.onnx (repeatable) or set VGG_ONNX_MODEL "
                     f"({DEFAULT_MODEL}, what `make export` writes, is not here)")


BACKEND_KEY = "vgg_onnx.backend"


def _remember_backend(ctx: click.Context, param, value: str) -> str:
    # kept in the context, not passed: the commands hand their options on to build_evaluator
    ctx.meta[BACKEND_KEY] = value
    return value


def model_options(func):
    """Options every runtime command shares: models, scales, provider and the pipeline's knobs."""
    options = [
        click.option("--model", "-m", "models", multiple=True, metavar="FILE.onnx",
                     help="Exported model; repeat to fuse several (their posteriors are averaged). "
                          f"Default: $VGG_ONNX_MODEL (paths separated by '{os.pathsep}'), else {DEFAULT_MODEL} "
                          "(what `make export` writes) when it exists."),
        click.option("--scales", metavar="Q[,Q...]",
                     help="Test scales (shorter side). Default: each model's own, from its metadata."),
        click.option("--no-flip", is_flag=True, help="Leave out the mirror images."),
        click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
                     help="ONNX Runtime provider; auto = CUDA where its libraries load, else CPU."),
        click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True,
                     expose_value=False, callback=_remember_backend,
                     help="Inference engine: ONNX Runtime, or OpenVINO's CPU plugin (the openvino extra; bf16 "
                          "where the CPU has it, else float32). The same .onnx files, int8 ones too."),
        click.option("--threads", type=int, metavar="N",
                     help="CPU provider threads, 1 to the CPUs available (default: all of them); more "
                          "would only contend for the cores and cost memory."),
        click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True, metavar="N",
                     help="Network inputs per run (images, mirrors or crops of one shape)."),
        click.option("--workers", type=int, default=1, show_default=True, metavar="N",
                     help="Threads decoding and rescaling ahead of the network."),
        click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True, metavar="N",
                     help="Refuse images (and rescaled images) larger than this."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels, methods,
                    heatmap=False) -> Evaluator:
    if workers < 1:
        raise UsageError(f"--workers {workers} must be at least 1")
    if max_pixels < 1:
        raise UsageError(f"--max-pixels {max_pixels} must be positive")
    scale_list = parse_scales(scales) if scales else None
    configure_opencv_threads()
    context = click.get_current_context(silent=True)
    backend = context.meta.get(BACKEND_KEY, "onnxruntime") if context else "onnxruntime"
    if backend == "onnxruntime":
        sessions = load_sessions(list(models), provider, threads)
    else:
        sessions = [open_session(m, provider, threads, backend) for m in models]
    for session in sessions:
        if not session.info.weights_source:
            click.echo(f"vgg-onnx: note: {session.name} has random weights (exported without trained weights): "
                       "its predictions mean nothing", err=True)
    return Evaluator(sessions, methods, scale_list, flip=not no_flip, batch_size=batch_size,
                     max_pixels=max_pixels, heatmap=heatmap)


def announce_work(evaluator: Evaluator, images: int) -> None:
    """The expected cost up front, on stderr: FLOPs per (typical 500x375) image and in all."""
    method = "both" if evaluator.need_dense and evaluator.need_crops else evaluator.methods[0]
    flops = sum(image_flops(s.info, method, qs, evaluator.flip)
                for s, qs in zip(evaluator.sessions, evaluator.model_scales))
    label = ", ".join(m for m in METHODS if m in evaluator.methods)
    scales = sorted({len(qs) for qs in evaluator.model_scales})
    models = f" x {len(evaluator.sessions)} models" if len(evaluator.sessions) > 1 else ""
    click.echo(f"vgg-onnx: {label} at {'/'.join(map(str, scales))} scale(s){models}: about {format_flops(flops)} "
               f"per image (for a 500x375 photo), {format_flops(flops * images)} for {images} image(s)", err=True)


def progress(total: int, what: str):
    """A bar on stderr in images, moved by each network batch's share of its images' work."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=what, file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} img "
                           "[{elapsed}<{remaining}, {rate_fmt}]")


def advance(bar):
    """The evaluator's progress callback for a bar: float shares, never past the total."""
    return lambda amount: bar.update(max(0.0, min(amount, bar.total - bar.n)))


@contextlib.contextmanager
def bar_paused(bar):
    """On a terminal the bar's line and stdout share the screen: clear it while results print."""
    shared = sys.stdout.isatty() and sys.stderr.isatty()
    if shared:
        bar.clear()
    try:
        yield
    finally:
        if shared:
            bar.refresh()
