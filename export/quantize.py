"""`quantize_model`: a float32 vgg-onnx model -> an int8 one, calibrated on real images and verified.

Static quantization with ONNX Runtime's own tooling (`quantize_static`, QDQ format, per-channel
int8 weights, 8-bit activations of the type ONNX Runtime recommends for this CPU). The
activation ranges come from real images passed through the project's preprocessing: at each of
the model's test scales the rescaled image (the dense input) and crops of the 5x5 grid (the
multi-crop input), so both input shapes the protocol feeds the network are seen.

Before anything is written, the int8 graph is checked against the float32 one on images held
out from calibration (dense evaluation at the model's test scales, through the runtime's own
ModelSession and protocol functions): top-1 agreement and the largest probability difference.
When the held-out images show the agreement below `min_agreement` (its one-sided 95 % upper
bound is below it), nothing is written unless `force`. Needs onnx and onnxruntime, not torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import random
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from vgg_onnx.atomic import atomic_path, atomic_write_text, check_writable
from vgg_onnx.configs import parse_config
from vgg_onnx.decoding import load_image
from vgg_onnx.errors import ImageError, UsageError, VggOnnxError
from vgg_onnx.metadata import INPUT_NAME, ModelInfo, sidecar_path
from vgg_onnx.scales import rescale

__all__ = ["CALIBRATION_METHODS", "DEFAULT_LIMIT", "DEFAULT_HELD_OUT", "QuantizeResult", "Verification",
           "activation_type", "agreement_upper_bound", "quantize_model", "split_images", "verify_int8"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_LIMIT = 8  # calibration images: VGG-D at three scales calibrates in a few minutes on 2 cores
# images the int8 model is verified on: with 16, one disagreement already ruled out 99 % (upper
# bound 98.6 %), and a good int8 VGG-A (1 image in 130 differs) was refused one time in nine; with
# 100, a model at 99.25 % is refused about one time in 25. VGG-D at three scales: about 7 min.
DEFAULT_HELD_OUT = 100
# of the 5x5 crop grid (row by row), the four corners and the centre: the crop-shaped inputs
CALIBRATION_CROPS = (0, 4, 12, 20, 24)
# the ops whose inputs and outputs become int8; normalisation, LRN, the spatial mean and the
# softmax stay float32, so `probs` keeps its precision
QUANTIZED_OPS = ["Conv", "Relu", "MaxPool"]

Log = Callable[[str], None]


@dataclass
class Verification:
    """int8 against float32 on held-out images, dense at the model's test scales."""

    images: int
    top1_agreement: float
    max_prob_diff: float
    scales: list[int]
    # the agreement the held-out images still allow, one-sided 95 % (Wilson score): what
    # --min-agreement is held against, so sampling noise on a good model is not a refusal
    agreement_upper_bound: float = 1.0


Z_95_ONE_SIDED = 1.6449


def agreement_upper_bound(agree: int, images: int, z: float = Z_95_ONE_SIDED) -> float:
    """Wilson score upper bound of a rate seen as agree / images (98 of 100: 0.993; 15 of 16: 0.986)."""
    p, z2 = agree / images, z * z
    centre = p + z2 / (2 * images)
    spread = z * np.sqrt(p * (1 - p) / images + z2 / (4 * images * images))
    return float(min(1.0, (centre + spread) / (1 + z2 / images)))


@dataclass
class QuantizeResult:
    """What `quantize_model` did: the files written, the metadata, the check, the unreadable images."""

    out: str
    sidecar: str
    info: ModelInfo
    verification: Verification
    written: bool
    skipped: list[str] = field(default_factory=list)  # "path: problem" of images that could not be used

    def to_json_dict(self) -> dict:
        return {"model": self.out, "sidecar": self.sidecar, "written": self.written,
                "precision": self.info.precision, "calibration": self.info.calibration,
                "verification": asdict(self.verification), "skipped": self.skipped}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def activation_type() -> tuple[str, bool]:
    """(activation type, reduce_range) as ONNX Runtime's quantize_static documentation recommends
    for CPU inference: uint8 activations on x86-64 (weights 7-bit where the CPU lacks VNNI, against
    saturation), int8 activations on ARM."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        flags = _cpu_flags()
        return "uint8", not ({"avx512_vnni", "avx_vnni"} & flags)
    return "int8", False


def split_images(paths: list[str], limit: int, held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(calibration images, held-out images): a seeded shuffle, the first `held_out` (at most half
    of the folder) kept for verification, the next `limit` for calibration."""
    shuffled = sorted(paths)
    random.Random(seed).shuffle(shuffled)
    kept = min(held_out, len(shuffled) // 2)
    return shuffled[kept:kept + limit], shuffled[:kept]


def calibration_inputs(paths: list[str], info: ModelInfo, skipped: list[str], bar) -> Iterator[dict]:
    """The network inputs calibration sees, one batch at a time: per image and test scale the
    rescaled image (dense) and corner and centre crops of the crop grid (multi-crop)."""
    from vgg_onnx.runtime.protocol import crop_views, dense_views

    for path in paths:
        try:
            image = load_image(path)
            batches = []
            for q in info.test_scales:
                scaled = rescale(image, q)
                batches.append(dense_views(scaled, flip=False))
                batches.append(crop_views(scaled, info.crop_size, flip=False)[list(CALIBRATION_CROPS)])
        except ImageError as e:
            skipped.append(str(e))
            bar.update(1)
            continue
        for batch in batches:
            yield {INPUT_NAME: batch.astype(np.float32)}
        bar.update(1)


def _reader(batches: Iterator[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    return Reader()


@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's quantizer logs advice (pre-processing, opset) through the root logger, and its
    histogram calibrators print() a line per batch to stdout, where `quantize` writes its JSON
    report: neither is for users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def calibrate(model: str, batches: Iterator[dict], method: str, work: str) -> str:
    """Activation ranges of `model` over `batches` by ONNX Runtime's calibrator, saved in its cache
    format in `work`; returns the cache's path. Each batch is collected on its own: the histogram
    methods cannot stack tensors of different shapes (dense inputs vary with the image)."""
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    with _quiet_quantizer():
        calibrator = create_calibrator(model, QUANTIZED_OPS, augmented_model_path=os.path.join(work, "augmented.onnx"),
                                       calibrate_method=_ort_method(method), providers=["CPUExecutionProvider"])
        collected = 0
        for batch in batches:
            calibrator.collect_data(_reader(iter([batch])))
            collected += 1
        if not collected:
            raise VggOnnxError("no calibration image could be read")
        cache = os.path.join(work, "ranges.json")
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def quantize_graph(model: str, out: str, ranges: str, method: str, info: ModelInfo,
                   int8_first_conv: bool = False) -> dict:
    """ONNX Runtime's quantize_static of `model` into `out` with the calibrated `ranges`; returns
    the settings used. Unless `int8_first_conv`, the first convolution stays float32: it reads the
    image's 3 channels (about 1 % of VGG-D's work; float32, it adds 4-11 % to the int8 time) and, quantized, cost
    the trained VGG-A a quarter of its disagreements with float32 (docs/benchmarks.md)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    activations, reduce_range = activation_type()
    # the compiler names each graph node after its layer spec (conv1_1 ...), so the table names it
    float_layers = [] if int8_first_conv else [parse_config(info.config).conv_layers()[0].name]
    with _quiet_quantizer():
        quantize_static(model, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                        per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=_ort_method(method),
                        calibration_cache_path=ranges, nodes_to_exclude=float_layers)
    return {"activations": activations, "weights": "int8 per-channel" + (" (7-bit range)" if reduce_range else ""),
            "format": "QDQ", "float32_layers": float_layers}


def _network(session):
    return lambda batch: session.run(batch)[0]


def verify_int8(fp32_model: str, int8_model: str, paths: list[str], skipped: list[str], bar,
                threads: int | None = None) -> Verification:
    """Dense evaluation at the float32 model's test scales of each held-out image by both models,
    through the runtime's ModelSession and protocol: top-1 agreement and largest probability gap."""
    from vgg_onnx.runtime.protocol import classify_image
    from vgg_onnx.runtime.session import ModelSession

    fp32 = ModelSession(fp32_model, "cpu", threads)
    int8 = ModelSession(int8_model, "cpu", threads)
    scales, crop = fp32.info.test_scales, fp32.info.crop_size
    agree, largest, count = 0, 0.0, 0
    for path in paths:
        try:
            image = load_image(path)
            reference = classify_image(_network(fp32), image, scales, crop, "dense")
            quantized = classify_image(_network(int8), image, scales, crop, "dense")
        except ImageError as e:
            skipped.append(str(e))
        else:
            count += 1
            agree += int(np.argmax(reference) == np.argmax(quantized))
            largest = max(largest, float(np.max(np.abs(reference - quantized))))
        bar.update(1)
    if not count:
        raise VggOnnxError("no held-out image could be read: nothing to verify the int8 model on")
    return Verification(count, agree / count, largest, list(scales), agreement_upper_bound(agree, count))


def _image_list(folder: str, what: str) -> list[str]:
    from vgg_onnx.runtime.imagefolder import _images_in

    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder ({what})")
    paths = _images_in(folder)
    if not paths:
        raise UsageError(f"{folder}: no images in it ({what})")
    return paths


def _fp32_info(model: str) -> ModelInfo:
    """The input model's metadata, checked by the runtime's own loader."""
    from vgg_onnx.runtime.session import ModelSession

    info = ModelSession(model, "cpu", 1).info
    if info.precision != "fp32":
        raise UsageError(f"{model}: its precision is {info.precision}; quantize needs a float32 model")
    return info


def _with_metadata(path: str, info: ModelInfo) -> bytes:
    """The quantized graph with the int8 model's metadata in place of what the quantizer kept."""
    import onnx

    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, info.to_metadata_props())
    return proto.SerializeToString()


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=what, leave=False, dynamic_ncols=True, mininterval=0.5,
                disable=None if total else True)


def _check_paths(model: str, out: str) -> None:
    if not os.path.isfile(model):
        raise UsageError(f"{model}: no such model file")
    if not out.endswith(".onnx"):
        raise UsageError(f"--out {out}: give a file name ending in .onnx (its JSON goes beside it)")
    inputs = {os.path.realpath(model), os.path.realpath(sidecar_path(model))}
    if {os.path.realpath(out), os.path.realpath(sidecar_path(out))} & inputs:
        raise UsageError(f"--out {out} would replace the input model or its JSON: choose another name")
    check_writable(out)
    check_writable(sidecar_path(out))


def quantize_model(model: str, calibration: str, out: str, method: str = "minmax", limit: int = DEFAULT_LIMIT,
                   held_out: int = DEFAULT_HELD_OUT, held_out_dir: str | None = None, seed: int = 0,
                   min_agreement: float = 0.99, force: bool = False, threads: int | None = None,
                   int8_first_conv: bool = False,
                   log: Log = lambda m: None) -> QuantizeResult:
    """Quantize `model` to int8 into `out` (and its JSON) after checking it against `model`; see
    `vgg-onnx quantize --help`. Raises VggOnnxError (nothing written) below `min_agreement`."""
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method {method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
    if limit < 1 or held_out < 1:
        raise UsageError("--limit and --held-out must be at least 1")
    from vgg_onnx.runtime.session import check_threads

    check_threads(threads)  # before minutes of calibration, not after
    _check_paths(model, out)
    info = _fp32_info(model)
    images = _image_list(calibration, "--calibration")
    if held_out_dir is None:
        if len(images) < 2:
            raise UsageError(f"{calibration}: one image cannot be both calibrated on and held out; "
                             "add images or give --held-out-dir")
        calibrate_on, verify_on = split_images(images, limit, held_out, seed)
    else:
        calibrate_on = split_images(images, limit, 0, seed)[0]
        verify_on = sorted(_image_list(held_out_dir, "--held-out-dir"))[:held_out]
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vgg-onnx-quantize-") as work:
        quantized = os.path.join(work, "int8.onnx")
        with _progress(len(calibrate_on), "calibrating") as bar:
            ranges = calibrate(model, calibration_inputs(calibrate_on, info, skipped, bar), method, work)
        settings = quantize_graph(model, quantized, ranges, method, info, int8_first_conv)
        used = len(calibrate_on) - len(skipped)
        calibration_info = {"method": method, "images": used, "folder": os.path.basename(os.path.abspath(calibration)),
                            "seed": seed, "scales": list(info.test_scales),
                            "inputs": f"dense and {len(CALIBRATION_CROPS)} grid crops per scale"} | settings
        int8_info = replace(info, precision="int8", calibration=calibration_info)
        data = _with_metadata(quantized, int8_info)
    return _verify_and_write(model, out, data, int8_info, verify_on, skipped, min_agreement, force, threads, log)


def _verify_and_write(model: str, out: str, data: bytes, info: ModelInfo, verify_on: list[str], skipped: list[str],
                      min_agreement: float, force: bool, threads: int | None, log: Log) -> QuantizeResult:
    sidecar = sidecar_path(out)
    with atomic_path(out) as tmp:  # verified where it will live; removed unless the check passes
        with open(tmp, "wb") as f:
            f.write(data)
        with _progress(len(verify_on), "verifying") as bar:
            check = verify_int8(model, tmp, verify_on, skipped, bar, threads)
        log(f"vgg-onnx: int8 vs fp32 on {check.images} held-out image(s), dense at {check.scales}: top-1 agreement "
            f"{check.top1_agreement:.1%} (95% upper bound {check.agreement_upper_bound:.1%}), largest probability "
            f"difference {check.max_prob_diff:.4f}")
        if check.agreement_upper_bound < min_agreement and not force:
            raise VggOnnxError(f"{out}: not written: int8 top-1 agreement {check.top1_agreement:.1%} with fp32 on "
                               f"{check.images} held-out image(s) is below --min-agreement {min_agreement:.1%} with 95% "
                               f"confidence (upper bound {check.agreement_upper_bound:.1%}; largest probability difference "
                               f"{check.max_prob_diff:.4f}); calibrate on more or other images, try another --method, "
                               "or --force")
    atomic_write_text(sidecar, json.dumps(info.to_json_dict(), indent=1) + "\n")
    return QuantizeResult(out, sidecar, info, check, True, skipped)
