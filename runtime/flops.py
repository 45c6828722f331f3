"""FLOPs of the dense network on an input size, from the model's metadata alone (no torch, no onnx).

Counts the convolutions and the FC layers as convolutions (fc6 a (crop/32)^2 conv, fc7 and fc8
1x1), two FLOPs per multiply-add; ReLU, pooling, bias and softmax are left out, as usual.
"""

from __future__ import annotations

from vgg_onnx.configs import FC_WIDTH, NUM_POOLS, parse_config, scaled_channels, score_map_size
from vgg_onnx.metadata import ModelInfo


def dense_flops(info: ModelInfo, height: int, width: int) -> int:
    """FLOPs of one N=1 run of the exported graph on a height x width input."""
    config = parse_config(info.config)
    flops, channels, h, w = 0, 3, height, width
    for layer in config.layers:
        if layer == "M":
            h, w = h // 2, w // 2
        elif layer != "LRN":
            out, kernel = (layer[1], 1) if isinstance(layer, tuple) else (layer, 3)
            out = scaled_channels(out, info.width_mult)
            flops += 2 * channels * kernel * kernel * out * h * w  # padding keeps h x w
            channels = out
    k = info.crop_size // 2 ** NUM_POOLS
    oh, ow = score_map_size(height, width, info.crop_size)
    hidden = scaled_channels(FC_WIDTH, info.width_mult)
    flops += 2 * channels * k * k * hidden * oh * ow  # fc6 as a k x k conv
    flops += 2 * hidden * hidden * oh * ow  # fc7 as a 1x1 conv
    flops += 2 * hidden * info.num_classes * oh * ow  # fc8 as a 1x1 conv
    return flops


TYPICAL_SIZE = (500, 375)  # ImageNet's most common photo size (width, height), for estimates


def image_flops(info: ModelInfo, method: str, scales: list[int], flip: bool = True,
                size: tuple[int, int] = TYPICAL_SIZE) -> int:
    """FLOPs one image of `size` (width, height) costs this model under a method of the protocol:
    per scale the dense image (and mirror) and/or the 5x5 crops (and mirrors)."""
    from vgg_onnx.preprocessing import rescaled_size

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
