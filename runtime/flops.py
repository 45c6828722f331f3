"""FLOPs of the dense network: the one counter, fed by the config's layer specs or by a graph.

`chain_flops` follows the spatial size along a chain of convs and pools and counts each conv at
two FLOPs per multiply-add (the FC layers are convs in the compiled graph: fc6 a (crop/32)^2 conv,
fc7 and fc8 1x1); ReLU, LRN, bias and softmax are left out, as usual (well under 1% of VGG's work).
`dense_flops` feeds it the model's metadata alone (no torch, no onnx); export/flops.py feeds it
the layers read from an ONNX graph, for graphs without our metadata. A test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from vgg_onnx.configs import ConvSpec, PoolSpec, fc_layers, parse_config, scaled_channels
from vgg_onnx.metadata import ModelInfo

__all__ = ["SpatialLayer", "TYPICAL_SIZE", "chain_flops", "config_chain", "dense_flops", "format_flops",
           "image_flops"]


@dataclass(frozen=True)
class SpatialLayer:
    """A layer that changes the spatial size or costs FLOPs: a conv (with channels) or a pool."""

    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    channels: tuple[int, int] | None = None  # a conv's (input channels per group, output channels)


def chain_flops(layers: Iterable[SpatialLayer], height: int, width: int) -> list[tuple[str, tuple[int, int], int]]:
    """(name, output h x w, FLOPs per image) of each conv of the chain on a height x width input."""
    h, w, out = height, width, []
    for layer in layers:
        (kh, kw), (sh, sw), (dh, dw), pads = layer.kernel, layer.stride, layer.dilation, layer.pads
        h = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
        w = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
        if h < 1 or w < 1:
            raise ValueError(f"input {height}x{width} is too small: {layer.name} has no output")
        if layer.channels is not None:
            c_in, c_out = layer.channels
            out.append((layer.name, (h, w), 2 * h * w * c_out * c_in * kh * kw))
    return out


def config_chain(info: ModelInfo) -> list[SpatialLayer]:
    """The convs and pools of the model that `info` describes, from its config's layer specs."""
    specs = parse_config(info.config).feature_layers() + fc_layers(info.crop_size, info.num_classes)
    layers, channels = [], 3
    for spec in specs:
        if isinstance(spec, PoolSpec):
            layers.append(SpatialLayer(spec.name, (2, 2), (2, 2)))
        elif isinstance(spec, ConvSpec):  # fc8's outputs are the classes, which no width multiplier scales
            out = spec.out_channels if spec.name == "fc8" else scaled_channels(spec.out_channels, info.width_mult)
            layers.append(SpatialLayer(spec.name, (spec.kernel, spec.kernel), pads=(spec.padding,) * 4,
                                       channels=(channels, out)))
            channels = out
    return layers


def dense_flops(info: ModelInfo, height: int, width: int) -> int:
    """FLOPs of one N=1 run of the exported graph on a height x width input."""
    return sum(flops for _, _, flops in chain_flops(config_chain(info), height, width))


TYPICAL_SIZE = (500, 375)  # ImageNet's most common photo size (width, height), for estimates


def image_flops(info: ModelInfo, method: str, scales: list[int], flip: bool = True,
                size: tuple[int, int] = TYPICAL_SIZE) -> int:
    """FLOPs one image of `size` (width, height) costs this model under a method of the protocol:
    per scale the dense image (and mirror) and/or the 5x5 crops (and mirrors)."""
    from vgg_onnx.scales import rescaled_size

    views = 2 if flip else 1
    total = 0
    for q in scales:
        width, height = rescaled_size(size[0], size[1], q)
        if method in ("dense", "both"):
            total += views * dense_flops(info, height, width)
        if method in ("multi-crop", "both"):
            total += 25 * views * dense_flops(info, info.crop_size, info.crop_size)
    return total


def format_flops(flops: float) -> str:
    """1.2e12 -> '1.2 TFLOP'."""
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops:.3g} FLOP"
