"""docs/api.md, written from the API's own signatures and docstrings (the docstrings are the
source; a test checks the file is current). Regenerate: python -m vgg_onnx.runtime.apidoc > docs/api.md
"""

from __future__ import annotations

import inspect
import sys

from . import api, protocol

__all__ = ["render"]

INTRO = """# Python API and output reference

`vgg_onnx.runtime` is the runtime as a library: no torch and no onnx package, only ONNX
Runtime, OpenCV and numpy. `Model.classify` runs the same scheduler and the same protocol
functions as `vgg-onnx infer` and `eval`, so it gives the same figures. The README's
"Python API" section has a runnable example.

This file is generated from the code's docstrings: `python -m vgg_onnx.runtime.apidoc > docs/api.md`.
"""

RECORDS = """## `vgg-onnx infer` records

One record per image, in input order (`--format json`: one array; `jsonl`: one record per
line; `table`: the same fields for people; `csv`: one row per ranked class, columns `path,
rank, index, synset, name, prob, method, scales, models, seconds, error`). A classified image:

| field | type | meaning |
|---|---|---|
| `path` | string | the image's path as found (a name that is not valid UTF-8 shows U+FFFD) |
| `top_k` | list | the `--top-k` most probable classes, most probable first; ties go to the lower index |
| `top_k[].index` | int | the class's index in the model's class list (its output position) |
| `top_k[].synset` | string | the class's WordNet id (`n02123045`), or `""` when it has none |
| `top_k[].name` | string | the class's name |
| `top_k[].prob` | float | the posterior probability under `method`, fused over the models (0..1) |
| `method` | string | `dense`, `multi-crop` or `both` |
| `scales` | list of int | every test scale used (shorter side, pixels), ascending, over all models |
| `models` | list of string | the model files as given, in fusion order |
| `seconds` | float | this image's own processing time: decoding and rescaling (in a worker thread) plus its share of the network batches it was in (a batch's time divided equally among its rows); time spent waiting in the queue is not counted, so with batching the sum over images is about the run's network time, not its wall time; rounded to 0.1 ms |
| `heatmap` | string | only with `--heatmap DIR`: the PNG written for this image |

An image that failed: `{"path": ..., "error": ...}`, the error one line naming the file and
the problem (it failed to decode, exceeds the pixel limit, its heatmap could not be written...).
Exit status: 0 when every image succeeded, 1 when any failed, 2 for a usage error.

## `vgg-onnx eval --format json` report

| field | meaning |
|---|---|
| `data`, `models`, `methods`, `scales`, `flip` | what was evaluated, and how |
| `images` | images classified (the error rates' denominator) |
| `failed`, `errors` | images that could not be classified, and each one's error line |
| `seconds`, `images_per_second` | the run's wall time and its classified images per second |
| `rows` | one per model when several are fused, then the fusion (or the one model): `{"model", METHOD: {"top1_error", "top5_error", "images"}}`, errors in percent |
| `partial`, `planned` | `partial` is true when Ctrl-C stopped the run: the figures cover the images done of the `planned` ones |
"""


def signature(obj, name: str) -> str:
    """name(param: annotation = default, ...) -> return, annotations as written in the source."""
    sig = inspect.signature(obj)
    params = []
    for param in sig.parameters.values():
        if param.name == "self":
            continue
        annotation = getattr(param.annotation, "__forward_arg__", param.annotation)  # NamedTuple fields
        text = param.name if annotation is param.empty else f"{param.name}: {annotation}"
        params.append(text if param.default is param.empty else f"{text} = {param.default!r}")
    returns = "" if sig.return_annotation in (sig.empty, "None") else f" -> {sig.return_annotation}"
    return f"{name}({', '.join(params)}){returns}"


def entry(obj, name: str, level: str = "###") -> str:
    doc = inspect.getdoc(obj) or ""
    if isinstance(obj, property):
        return f"{level} `{name}` (property)\n\n{doc}\n"
    if inspect.isclass(obj) and issubclass(obj, Exception):
        return f"{level} `{name}` (exception)\n\n{doc}\n"
    head = signature(obj, name) if callable(obj) else name
    return f"{level} `{head}`\n\n{doc}\n"


def class_entries(cls, members: list[str]) -> list[str]:
    parts = [entry(cls, cls.__name__)]
    for member in members:
        parts.append(entry(inspect.getattr_static(cls, member), f"{cls.__name__}.{member}", "####"))
    return parts


def render() -> str:
    """The whole of docs/api.md."""
    parts = [INTRO, "## `vgg_onnx.runtime`\n", entry(api.load_model, "load_model"), entry(api.fuse, "fuse")]
    parts += class_entries(api.Model, ["classify", "classify_many", "evaluator", "classes", "info", "paths"])
    parts += class_entries(api.Classification, ["ok", "top_k", "score_map"])
    parts += [entry(api.Prediction, "Prediction"), entry(api.ImageError, "ImageError")]
    parts += ["## `vgg_onnx.runtime.protocol`: the test protocol as functions\n",
              inspect.getdoc(protocol).split("\n\n", 1)[1] + "\n"]
    parts += [entry(getattr(protocol, name), name) for name in protocol.__all__
              if inspect.isfunction(getattr(protocol, name))]
    parts.append(RECORDS)
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
