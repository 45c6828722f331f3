"""Forged variants of an exported model's metadata document (the one metadata_props key)."""

from __future__ import annotations

import json
from pathlib import Path

from vgg_onnx.metadata import METADATA_KEY


def edited_model(model: Path, out: Path, *, raw: str | None = None, **changes) -> Path:
    """A copy of `model` whose metadata document has `changes` applied (a callable value maps the
    old value to the new one), or is replaced by the text `raw`."""
    import onnx

    proto = onnx.load(str(model))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    if raw is None:
        document = json.loads(entry.value)
        for key, value in changes.items():
            document[key] = value(document[key]) if callable(value) else value
        raw = json.dumps(document)
    entry.value = raw
    onnx.save(proto, str(out))
    return out


def legacy_layout_model(model: Path, out: Path) -> Path:
    """A copy of `model` with its metadata spread over one key a field, as format 1 stored it."""
    import onnx

    proto = onnx.load(str(model))
    document = json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA_KEY))
    document["vgg_onnx_format"] = "1"
    del proto.metadata_props[:]
    for key, value in document.items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(proto, str(out))
    return out
