"""What an exported model is: its interface, metadata, parameters and, at a size, FLOPs (onnx only, no torch)."""

from __future__ import annotations

import os

from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.export.flops import layer_flops, score_map_size
from vgg_onnx.metadata import FORMAT_KEY, ModelInfo


def parse_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '256x341' -> (256, 341): height x width."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--size {text!r}: give HxW (such as 256x341) or one number") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise UsageError(f"--size {text!r}: give HxW (such as 256x341) or one number")
    return values[0], values[1]


def _value_info(value) -> dict:
    tensor = value.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in tensor.shape.dim]
    from onnx import TensorProto

    return {"name": value.name, "type": TensorProto.DataType.Name(tensor.elem_type).lower(), "shape": dims}


def describe(path: str, size: tuple[int, int] | None = None) -> dict:
    import onnx

    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        proto = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError and friends
        raise VggOnnxError(f"{path}: not an ONNX model, or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    # per conv use: onnxsim may merge identical tensors (all-zero biases) into one initializer
    count = 0
    for node in graph.node:
        if node.op_type == "Conv":
            for name in node.input[1:]:
                if name in initializers:
                    n = 1
                    for d in initializers[name].dims:
                        n *= d
                    count += n
    props = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.from_metadata_props(props, path) if FORMAT_KEY in props else None  # others' models too
    result = {
        "file": path,
        "size_bytes": os.path.getsize(path),
        "config": info.config if info else None,
        "parameters": count,
        "ir_version": proto.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [_value_info(v) for v in graph.input if v.name not in initializers],
        "outputs": [_value_info(v) for v in graph.output],
        "nodes": len(graph.node),
        "metadata": info.to_json_dict() if info else {},
    }
    if size is not None:
        height, width = size
        crop = info.crop_size if info else None
        if crop and (height < crop or width < crop):
            raise UsageError(f"--size {height}x{width} is smaller than the model's crop size {crop}")
        try:
            layers = layer_flops(proto, height, width)
        except (ValueError, KeyError, IndexError) as e:
            raise VggOnnxError(f"{path}: cannot follow the graph at {height}x{width}: {e}") from None
        result["at_size"] = {
            "height": height, "width": width,
            "flops": sum(f for _, _, f in layers),
            "score_map": list(score_map_size(height, width, crop) if crop else layers[-1][1]),
            "layers": [{"name": n, "output": list(s), "flops": f} for n, s, f in layers],
        }
    return result


def format_table(d: dict) -> str:
    meta = d["metadata"]
    lines = [
        f"model        {d['file']} ({d['size_bytes'] / 2**20:.1f} MiB)",
        f"config       VGG-{d['config']}" if d["config"] else "config       (no vgg-onnx metadata)",
        f"parameters   {d['parameters']:,} (conv and FC-as-conv weights and biases)",
        f"format       IR {d['ir_version']}, opset {', '.join(f'{k} {v}' for k, v in d['opsets'].items())}, "
        f"{d['nodes']} nodes, by {d['producer'] or '?'}",
    ]
    for kind in ("inputs", "outputs"):
        for v in d[kind]:
            lines.append(f"{kind[:-1]:<12} {v['name']}: {v['type']} [{' x '.join(map(str, v['shape']))}]")
    if meta:
        norm = meta["normalization"]
        classes = meta["classes"]
        shown = ", ".join(c["name"] for c in classes[:3]) + (", …" if len(classes) > 3 else "")
        lines += [
            f"classes      {meta['num_classes']} ({shown})",
            f"normalise    {norm['preset']}: {norm['channel_order']}, mean {norm['mean_rgb']} std {norm['std_rgb']} "
            "(RGB, 0..255 units)",
            f"crop size    {meta['crop_size']}; width multiplier {meta['width_mult']:g}; precision {meta['precision']}",
            f"scales       trained at {meta['train_scales']}; test scales {meta['test_scales']}",
            f"weights      {meta['weights_source'] or '(random initialisation)'}"
            + (f" sha256 {meta['weights_sha256']}" if meta["weights_sha256"] else ""),
            f"version      vgg-onnx {meta['vgg_onnx_version']}",
        ]
    if "at_size" in d:
        a = d["at_size"]
        lines += [
            f"at {a['height']}x{a['width']}   {a['flops'] / 1e9:.2f} GFLOPs per image "
            f"({a['flops'] / 2e9:.2f} G multiply-adds); score map {a['score_map'][0]} x {a['score_map'][1]}",
        ]
    return "\n".join(lines)
