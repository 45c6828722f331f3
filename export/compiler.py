"""VGG (FC form) -> one dynamic-shape ONNX graph: normalisation, conv form, scores and probs.

fc6 becomes a (crop/32)x(crop/32) conv and fc7, fc8 1x1 convs: the Linear weights reshaped
in C,H,W order, which is exactly the order torch.flatten gives the FC form's input.

The graph is emitted directly with onnx.helper from the torch module's layers rather than
traced by torch.onnx.export: VGG is a plain chain, so this is short, needs no tracing (VGG-D
compiles in about a second and one copy of the weights), folds batch norm into the convs,
and gives A-LRN a single ONNX LRN node instead of torch's decomposed pooling arithmetic.
DenseVGG is the torch twin of the emitted graph; verification compares the two. The graph is
emitted minimal, so no simplifier runs over it (docs/export.md).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from vgg_onnx.configs import FC_STATE_KEYS, LRN_PARAMS, ConvSpec, LrnSpec, PoolSpec, fc_layers
from vgg_onnx.metadata import INPUT_NAME, PROBS_NAME, SCORES_NAME, ModelInfo
from vgg_onnx.normalization import Normalization
from vgg_onnx.train.model import VGG

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "DenseVGG", "build_graph", "compile_model", "linear_to_conv",
           "reference_outputs", "relative_error"]

DEFAULT_OPSET = 17  # also parses in OpenCV 4.6's DNN importer
MIN_OPSET, MAX_OPSET = 13, 21  # Softmax over one axis from 13; onnxruntime 1.31 loads up to 21 here


def linear_to_conv(linear: nn.Linear, in_channels: int, kernel: int) -> nn.Conv2d:
    """A conv sharing the Linear's storage (a reshape is a view): exact, and no weight copy."""
    conv = nn.Conv2d(in_channels, linear.out_features, kernel, device="meta")
    conv.weight = nn.Parameter(linear.weight.detach().reshape(linear.out_features, in_channels, kernel, kernel),
                               requires_grad=False)
    conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return conv


class DenseVGG(nn.Module):
    """The exported network: raw 0..255 RGB image -> (score map, posterior).

    Normalisation is inside: subtract the mean (and divide by std) per channel. A BGR model's
    channel reversal is folded into the first conv's weights, which is exact (padding zeros
    are the same in either order) and keeps the graph free of gathers. The conv layers are
    copied (small); the FC weights are shared with `model` (large).
    """

    def __init__(self, model: VGG, norm: Normalization):
        super().__init__()
        self.config, self.crop_size, self.num_classes = model.config, model.crop_size, model.num_classes
        self.features = copy.deepcopy(model.features).eval()
        self.features.requires_grad_(False)
        if norm.channel_order == "BGR":
            first = next(m for m in self.features if isinstance(m, nn.Conv2d))
            first.weight.data = first.weight.data.flip(1).contiguous()
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


# --- emission ------------------------------------------------------------------------------

def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode batch norm folded into the conv before it (computed in float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
    return weight.float().numpy(), bias.float().numpy()


def _conv_arrays(dense: DenseVGG, spec: ConvSpec) -> tuple[np.ndarray, np.ndarray]:
    """The weight and bias of one conv of the conv form, batch norm folded in."""
    conv = getattr(dense, spec.name) if spec.name in FC_STATE_KEYS else dense.get_submodule(spec.state_key)
    if spec.batch_norm_key is not None:
        return _fold_batch_norm(conv, dense.get_submodule(spec.batch_norm_key))
    return conv.weight.detach().numpy(), conv.bias.detach().numpy()


def _graph_layers(dense: DenseVGG):
    """(kind, name, params) of each layer of the conv form, from the config's layer specs (which
    carry the Caffe-style names and the torch modules' state keys)."""
    layers = dense.config.feature_layers() + fc_layers(dense.crop_size, dense.num_classes)
    for spec in layers:
        if isinstance(spec, PoolSpec):
            yield "pool", spec.name, None
        elif isinstance(spec, LrnSpec):
            yield "lrn", spec.name, LRN_PARAMS
        else:
            weight, bias = _conv_arrays(dense, spec)
            yield "conv", spec.name, (weight, bias, spec.padding)
            if spec.name != "fc8":
                yield "relu", "relu" + spec.name.removeprefix("conv").removeprefix("fc"), None  # relu1_1, relu6


class _GraphBuilder:
    """Nodes and weights of one graph, appended in order along VGG's chain. The weights stay numpy
    arrays (views of the torch tensors where the dtype allows) until `attach_weights` writes them
    into the finished model: onnx.helper copies a graph into its model, and copying hundreds of MB
    of initializers would double the peak memory."""

    def __init__(self, weight_dtype):
        self.nodes, self.weights, self.weight_dtype = [], {}, weight_dtype

    def constant(self, name: str, array, dtype=None) -> str:
        self.weights[name] = np.ascontiguousarray(array, dtype=dtype or self.weight_dtype)
        return name

    def attach_weights(self, graph_proto) -> None:
        """Each weight as an initializer of `graph_proto`, released here as soon as it is written."""
        from onnx import helper

        for name in list(self.weights):
            array = self.weights.pop(name)
            tensor = graph_proto.initializer.add()
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.raw_data = array.tobytes()  # little-endian on every machine onnxruntime supports

    def node(self, op: str, inputs: list[str], output: str, name: str, **attributes) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attributes))
        return output


def _input_nodes(graph: _GraphBuilder, dense: DenseVGG, fp16: bool) -> str:
    """Normalisation (and the cast to fp16) on the raw image; returns the tensor the convs read."""
    from onnx import TensorProto

    x = graph.node("Sub", [INPUT_NAME, graph.constant("mean", dense.mean.numpy(), np.float32)], "centred",
                   "subtract_mean")
    if dense.scale_std:
        x = graph.node("Div", [x, graph.constant("std", dense.std.numpy(), np.float32)], "normalised", "divide_std")
    if fp16:
        x = graph.node("Cast", [x], "input_fp16", "to_fp16", to=TensorProto.FLOAT16)
    return x


def _layer_nodes(graph: _GraphBuilder, dense: DenseVGG, x: str, scores: str) -> None:
    """The conv form's layers, fc8 writing `scores`."""
    for kind, name, params in _graph_layers(dense):
        out = scores if name == "fc8" else name
        if kind == "conv":
            weight, bias, pad = params
            k = weight.shape[-1]
            x = graph.node("Conv", [x, graph.constant(name + ".weight", weight), graph.constant(name + ".bias", bias)],
                           out, name, kernel_shape=[k, k], pads=[pad] * 4, strides=[1, 1], dilations=[1, 1])
        elif kind == "relu":
            x = graph.node("Relu", [x], out, name)
        elif kind == "pool":
            x = graph.node("MaxPool", [x], out, name, kernel_shape=[2, 2], strides=[2, 2])
        else:  # ONNX's LRN divides alpha by size, as torch and Caffe do
            x = graph.node("LRN", [x], out, name, size=params["size"], alpha=params["alpha"], beta=params["beta"],
                           bias=params["k"])


def _output_nodes(graph: _GraphBuilder, fp16: bool) -> None:
    """fp16 scores back to fp32; the posterior from the score map's spatial mean."""
    from onnx import TensorProto

    if fp16:
        graph.node("Cast", ["scores_fp16"], SCORES_NAME, "scores_to_fp32", to=TensorProto.FLOAT)
    # GlobalAveragePool + Flatten rather than ReduceMean: OpenCV 4.6's DNN importer reduces only
    # the first spatial position of ReduceMean(axes=[2, 3]), so hosts built on it got wrong probs
    graph.node("GlobalAveragePool", [SCORES_NAME], "mean_scores_4d", "spatial_mean")
    graph.node("Flatten", ["mean_scores_4d"], "mean_scores", "flatten", axis=1)
    graph.node("Softmax", ["mean_scores"], PROBS_NAME, "softmax", axis=1)


def build_graph(dense: DenseVGG, info: ModelInfo, opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of `dense` with its weights (fp16 when info.precision says so) and metadata."""
    from onnx import TensorProto, helper

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}")
    fp16 = info.precision == "fp16"
    graph = _GraphBuilder(np.float16 if fp16 else np.float32)
    _layer_nodes(graph, dense, _input_nodes(graph, dense, fp16), "scores_fp16" if fp16 else SCORES_NAME)
    _output_nodes(graph, fp16)
    classes = info.num_classes
    onnx_graph = helper.make_graph(
        graph.nodes, f"vgg_{info.config}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(SCORES_NAME, TensorProto.FLOAT, ["N", classes, "h", "w"]),
         helper.make_tensor_value_info(PROBS_NAME, TensorProto.FLOAT, ["N", classes])])
    opset_id = helper.make_opsetid("", opset)
    proto = helper.make_model(onnx_graph, opset_imports=[opset_id], producer_name="vgg-onnx",
                              producer_version=info.version)
    # the lowest IR version that carries this opset: onnx 1.23 would write 14, which onnxruntime 1.31 refuses
    proto.ir_version = helper.find_min_ir_version_for([opset_id])
    proto.doc_string = (f"VGG-{info.config} (Simonyan & Zisserman 2015), dense evaluation: input '{INPUT_NAME}' "
                        f"float32 Nx3xHxW RGB 0..255; outputs '{SCORES_NAME}' (score map) and '{PROBS_NAME}'.")
    for key, value in info.to_metadata_props().items():
        proto.metadata_props.add(key=key, value=value)
    graph.attach_weights(proto.graph)
    return proto


def compile_model(model: VGG, info: ModelInfo, opset: int = DEFAULT_OPSET, check: bool = True):
    """(proto, DenseVGG) of `model` described by `info` (neither is changed). check=False leaves
    onnx.checker to the caller (export checks the written file instead, which spares a serialised
    copy of the weights in memory)."""
    import onnx

    dense = DenseVGG(model.eval(), info.normalization).eval()
    proto = build_graph(dense, info, opset)
    if check:
        onnx.checker.check_model(proto)
    return proto, dense


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: scale-free, and stable where values are near 0."""
    return float(np.max(np.abs(actual.astype(np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-30))
