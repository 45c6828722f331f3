"""VGG (FC form) -> one dynamic-shape ONNX graph: normalisation, conv form, scores and probs.

fc6 becomes a (crop/32)x(crop/32) conv and fc7, fc8 1x1 convs: the Linear weights reshaped
in C,H,W order, which is exactly the order torch.flatten gives the FC form's input.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
from torch import nn

from vgg_onnx.metadata import INPUT_NAME, PROBS_NAME, SCORES_NAME, ModelInfo
from vgg_onnx.preprocessing import Normalization
from vgg_onnx.train.model import VGG

DEFAULT_OPSET = 17  # the TorchScript exporter's opset 17 also parses in OpenCV 4.6's DNN importer
IR_VERSION = 8  # opset 17's IR; onnx 1.23 would write 14, which onnxruntime 1.31 refuses


def linear_to_conv(linear: nn.Linear, in_channels: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, linear.out_features, kernel)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(linear.out_features, in_channels, kernel, kernel))
        conv.bias.copy_(linear.bias)
    return conv


class DenseVGG(nn.Module):
    """The exported network: raw 0..255 RGB image -> (score map, posterior).

    Normalisation is inside: subtract the mean (and divide by std) per channel. A BGR model's
    channel reversal is folded into the first conv's weights, which is exact (padding zeros
    are the same in either order) and keeps the graph free of gathers.
    """

    def __init__(self, model: VGG, norm: Normalization):
        super().__init__()
        model = copy.deepcopy(model).eval()
        self.features = model.features
        if norm.channel_order == "BGR":
            first = model.conv_layers()[0]
            with torch.no_grad():
                first.weight.copy_(first.weight.flip(1))
        fc6, fc7, fc8 = model.fc_layers()
        k = model.fc6_kernel
        self.fc6 = linear_to_conv(fc6, fc6.in_features // (k * k), k)
        self.fc7 = linear_to_conv(fc7, fc7.in_features, 1)
        self.fc8 = linear_to_conv(fc8, fc8.in_features, 1)
        self.register_buffer("mean", torch.tensor(norm.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.scale_std = any(s != 1.0 for s in norm.std_rgb)
        self.register_buffer("std", torch.tensor(norm.std_rgb, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor):
        x = image - self.mean
        if self.scale_std:
            x = x / self.std
        x = self.features(x.to(self.fc8.weight.dtype))
        x = torch.relu(self.fc6(x))
        x = torch.relu(self.fc7(x))
        scores = self.fc8(x).float()
        probs = torch.softmax(scores.mean(dim=(2, 3)), dim=1)
        return scores, probs


def reference_outputs(model: VGG, norm: Normalization, image: torch.Tensor) -> torch.Tensor:
    """The FC-form torch model on a crop-size image, normalised outside: logits."""
    x = torch.from_numpy(norm.apply(image.permute(0, 2, 3, 1).numpy()).copy()).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.eval()(x.contiguous())


def to_onnx(model: VGG, info: ModelInfo, opset: int = DEFAULT_OPSET, fp16: bool = False,
            simplify: bool = True):
    """Build the ONNX ModelProto (with metadata). Returns (proto, dense torch module)."""
    import onnx

    dense = DenseVGG(model, info.normalization).eval()
    if fp16:
        for module in (dense.features, dense.fc6, dense.fc7, dense.fc8):
            module.half()
    crop = info.crop_size
    example = torch.rand(1, 3, crop, crop) * 255
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            dense, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[SCORES_NAME, PROBS_NAME],
            dynamic_axes={INPUT_NAME: {0: "N", 2: "H", 3: "W"},
                          SCORES_NAME: {0: "N", 2: "h", 3: "w"}, PROBS_NAME: {0: "N"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    del buffer
    if simplify:
        import onnxsim

        proto, ok = onnxsim.simplify(proto)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified graph")
    proto.ir_version = IR_VERSION
    proto.producer_name = "vgg-onnx"
    proto.producer_version = info.version
    proto.doc_string = (f"VGG-{info.config} (Simonyan & Zisserman 2015), dense evaluation: input '{INPUT_NAME}' "
                        f"float32 Nx3xHxW RGB 0..255; outputs '{SCORES_NAME}' (score map) and '{PROBS_NAME}'.")
    del proto.metadata_props[:]
    for key, value in info.to_metadata_props().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto, dense


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: scale-free, and stable where values are near 0."""
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-30))
