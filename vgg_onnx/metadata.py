"""What a compiled model (or one of our checkpoints) says about itself.

One description, `ModelInfo`, as one versioned JSON document: export writes it into the ONNX
graph's `metadata_props` under the one key `vgg_onnx`, and the same document into a JSON file
beside the model for hosts that cannot read metadata_props; every host (this module, the C++
host, runtime/js/vgg-core.js) parses it once, as JSON, and checks its `vgg_onnx_format`. Our
training checkpoints carry the same document, plus their training state, in their JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import __version__
from .classes import ClassInfo, classes_from_dicts
from .errors import VggOnnxError
from .normalization import Normalization
from .preprocessing import CONVENTIONS
from .scales import default_test_scales

__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "INPUT_NAME", "METADATA_KEY", "ModelInfo", "PROBS_NAME", "SCORES_NAME",
           "sidecar_path"]

METADATA_KEY = "vgg_onnx"  # the one metadata_props key: its value is the whole document, as JSON
FORMAT_KEY = "vgg_onnx_format"  # the document's version field
FORMAT_VERSION = 2
# Version 1 (before the one-document layout) had the same fields, with the version as the string
# "1"; its .onnx files spread them over one metadata_props key each. Its JSON documents
# (checkpoints, sidecars) still read as they are; its .onnx files are refused with what to do.
LEGACY_FORMAT_VERSION = "1"

# the graph's interface, fixed for every export
INPUT_NAME = "image"
SCORES_NAME = "scores"  # N x classes x h x w: the class score map
PROBS_NAME = "probs"  # N x classes: softmax of the score map's spatial mean


@dataclass
class ModelInfo:
    config: str
    classes: tuple[ClassInfo, ...]
    normalization: Normalization
    crop_size: int = 224
    width_mult: float = 1.0
    train_scales: list[int] = field(default_factory=lambda: [256])  # [S] fixed, [Smin, Smax] jittered
    test_scales: list[int] | None = None  # None: the paper's default for train_scales
    param_count: int = 0
    weights_source: str = ""  # file name the weights came from ("" for random initialisation)
    weights_sha256: str = ""
    precision: str = "fp32"  # "fp32", "fp16" or "int8"
    # for int8 models, where the quantization ranges came from: method, image count, folder name...
    calibration: dict | None = None
    version: str = __version__

    def __post_init__(self):
        if self.test_scales is None:
            self.test_scales = default_test_scales(self.train_scales, self.crop_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json_dict(self) -> dict:
        return {
            FORMAT_KEY: FORMAT_VERSION,
            "config": self.config,
            "num_classes": self.num_classes,
            "classes": [c.to_dict() for c in self.classes],
            "normalization": self.normalization.to_dict(),
            "crop_size": self.crop_size,
            "width_mult": self.width_mult,
            "train_scales": list(self.train_scales),
            "test_scales": list(self.test_scales),
            "param_count": self.param_count,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "vgg_onnx_version": self.version,
            "input": INPUT_NAME,
            "outputs": [SCORES_NAME, PROBS_NAME],
            "preprocessing": CONVENTIONS,
        } | ({"calibration": dict(self.calibration)} if self.calibration is not None else {})

    def to_metadata_props(self) -> dict[str, str]:
        """ONNX metadata_props: the one key METADATA_KEY, whose value is the document as JSON."""
        return {METADATA_KEY: json.dumps(self.to_json_dict(), separators=(",", ":"))}

    @classmethod
    def from_json_dict(cls, d: dict, source: str = "model") -> "ModelInfo":
        """The document (a sidecar's, a checkpoint's, or the one in metadata_props), checked whole."""
        version = d.get(FORMAT_KEY) if isinstance(d, dict) else None
        if version == LEGACY_FORMAT_VERSION:
            pass  # the same fields (see LEGACY_FORMAT_VERSION)
        elif version is None:
            raise VggOnnxError(f"{source}: no vgg-onnx metadata (not exported by vgg-onnx export)")
        elif type(version) is not int or version != FORMAT_VERSION:  # 2.0, true, "2": not a version we write
            raise VggOnnxError(f"{source}: vgg-onnx metadata format {json.dumps(version)[:20]}, this version "
                               f"reads format {FORMAT_VERSION}")
        try:
            return cls(
                config=d["config"],
                classes=classes_from_dicts(d["classes"]),
                normalization=Normalization.from_dict(d["normalization"]),
                crop_size=int(d["crop_size"]),
                width_mult=float(d.get("width_mult", 1.0)),
                train_scales=[int(s) for s in d["train_scales"]],
                test_scales=[int(s) for s in d["test_scales"]],
                param_count=int(d.get("param_count", 0)),
                weights_source=d.get("weights_source", ""),
                weights_sha256=d.get("weights_sha256", ""),
                precision=d.get("precision", "fp32"),
                calibration=_calibration(d.get("calibration")),
                version=d.get("vgg_onnx_version", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise VggOnnxError(f"{source}: malformed vgg-onnx metadata ({type(e).__name__}: {e})") from None

    @classmethod
    def from_metadata_props(cls, props: dict[str, str], source: str = "model") -> "ModelInfo":
        """The document under METADATA_KEY in an ONNX file's metadata_props, parsed once."""
        if METADATA_KEY not in props:
            if FORMAT_KEY in props:  # version 1's layout: one key per field
                raise VggOnnxError(f"{source}: metadata format 1 (an older vgg-onnx, one key a field): export it again "
                                   f"with this version (vgg-onnx export)")
            raise VggOnnxError(f"{source}: no vgg-onnx metadata (not exported by vgg-onnx export)")
        try:
            document = json.loads(props[METADATA_KEY])
        except (json.JSONDecodeError, TypeError, RecursionError):  # RecursionError: forged, deeply nested
            raise VggOnnxError(f"{source}: malformed vgg-onnx metadata (the {METADATA_KEY!r} value is not "
                               f"JSON)") from None
        if not isinstance(document, dict):
            raise VggOnnxError(f"{source}: malformed vgg-onnx metadata (the {METADATA_KEY!r} value is not a "
                               f"JSON object)")
        return cls.from_json_dict(document, source)


def _calibration(value) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"calibration is {type(value).__name__}, not an object")
    return value


def sidecar_path(onnx_path: str) -> str:
    """The JSON copy of the metadata beside a model: vgg_D.onnx -> vgg_D.json."""
    return onnx_path[:-5] + ".json" if onnx_path.endswith(".onnx") else onnx_path + ".json"
