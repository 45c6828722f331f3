"""`vgg-onnx quantize`: the command line of export/quantize.py (onnx is imported only when it runs)."""

from __future__ import annotations

import json
import sys

import click

from vgg_onnx.export.quantize import CALIBRATION_METHODS, DEFAULT_HELD_OUT, DEFAULT_LIMIT

__all__ = ["quantize_command"]


@click.command("quantize", context_settings={"max_content_width": 100})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calibration", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder of real images (searched recursively) to calibrate the activation ranges on; "
                   "some are held out to verify the result.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.onnx",
              help="The int8 model; its JSON metadata goes beside it. Both appear whole, after verification "
                   "passes, or not at all.")
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default="minmax", show_default=True,
              help="How activation ranges are chosen from the calibration tensors: their min and max, the "
                   "range that minimises the KL divergence (entropy), or a percentile of |values|. entropy and "
                   "percentile keep every intermediate tensor in memory: keep --limit small.")
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIMIT, show_default=True, metavar="N",
              help="Calibration images. Each is seen at every test scale of the model, whole and as 5 crops.")
@click.option("--held-out", type=click.IntRange(min=1), default=DEFAULT_HELD_OUT, show_default=True, metavar="N",
              help="Images held out from calibration to verify on (at most half of the folder).")
@click.option("--held-out-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Verify on the first --held-out images of this folder instead of images of --calibration.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the shuffle that picks the held-out and the calibration images.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True, metavar="F",
              help="Least top-1 agreement with the float32 model (dense at its test scales) to write the result: "
                   "refused when the held-out images put it below F with 95% confidence.")
@click.option("--force", is_flag=True, help="Write the int8 model even below --min-agreement.")
@click.option("--threads", type=int, metavar="N", help="ONNX Runtime threads for verification. Default: all CPUs.")
@click.option("--int8-first-conv", is_flag=True,
              help="Quantize conv1_1 too (by default it stays float32): 4-10% faster, less accurate "
                   "(docs/benchmarks.md).")
def quantize_command(model, calibration, out, method, limit, held_out, held_out_dir, seed, min_agreement, force,
                     threads, int8_first_conv):
    """Quantize a float32 vgg-onnx MODEL to int8 (ONNX Runtime static quantization, QDQ, per-channel
    weights), calibrated on real images through the project's preprocessing at the model's test
    scales, dense and crop inputs both.

    The int8 file keeps the model's inputs, outputs and metadata, plus its precision and the
    calibration it came from. Before writing, it is checked against MODEL on held-out images; the
    top-1 agreement and the largest probability difference go to stderr, the result as JSON to
    stdout. Exit 1 (nothing written) below --min-agreement, or when some images could not be read
    (the model is then written, and the images listed).
    """
    from vgg_onnx.export.quantize import quantize_model

    result = quantize_model(model, calibration, out, method=method, limit=limit, held_out=held_out,
                            held_out_dir=held_out_dir, seed=seed, min_agreement=min_agreement, force=force,
                            threads=threads, int8_first_conv=int8_first_conv, log=lambda m: click.echo(m, err=True))
    for problem in result.skipped:
        click.echo(f"vgg-onnx: skipped {problem}", err=True)
    click.echo(f"vgg-onnx: wrote {result.out} and {result.sidecar}", err=True)
    click.echo(json.dumps(result.to_json_dict()))
    if result.skipped:
        sys.exit(1)
