"""`vgg-onnx export` and `vgg-onnx inspect`. torch is imported inside `export` only, so `--help`
and `inspect` work without it."""

from __future__ import annotations

import json

import click

from vgg_onnx.configs import describe_configs
from vgg_onnx.normalization import NORMALIZATIONS
from vgg_onnx.params import CONFIG, CROP, INIT_METHODS, TRAIN_SCALES, WEIGHT_FORMATS


@click.command("export", context_settings={"max_content_width": 100})
@click.option("--config", "config", type=CONFIG, metavar="NAME",
              help=f"Network configuration (paper Table 1, plus batch-norm variants): {describe_configs()}. "
                   "Required unless --weights is one of our checkpoints, whose JSON names it.")
@click.option("--weights", type=click.Path(dir_okay=False), metavar="FILE",
              help="Weights to compile: a torchvision state dict (.pth/.pt), Caffe-named arrays (.npz, "
                   ".safetensors or .pth) or our checkpoint (X.safetensors with X.json beside it). "
                   "Without it the net gets RANDOM weights (useful for testing the pipeline only).")
@click.option("--weights-format", type=click.Choice(WEIGHT_FORMATS), default="auto", show_default=True,
              help="How to read --weights; auto: a checkpoint when its JSON is there, otherwise by the names inside.")
@click.option("--normalization", type=click.Choice(list(NORMALIZATIONS)),
              help="What the weights expect of the input, applied inside the graph: paper = minus the training "
                   "set's mean RGB; torchvision = RGB/255, minus mean, over std; caffe = BGR minus the mean pixel. "
                   "Default: the checkpoint's own, caffe for Caffe weights, torchvision for torchvision weights, "
                   "else paper.")
@click.option("--classes", "num_classes", type=click.IntRange(min=1), metavar="N",
              help="Number of classes (fc8 outputs). Default: read from the weights, else 1000 (ImageNet-1k).")
@click.option("--width-mult", type=float, metavar="F",
              help="Channel width multiplier (small, fast test models). Default: read from the weights, else 1.")
@click.option("--crop", type=CROP, metavar="PX",
              help="Training crop size, a multiple of 32; fc6 becomes a (crop/32)x(crop/32) conv. "
                   "Default: read from the weights, else 224.")
@click.option("--train-scale", "train_scale", type=TRAIN_SCALES, metavar="S|SMIN,SMAX",
              help="Training scale(s) recorded in the metadata; they set the recommended test scales "
                   "({S-32, S, S+32} or {Smin, mid, Smax}). Default: the checkpoint's, else 256.")
@click.option("--opset", type=int, default=17, show_default=True, metavar="N",
              help="ONNX opset (13..21); the IR version is the lowest that carries it, so ONNX Runtime loads it.")
@click.option("--fp16", is_flag=True,
              help="Store weights and compute convs in fp16 (inputs and outputs stay fp32); half the file size, "
                   "verified against a looser bound.")
@click.option("--init", type=click.Choice(INIT_METHODS), default="glorot", show_default=True,
              help="Random initialisation when no --weights: gaussian (std 0.01, the paper's) or glorot.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.onnx",
              help="Output model; a JSON copy of its metadata is written beside it (FILE.json). "
                   "Both appear whole or not at all, after verification passes.")
def export_command(config, weights, weights_format, normalization, num_classes, width_mult, crop, train_scale,
                   opset, fp16, init, seed, out):
    """Compile a VGG net to one verified, dynamic-shape ONNX graph.

    Input 'image': float32 N x 3 x H x W, RGB 0..255 (H, W at least the crop size); the normalisation
    the weights expect happens inside. Outputs 'scores' (the class score map, N x classes x h x w: fc6-8
    rewritten as convolutions) and 'probs' (N x classes: softmax of the score map's spatial mean).
    Every export ends with a check of ONNX Runtime against torch (FC form at the crop size, conv form at
    two larger sizes, batch 1 and 3); an error over the bound fails the export and writes nothing.
    """
    # config, crop and scales were parsed and checked by their click types, before torch is imported
    from vgg_onnx.export.exporter import export_model

    export_model(out, config=config, weights=weights, weights_format=weights_format, normalization=normalization,
                 num_classes=num_classes, width_mult=width_mult, crop=crop, train_scales=train_scale, opset=opset,
                 fp16=fp16, init=init, seed=seed, log=lambda m: click.echo(m, err=True))


@click.command("inspect", context_settings={"max_content_width": 100})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--size", metavar="HxW",
              help="Also count the FLOPs (conv and FC-as-conv, 2 x multiply-adds) and give the score-map size "
                   "for one image of this size, such as 256x341 (height x width).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A readable table, or JSON for scripts.")
def inspect_command(model, size, fmt):
    """Show an exported model: config, parameter count, inputs and outputs with their dynamic
    dimensions, metadata, and at --size the FLOPs and the score-map size."""
    from vgg_onnx.export.inspect import describe, format_table, parse_size

    details = describe(model, parse_size(size) if size else None)
    click.echo(json.dumps(details, indent=1) if fmt == "json" else format_table(details))
