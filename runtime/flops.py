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
