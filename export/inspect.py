"""What an exported model is: its interface, metadata, parameters and, at a size, FLOPs.

Reads the model with ONNX Runtime (the runtime extra: no torch, no onnx), the metadata from the
graph or the JSON beside it, and counts FLOPs from the metadata (runtime/flops.py). A graph
without our metadata is followed layer by layer when the onnx package is installed.
"""

from __future__ import annotations

import json
import os

from vgg_onnx.configs import score_map_size
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.metadata import FORMAT_KEY, METADATA_KEY, ModelInfo, sidecar_path

__all__ = ["describe", "format_table", "parse_size"]


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


# onnxruntime's type strings -> ONNX's element type names, as `inspect` has always printed them
ORT_TYPES = {"tensor(float)": "float", "tensor(float16)": "float16", "tensor(double)": "double",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8"}


def _value_info(value) -> dict:
    shape = [d if d is not None else "?" for d in value.shape]
    return {"name": value.name, "type": ORT_TYPES.get(value.type, value.type), "shape": shape}


def _open_session(path: str):
    """An ONNX Runtime session on the CPU: the runtime extra alone reads the model (no onnx package)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only reading it
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VggOnnxError(f"{path}: not an ONNX model, or truncated ({reason})") from None


def _model_info(path: str, props: dict[str, str]) -> ModelInfo | None:
    """The graph's metadata_props, else the JSON beside the model, else None (not one of ours)."""
    if METADATA_KEY in props or FORMAT_KEY in props:  # FORMAT_KEY alone: an older layout, said as such
        return ModelInfo.from_metadata_props(props, path)
    sidecar = sidecar_path(path)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                return ModelInfo.from_json_dict(json.load(f), sidecar)
        except (OSError, ValueError):
            return None
    return None


def _onnx_available() -> bool:
    """Whether the onnx package (the export extra) is here to read a graph without our metadata."""
    try:
        import onnx  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _graph_layers(path: str, height: int, width: int) -> list:
    from vgg_onnx.export.flops import layer_flops

    try:
        return layer_flops(path, height, width)
    except (ValueError, KeyError, IndexError) as e:
        raise VggOnnxError(f"{path}: cannot follow the graph at {height}x{width}: {e}") from None


def _at_size(path: str, info: ModelInfo | None, height: int, width: int) -> dict:
    result = {"height": height, "width": width}
    if info is not None:
        if height < info.crop_size or width < info.crop_size:
            raise UsageError(f"--size {height}x{width} is smaller than the model's crop size {info.crop_size}")
        from vgg_onnx.runtime.flops import dense_flops

        result["flops"] = dense_flops(info, height, width)
        result["score_map"] = list(score_map_size(height, width, info.crop_size))
        return result
    if not _onnx_available():  # a foreign graph is followed with onnx only
        result.update(flops=None, score_map=None)
        return result
    layers = _graph_layers(path, height, width)
    result["flops"] = sum(f for _, _, f in layers)
    result["score_map"] = list(layers[-1][1])
    result["layers"] = [{"name": n, "output": list(s), "flops": f} for n, s, f in layers]
    return result


def describe(path: str, size: tuple[int, int] | None = None) -> dict:
    """Everything `vgg-onnx inspect` shows about the model at `path`, as a JSON-ready dict; with
    `size` (height, width) also the FLOPs and score-map size of one image of that size."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VggOnnxError(f"{path}: not an ONNX model (the file is empty)")
    session = _open_session(path)
    meta = session.get_modelmeta()
    info = _model_info(path, dict(meta.custom_metadata_map))
    if info is not None:
        parameters = info.param_count
    else:
        from vgg_onnx.export.flops import conv_parameters

        parameters = conv_parameters(path) if _onnx_available() else None
    result = {
        "file": path,
        "size_bytes": os.path.getsize(path),
        "config": info.config if info else None,
        "parameters": parameters,
        "producer": meta.producer_name,
        "inputs": [_value_info(v) for v in session.get_inputs()],
        "outputs": [_value_info(v) for v in session.get_outputs()],
        "metadata": info.to_json_dict() if info else {},
    }
    if size is not None:
        result["at_size"] = _at_size(path, info, *size)
    return result


def _calibration_line(c: dict) -> str:
    """An int8 model's calibration in words: method, images, folder, what was quantized how."""
    what = ", ".join(f"{c[k]} {k}" for k in ("activations", "weights") if k in c)
    return (f"calibration  {c.get('method', '?')} on {c.get('images', '?')} image(s) of {c.get('folder', '?')}/"
            f" at {c.get('scales', '?')} ({c.get('inputs', '?')}); {what}")


def format_table(d: dict) -> str:
    meta = d["metadata"]
    lines = [
        f"model        {d['file']} ({d['size_bytes'] / 2**20:.1f} MiB)",
        f"config       VGG-{d['config']}" if d["config"] else "config       (no vgg-onnx metadata)",
        f"parameters   {d['parameters']:,} (conv and FC-as-conv weights and biases)" if d["parameters"] is not None
        else "parameters   unknown (no vgg-onnx metadata; the export extra counts them from the graph)",
        f"producer     {d['producer'] or '?'}",
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
        if meta.get("calibration"):
            lines.append(_calibration_line(meta["calibration"]))
    if "at_size" in d:
        a = d["at_size"]
        if a["flops"] is None:
            lines.append(f"at {a['height']}x{a['width']}   FLOPs unknown (no vgg-onnx metadata; the export extra "
                         "follows the graph)")
        else:
            lines.append(f"at {a['height']}x{a['width']}   {a['flops'] / 1e9:.2f} GFLOPs per image "
                         f"({a['flops'] / 2e9:.2f} G multiply-adds); "
                         f"score map {a['score_map'][0]} x {a['score_map'][1]}")
    return "\n".join(lines)
