"""The layers of an ONNX graph as the FLOP counter's chain (runtime/flops.py counts them).

Used by `vgg-onnx inspect` for graphs without our metadata, and by the tests as an independent
check of the config's count: the chain here is read from the graph's Conv and pool nodes and
their weights, not from the configuration table.
"""

from __future__ import annotations

import math
import os

from vgg_onnx.runtime.flops import SpatialLayer, chain_flops

__all__ = ["conv_flops", "conv_parameters", "graph_chain", "layer_flops", "load_graph_structure"]

SPATIAL_OPS = ("Conv", "MaxPool", "AveragePool")
BEYOND_THE_SCORE_MAP = ("ReduceMean", "Softmax", "Flatten", "Gemm", "GlobalAveragePool")


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


def _weight_shapes(graph) -> dict[str, list[int]]:
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info):  # weights kept as inputs
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(value.name, [d.dim_value for d in dims])
    return shapes


def _spatial_layer(node, weights: dict) -> SpatialLayer:
    channels = None
    if node.op_type == "Conv":
        c_out, c_in, kh, kw = weights[node.input[1]]  # c_in is per group, so grouped convs count right
        channels = (c_in, c_out)
    else:
        kh, kw = _attribute(node, "kernel_shape", [1, 1])
    return SpatialLayer(node.name or node.output[0], (kh, kw), tuple(_attribute(node, "strides", [1, 1])),
                        tuple(_attribute(node, "pads", [0, 0, 0, 0])), tuple(_attribute(node, "dilations", [1, 1])),
                        channels)


def graph_chain(model) -> list[SpatialLayer]:
    """The convs and pools on the path from the graph's first input to the score map, in order."""
    graph = load_graph_structure(model).graph
    weights = _weight_shapes(graph)
    reached, chain = {graph.input[0].name}, []
    for node in graph.node:
        if not any(i in reached for i in node.input) or node.op_type in BEYOND_THE_SCORE_MAP:
            continue
        if node.op_type in SPATIAL_OPS:
            chain.append(_spatial_layer(node, weights))
        reached.update(node.output)
    return chain


def layer_flops(model, height: int, width: int) -> list[tuple[str, tuple[int, int], int]]:
    """(node name, output h x w, FLOPs per image) of every conv of the graph."""
    return chain_flops(graph_chain(model), height, width)


def conv_parameters(model) -> int:
    """Weights and biases of the graph's convolutions (the FC layers are convolutions here), counted
    per use, so a tensor shared by two convs counts twice."""
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
