"""One compiled model on OpenVINO's CPU plugin: the same .onnx files (float32 and int8 QDQ graphs),
in bf16 where the CPU computes it natively, else float32 (said on stderr).

`OpenVinoSession` has ModelSession's interface (path, name, info, provider, threads, run), so
the scheduler and the protocol functions run on it unchanged. The model's metadata comes from
the ONNX metadata_props OpenVINO keeps in the model's runtime info, checked as ModelSession
checks it. Needs the `openvino` extra; ONNX Runtime stays the default backend.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.metadata import INPUT_NAME, PROBS_NAME, ModelInfo

from .session import available_cpus, check_interface, check_metadata, check_threads

__all__ = ["OPENVINO_PRECISIONS", "OpenVinoSession", "cpu_has_bf16", "openvino_precision"]

OPENVINO_PRECISIONS = ("auto", "f32", "bf16")
_announced: set[str] = set()  # the precision chosen is said once per process


def _openvino():
    try:
        import openvino
    except ImportError:
        raise UsageError("the openvino backend needs the openvino extra: pip install '.[openvino]' "
                         "(openvino is not installed)") from None
    return openvino


def cpu_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (AVX-512 BF16 or AMX)."""
    core = core or _openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_precision(core, precision: str = "auto") -> str:
    """"bf16" or "f32": `auto` is bf16 where the CPU computes it natively (AVX-512 BF16, AMX),
    else f32, and says so on stderr once."""
    if precision not in OPENVINO_PRECISIONS:
        raise UsageError(f"unknown OpenVINO precision {precision!r}; valid: {', '.join(OPENVINO_PRECISIONS)}")
    has_bf16 = cpu_has_bf16(core)
    if precision == "bf16" and not has_bf16:
        raise UsageError("this CPU has no native bf16: use the openvino backend in f32")
    chosen = precision if precision != "auto" else ("bf16" if has_bf16 else "f32")
    if precision == "auto" and chosen not in _announced:
        why = "" if has_bf16 else " (this CPU has no native bf16)"
        print(f"vgg-onnx: OpenVINO on the CPU in {chosen}{why}", file=sys.stderr)
        _announced.add(chosen)
    return chosen


class OpenVinoSession:
    """An OpenVINO CPU model with ModelSession's interface; `run` may be called from several
    threads at once (each call has its own infer request)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "auto"):
        check_threads(threads)
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        if not os.path.isfile(self.path):
            raise VggOnnxError(f"{self.path}: no such model file")
        ov = _openvino()
        core = ov.Core()
        self.precision = openvino_precision(core, precision)
        self.provider = f"openvino-{self.precision}"
        self.threads = threads or available_cpus()
        try:
            # the ONNX frontend named: read_model would try every frontend, TensorFlow's logging to stderr
            frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
            model = frontend.convert(frontend.load(self.path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own types for corrupt files
            message = " ".join(str(e).split())[:300]
            raise VggOnnxError(f"{self.path}: not a loadable ONNX model ({message})") from None
        self.info = self._read_info(model)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.precision,
                                                          "INFERENCE_NUM_THREADS": self.threads})

    def _read_info(self, model) -> ModelInfo:
        # OpenVINO keeps an ONNX file's metadata_props in its runtime info, under "framework"
        framework = model.get_rt_info()["framework"] if model.has_rt_info("framework") else {}
        props = {key: value.astype(str) for key, value in framework.items()}
        info = ModelInfo.from_metadata_props(props, source=self.path)
        check_interface(self.path, [i.get_any_name() for i in model.inputs], [o.get_any_name() for o in model.outputs])
        probs = model.output(PROBS_NAME).get_partial_shape()
        width = probs[1].get_length() if len(probs) == 2 and probs[1].is_static else None
        check_metadata(info, width, self.path)
        return info

    def run(self, batch: np.ndarray, outputs=(PROBS_NAME,)) -> list[np.ndarray]:
        """batch: float32 N x 3 x H x W, RGB 0..255. Returns the named outputs (float32)."""
        request = self.compiled.create_infer_request()
        request.infer({INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return [np.array(request.get_tensor(name).data, dtype=np.float32) for name in outputs]
