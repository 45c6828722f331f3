"""One compiled model on ONNX Runtime: provider choice (no silent fallback), threads, metadata.

The model's ModelInfo (crop size, classes, scales) comes from its metadata_props, read through
ONNX Runtime itself, so the runtime needs neither onnx nor torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import stat
import sys

import numpy as np

from vgg_onnx.atomic import file_kind
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.metadata import INPUT_NAME, PROBS_NAME, SCORES_NAME, ModelInfo

__all__ = ["BACKENDS", "PROVIDERS", "ModelSession", "available_cpus", "check_interface", "check_metadata",
           "check_threads", "open_session", "resolve_provider"]

PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
ORT_NAMES = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "cpu": "CPUExecutionProvider"}
_announced = False  # `auto` says once per process which provider it picked


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install 'vgg-onnx[runtime]'") from None
    return onnxruntime


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_library_problem(provider: str) -> str | None:
    """Why ONNX Runtime's CUDA/TensorRT provider library cannot load here, or None if it can.

    Loading it ourselves gives the real reason (a missing libcublas...) in one line, where
    ONNX Runtime would only log it and carry on on the CPU.
    """
    ort = _ort()
    name = ORT_NAMES[provider]
    if name not in ort.get_available_providers():
        return f"this onnxruntime build has no {name} (install onnxruntime-gpu)"
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from nvidia-* wheels, where installed
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - best effort; the load below says what is missing
                pass
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    try:
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi, f"libonnxruntime_providers_{provider}.so"))
    except OSError as e:
        return str(e)
    return None


def _provider_list(provider: str):
    cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})  # every image brings new shapes
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if provider == "tensorrt":
        # dynamic shapes: TensorRT builds an engine per shape profile; CUDA takes what it rejects
        return [("TensorrtExecutionProvider", {"trt_engine_cache_enable": True}), cuda, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def resolve_provider(provider: str) -> tuple[str, str | None]:
    """(provider to try, why CUDA is out for `auto`). Explicit GPU providers whose libraries do
    not load are refused here, with the reason."""
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDERS)}")
    if provider in ("cuda", "tensorrt"):
        problem = gpu_library_problem(provider)
        if problem:
            raise VggOnnxError(f"provider {provider} cannot run: {problem}")
    if provider != "auto":
        return provider, None
    problem = gpu_library_problem("cuda")
    return ("cpu", problem) if problem else ("cuda", None)


def has_nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU at all (its device files or its driver's tool)."""
    import glob
    import shutil

    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def announce(provider: str, reason: str | None) -> None:
    """`auto` says once per process which provider it ended up with; why not CUDA only where an
    NVIDIA GPU exists (on a machine without one, the CPU is the expected choice, not a problem)."""
    global _announced
    if not _announced:
        why = f" (CUDA unavailable: {reason})" if reason and has_nvidia_gpu() else ""
        print(f"vgg-onnx: using the {provider.upper()} provider{why}", file=sys.stderr)
        _announced = True


def check_threads(threads: int | None) -> None:
    """More intra-op threads than CPUs only contend for them, and each costs ONNX Runtime a stack
    and its own buffers: thousands of them take minutes to start and gigabytes of memory."""
    if threads is None:
        return
    cpus = available_cpus()
    if not 1 <= threads <= cpus:
        raise UsageError(f"--threads {threads} must be between 1 and {cpus} (the CPUs this process may use): "
                         "more threads than CPUs only contend for them and cost memory")


def check_metadata(info: ModelInfo, output_width: int | None, source: str) -> None:
    """A model's metadata, checked once and fully at load, so no image fails later for it."""
    problems = []
    if output_width is not None and output_width != info.num_classes:
        problems.append(f"it lists {info.num_classes} classes but its outputs have {output_width}")
    if info.crop_size <= 0 or info.crop_size % 32:
        problems.append(f"its crop size {info.crop_size} is not a positive multiple of 32")
    scales = info.test_scales
    if not scales or any(not isinstance(q, int) or isinstance(q, bool) or q <= 0 for q in scales):
        problems.append(f"its test scales {scales} are not a non-empty list of positive integers")
    elif info.crop_size > 0 and min(scales) < info.crop_size:
        problems.append(f"its test scale {min(scales)} is smaller than its crop size {info.crop_size}")
    if problems:
        raise VggOnnxError(f"{source}: malformed vgg-onnx metadata: {'; '.join(problems)}")


def check_model_file(path: str) -> None:
    """Only a regular file is a model (docs/decoding.md): a FIFO would hang the loader, a device
    such as /dev/zero would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise VggOnnxError(f"{path}: no such model file") from None
    if not stat.S_ISREG(mode):
        raise VggOnnxError(f"{path}: cannot read: {file_kind(mode)}, not a regular file")


def check_interface(path: str, inputs: list[str], outputs: list[str]) -> None:
    """The graph's interface every vgg-onnx model has: input `image`, outputs `scores` and `probs`."""
    if inputs != [INPUT_NAME] or not {SCORES_NAME, PROBS_NAME} <= set(outputs):
        raise VggOnnxError(f"{path}: expected input '{INPUT_NAME}' and outputs '{SCORES_NAME}', "
                           f"'{PROBS_NAME}'; found {inputs} -> {outputs}")


class ModelSession:
    """An ONNX Runtime session on a vgg-onnx model; `run` maps an N x 3 x H x W batch to outputs.
    `run` may be called from several threads at once (ONNX Runtime sessions allow it)."""

    def __init__(self, path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        check_threads(threads)
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        check_model_file(self.path)
        self.provider, reason = resolve_provider(provider)
        try:
            self.session = self._create(self.provider, threads)
            if self.provider != "cpu" and self.session.get_providers()[0] != ORT_NAMES[self.provider]:
                raise VggOnnxError(f"provider {self.provider} cannot run {self.path}: ONNX Runtime could not "
                                   f"start it (it offered {', '.join(self.session.get_providers())})")
        except VggOnnxError as e:
            if provider != "auto" or self.provider == "cpu":
                raise
            # CUDA's libraries load but no device can be used: auto's documented choice is the CPU
            self.provider, reason = "cpu", f"its libraries load, but {e}"
            self.session = self._create("cpu", threads)
        if provider == "auto":
            announce(self.provider, reason)
        self._check_interface()

    def _create(self, provider: str, threads: int | None):
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's warnings about nodes placed on the CPU are noise here
        if provider == "cpu":
            self.threads = threads or available_cpus()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        else:
            self.threads = threads or 1
        try:
            return ort.InferenceSession(self.path, options, providers=_provider_list(provider))
        except Exception as e:  # noqa: BLE001 - ORT raises its own types for corrupt files
            message = " ".join(str(e).split())[:300]
            what = "not a loadable ONNX model" if provider == "cpu" else f"cannot start on {provider}"
            raise VggOnnxError(f"{self.path}: {what} ({message})") from None

    def _check_interface(self):
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = ModelInfo.from_metadata_props(props, source=self.path)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        check_interface(self.path, inputs, outputs)
        probs = next(o for o in self.session.get_outputs() if o.name == PROBS_NAME)
        width = probs.shape[1] if len(probs.shape) == 2 and isinstance(probs.shape[1], int) else None
        check_metadata(self.info, width, self.path)

    def run(self, batch: np.ndarray, outputs=(PROBS_NAME,)) -> list[np.ndarray]:
        """batch: float32 N x 3 x H x W, RGB 0..255. Returns the named outputs."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.provider == "cpu":
            return self.session.run(list(outputs), {INPUT_NAME: batch})
        # I/O binding: the input is copied to the device once and outputs come back without
        # ONNX Runtime's intermediate host copies
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, batch)
        for name in outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


BACKENDS = ("onnxruntime", "openvino")


def open_session(path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
                 backend: str = "onnxruntime"):
    """A ModelSession (ONNX Runtime, the default) or an OpenVinoSession (`backend="openvino"`:
    OpenVINO's CPU plugin, bf16 where the CPU has it); both have the same interface."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        return ModelSession(path, provider, threads)
    if provider not in ("auto", "cpu"):
        raise UsageError(f"--provider {provider} is ONNX Runtime's: the openvino backend runs on the CPU")
    from .openvino_backend import OpenVinoSession

    return OpenVinoSession(path, threads)
