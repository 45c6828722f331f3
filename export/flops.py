"""FLOPs and score-map sizes of a compiled model, read from the ONNX graph alone (no torch).

Used by `vgg-onnx inspect` for graphs without our metadata; the runtime, which has no onnx, counts the same from the model's
metadata (runtime/flops.py; a test keeps the two equal). A FLOP here is
one multiply or one add: a conv costs 2 * out_h * out_w * C_out * C_in * k_h * k_w per image
(the FC layers are convs in the compiled graph). ReLU, pooling, LRN and softmax are left out,
as usual; they are well under 1% of VGG's work.
"""

from __future__ import annotations

import math
import os

from vgg_onnx.configs import score_map_size  # noqa: F401 - re-exported for inspect and the tests


def load_graph_structure(model):
    """A ModelProto from a path (weights not needed for counting, but the file holds them) or a proto."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model), load_external_data=False)
    return model


def _attribute(node, name, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return list(attribute.ints) if attribute.ints else attribute.i
    return default


def _conv_weight_shapes(graph) -> dict[str, list[int]]:
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info):  # weights kept as inputs
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(value.name, [d.dim_value for d in dims])
    return shapes


def layer_flops(model, height: int, width: int) -> list[tuple[str, tuple[int, int], int]]:
    """(node name, output h x w, FLOPs per image) of every conv, following the spatial size through
    convs and max-pools along the graph's chain."""
    graph = load_graph_structure(model).graph
    weights = _conv_weight_shapes(graph)
    sizes = {graph.input[0].name: (height, width)}
    out = []
    for node in graph.node:
        size = next((sizes[i] for i in node.input if i in sizes), None)
        if size is None:
            continue
        h, w = size
        if node.op_type in ("Conv", "MaxPool", "AveragePool"):
            if node.op_type == "Conv":
                c_out, c_in, kh, kw = weights[node.input[1]]
            else:
                kh, kw = _attribute(node, "kernel_shape", [1, 1])
            sh, sw = _attribute(node, "strides", [1, 1])
            pads = _attribute(node, "pads", [0, 0, 0, 0])
            dh, dw = _attribute(node, "dilations", [1, 1])
            h = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
            w = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
            if h < 1 or w < 1:
                raise ValueError(f"input {height}x{width} is too small: {node.name or node.op_type} has no output")
            if node.op_type == "Conv":
                # c_in is per group in the weight's shape, so this holds for grouped convs too
                out.append((node.name or node.output[0], (h, w), 2 * h * w * c_out * c_in * kh * kw))
        if node.op_type in ("ReduceMean", "Softmax", "Flatten", "Gemm", "GlobalAveragePool"):
            continue  # beyond the score map: no spatial size to follow
        for output in node.output:
            sizes[output] = (h, w)
    return out


def conv_parameters(model) -> int:
    """Weights and biases of the graph's convolutions (the FC layers are convolutions here), counted
    per use: onnxsim may merge identical tensors (all-zero biases) into one initializer."""
    graph = load_graph_structure(model).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    count = 0
    for node in graph.node:
        if node.op_type == "Conv":
            for name in node.input[1:]:
                count += math.prod(shapes.get(name, [0]))
    return count


def conv_flops(model, height: int, width: int) -> int:
    """FLOPs (2 x multiply-adds) of one height x width image through the graph's convolutions."""
    return sum(flops for _, _, flops in layer_flops(model, height, width))
