"""`export_model`: weights (or a random init) -> a verified .onnx and its JSON sidecar.

Order of work: every cheap check first (options, output path), then the weights, then the
graph, written to a temporary file beside the output; that file is checked by onnx.checker,
loaded by ONNX Runtime and verified against torch before it is renamed into place.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from vgg_onnx.atomic import atomic_paths, check_writable
from vgg_onnx.classes import default_classes
from vgg_onnx.configs import DEFAULT_CROP, IMAGENET_CLASSES, check_crop, parse_config
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.export.compiler import MAX_OPSET, MIN_OPSET, DenseVGG, compile_model, reference_outputs, relative_error
from vgg_onnx.metadata import INPUT_NAME, ModelInfo, sidecar_path
from vgg_onnx.preprocessing import check_scales, normalization as preset_normalization
from vgg_onnx.train.model import VGG, count_parameters, init_weights

__all__ = ["Check", "ExportResult", "check_graph_size", "compare", "export_model", "torch_references",
           "verification_sizes", "verify"]

FP32_BOUND = 1e-4  # maximum relative error against torch: fp32 rounding differences stay far below it
FP16_BOUND = 1e-2  # fp16 weights carry ~3 significant digits; measured errors are ~1e-3
VERIFY_SEED = 20150410
MAX_GRAPH_BYTES = 2**31 - 2**24  # protobuf's 2 GiB message limit, less room for the graph itself


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Check:
    size: tuple[int, int]
    batch: int
    reference: str  # "FC form" or "conv form"
    scores_error: float
    probs_error: float


@dataclass
class ExportResult:
    path: str
    sidecar: str
    info: ModelInfo
    checks: list[Check] = field(default_factory=list)
    bound: float = FP32_BOUND
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        return max((max(c.scores_error, c.probs_error) for c in self.checks), default=0.0)


def verification_sizes(crop: int) -> list[tuple[int, int]]:
    """The crop (against the FC form) and two larger, non-square sizes that are not multiples of 32
    (against the conv form), so pooling's rounding down is exercised too."""
    return [(crop, crop), (crop + 35, crop + 67), (crop + 66, crop + 13)]


def torch_references(model: VGG, dense: DenseVGG, info: ModelInfo) -> list[tuple]:
    """(size, reference kind, random 0..255 images, scores, probs) from torch at each verification size:
    the FC form (normalised outside the net) at the crop size, the conv form at the larger sizes."""
    generator = torch.Generator().manual_seed(VERIFY_SEED)
    references = []
    for height, width in verification_sizes(info.crop_size):
        image = torch.rand(3, 3, height, width, generator=generator) * 255
        with torch.no_grad():
            if (height, width) == (info.crop_size, info.crop_size):
                logits = reference_outputs(model, info.normalization, image)
                references.append(((height, width), "FC form", image.numpy(), logits.numpy(),
                                    torch.softmax(logits, 1).numpy()))
            else:
                scores, probs = dense(image)
                references.append(((height, width), "conv form", image.numpy(), scores.numpy(), probs.numpy()))
    return references


def compare(session, references: list[tuple], bound: float, log=_stderr) -> list[Check]:
    """ONNX Runtime on the same images, batch 3 and batch 1, against the torch references."""
    checks = []
    for (height, width), reference, image, ref_scores, ref_probs in references:
        for batch in (3, 1):
            scores, probs = session.run(None, {INPUT_NAME: image[:batch]})
            if reference == "FC form":
                scores = scores[:, :, 0, 0]
            checks.append(Check((height, width), batch, reference,
                                relative_error(scores, ref_scores[:batch]), relative_error(probs, ref_probs[:batch])))
            log(f"  verify {height}x{width} batch {batch} vs torch {reference}: max relative error "
                f"scores {checks[-1].scores_error:.2e}, probs {checks[-1].probs_error:.2e} (bound {bound:.0e})")
    return checks


def verify(session, model: VGG, dense: DenseVGG, info: ModelInfo, bound: float, log=_stderr) -> list[Check]:
    return compare(session, torch_references(model, dense, info), bound, log)


def check_graph_size(cfg, num_classes: int, width_mult: float, crop: int, fp16: bool) -> None:
    """Refuse, before allocating anything, a net whose weights cannot fit in one ONNX file: the file
    is one protobuf message, and protobuf refuses messages of 2 GiB or more (16 MiB are kept for
    the graph and metadata). Large --classes or --crop values reach it (fc8 and fc6 grow with them)."""
    with torch.device("meta"):
        params = count_parameters(VGG(cfg, num_classes, width_mult, crop))
    weight_bytes = params * (2 if fp16 else 4)
    if weight_bytes > MAX_GRAPH_BYTES:
        raise UsageError(f"VGG-{cfg.name} with {num_classes} classes, width {width_mult:g}, crop {crop} has "
                         f"{params:,} parameters ({weight_bytes / 2**30:.1f} GiB); one ONNX file holds at most "
                         f"{MAX_GRAPH_BYTES / 2**30:.2f} GiB of weights")


def _check_options(opset: int, crop: int | None, init: str, normalization: str | None, width_mult: float | None,
                   num_classes: int | None, train_scales: list[int] | None) -> None:
    """The option values that are wrong in themselves, found before any slow work."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET}")
    if crop is not None:
        check_crop(crop)
    if init not in ("gaussian", "glorot"):
        raise UsageError(f"unknown init {init!r}; valid: gaussian, glorot")
    if normalization is not None:
        preset_normalization(normalization)
    if width_mult is not None and not 0 < width_mult <= 1:
        raise UsageError(f"width multiplier {width_mult} must be in (0, 1]")
    if num_classes is not None and num_classes < 1:
        raise UsageError(f"--classes {num_classes} must be at least 1")
    if train_scales is not None and (len(train_scales) not in (1, 2)
                                     or (len(train_scales) == 2 and train_scales[0] >= train_scales[1])):
        raise UsageError(f"--train-scale {','.join(map(str, train_scales))}: give S or Smin,Smax with Smin < Smax")


def _resolve_config(config: str | None, weights: str | None, weights_format: str):
    """The config to build: --config, or the one a checkpoint's JSON names (they must agree)."""
    from vgg_onnx.train import weights as weights_io

    checkpoint = None
    if weights is not None and (weights_format == "checkpoint"
                                or (weights_format == "auto" and weights_io.checkpoint_json(weights))):
        checkpoint = weights_io.read_checkpoint_info(weights)
        if config is not None and parse_config(config).name != parse_config(checkpoint.config).name:
            raise UsageError(f"{weights}: is a checkpoint of config {checkpoint.config}, not {parse_config(config).name}")
        config = checkpoint.config
    if config is None:
        raise UsageError("--config is required (unless --weights is one of our checkpoints, which names it)")
    return parse_config(config)


def _describe(cfg, model: VGG, kind: str, ckpt: ModelInfo | None, normalization: str | None, num_classes: int,
              width_mult: float, crop: int, train_scales: list[int] | None, log=_stderr) -> ModelInfo:
    """The model's metadata: the normalisation and scales asked for, else the checkpoint's, else the
    defaults for the kind of weights (Caffe's BGR mean, torchvision's mean/std, the paper's mean)."""
    if normalization is None:
        norm = ckpt.normalization if ckpt else preset_normalization({"caffe": "caffe", "torchvision": "torchvision"}
                                                                    .get(kind, "paper"))
    elif normalization == "paper" and ckpt and ckpt.normalization.preset == "paper":
        norm = ckpt.normalization  # the checkpoint's own training-set mean
    else:
        norm = preset_normalization(normalization)
    if kind == "caffe" and norm.channel_order != "BGR":
        log(f"vgg-onnx export: warning: Caffe weights read BGR, but normalization {norm.preset!r} feeds RGB")
    if train_scales is None:
        train_scales = list(ckpt.train_scales) if ckpt else [max(256, crop)]
    check_scales(train_scales, crop)
    classes = ckpt.classes if ckpt and ckpt.num_classes == num_classes else default_classes(num_classes)
    info = ModelInfo(cfg.name, classes, norm, crop_size=crop, width_mult=width_mult, train_scales=list(train_scales),
                     param_count=count_parameters(model))
    log(f"vgg-onnx export: normalization {norm.preset} ({norm.channel_order}, mean {', '.join(f'{m:g}' for m in norm.mean_rgb)}"
        f"{', std ' + ', '.join(f'{s:g}' for s in norm.std_rgb) if any(s != 1 for s in norm.std_rgb) else ''}); "
        f"train scales {train_scales}, test scales {info.test_scales}; {info.param_count:,} parameters")
    return info


def _model_from_weights(weights: str, weights_format: str, cfg, num_classes: int | None, width_mult: float | None,
                        crop: int | None, fp16: bool, log=_stderr) -> tuple:
    """(model, checkpoint info or None, (source, sha256, kind), (classes, width, crop)) from a weights
    file; the sizes not given are the checkpoint's, else read from the weights, else the defaults."""
    from vgg_onnx.train import weights as weights_io

    log(f"vgg-onnx export: reading weights {weights}")
    loaded = weights_io.load_weights(weights, cfg, weights_format)
    found = weights_io.infer_dimensions(loaded.state_dict, cfg)
    ckpt = loaded.info
    num_classes = num_classes or (ckpt.num_classes if ckpt else None) or found.get("num_classes", IMAGENET_CLASSES)
    width_mult = width_mult or (ckpt.width_mult if ckpt else None) or found.get("width_mult", 1.0)
    crop = crop or (ckpt.crop_size if ckpt else None) or found.get("crop_size", DEFAULT_CROP)
    check_crop(crop)
    check_graph_size(cfg, num_classes, width_mult, crop, fp16)
    model = weights_io.build_model(weights, loaded.state_dict, cfg, num_classes, width_mult, crop, loaded.names)
    source, sha256, kind = loaded.source, loaded.sha256, loaded.format
    del loaded
    log(f"vgg-onnx export: {kind} weights for VGG-{cfg.name}: {num_classes} classes, width {width_mult:g}, "
        f"crop {crop}, sha256 {sha256[:12]}…")
    return model, ckpt, (source, sha256, kind), (num_classes, width_mult, crop)


def _writable(path: str, inputs: list[str | None]) -> None:
    check_writable(path, inputs)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{path}: cannot write there (the file exists and is read-only)")


def export_model(out: str, config: str | None = None, weights: str | None = None, weights_format: str = "auto",
                 normalization: str | None = None, num_classes: int | None = None, width_mult: float | None = None,
                 crop: int | None = None, train_scales: list[int] | None = None, opset: int = 17,
                 fp16: bool = False, init: str = "glorot", seed: int = 0,
                 log=_stderr) -> ExportResult:
    """Compile a VGG net to `out` (.onnx) and its JSON sidecar, verified; see `vgg-onnx export --help`."""
    start = time.perf_counter()
    out = os.fspath(out)
    _check_options(opset, crop, init, normalization, width_mult, num_classes, train_scales)  # before slow work
    sidecar = sidecar_path(out)

    from vgg_onnx.train import weights as weights_io

    # neither output may replace what the export reads: the weights, or a checkpoint's JSON
    inputs = [weights, weights_io.checkpoint_json(weights)] if weights is not None else []
    _writable(out, inputs)
    _writable(sidecar, inputs)

    cfg = _resolve_config(config, weights, weights_format)

    # --- the model
    if weights is not None:
        model, ckpt, (source, sha256, kind), (num_classes, width_mult, crop) = _model_from_weights(
            weights, weights_format, cfg, num_classes, width_mult, crop, fp16, log)
    else:
        num_classes, width_mult, crop = num_classes or IMAGENET_CLASSES, width_mult or 1.0, crop or DEFAULT_CROP
        log(f"vgg-onnx export: no --weights given: RANDOM weights ({init} initialisation, seed {seed}); "
            "the model's predictions are meaningless")
        check_graph_size(cfg, num_classes, width_mult, crop, fp16)  # before allocating the weights
        generator = torch.Generator().manual_seed(seed)
        model = init_weights(VGG(cfg, num_classes, width_mult, crop), init, generator).eval()
        source, sha256, kind, ckpt = "", "", "random", None

    # --- its description
    info = _describe(cfg, model, kind, ckpt, normalization, num_classes, width_mult, crop, train_scales, log)
    info.weights_source, info.weights_sha256 = source, sha256

    # --- compile, write, check, verify, rename
    info.precision = "fp16" if fp16 else "fp32"
    log(f"vgg-onnx export: compiling (opset {opset}, {'fp16 weights' if fp16 else 'fp32'})")
    proto, dense = compile_model(model, info, opset, check=False)
    ir_version = proto.ir_version
    log(f"vgg-onnx export: compiled [{time.perf_counter() - start:.1f} s]; running the torch references")
    references = torch_references(model, dense, info)
    del model, dense  # the graph holds the weights now; keeping one copy in memory, not two
    bound = FP16_BOUND if fp16 else FP32_BOUND
    result = ExportResult(out, sidecar, info, bound=bound)
    graph = [proto]  # handed over in a list so that the only reference goes with it (one copy in memory)
    del proto
    result.checks = _write_verified(result, graph, references, ir_version, opset, start, log)
    result.seconds = time.perf_counter() - start
    log(f"vgg-onnx export: verified (max relative error {result.max_error:.2e} <= {bound:.0e}); wrote {out} "
        f"({os.path.getsize(out) / 2**20:.1f} MiB) and {sidecar} in {result.seconds:.1f} s")
    return result


def _write_verified(result: ExportResult, graph: list, references: list[tuple], ir_version: int, opset: int,
                    start: float, log=_stderr) -> list[Check]:
    """Write the model and its sidecar to temporary files, check and verify the model, then rename
    both: the pair appears whole or not at all (a failure while writing either changes neither).
    `graph` holds the ModelProto; it is emptied once serialised."""
    import onnx
    import onnxruntime as ort

    out, bound = result.path, result.bound
    with atomic_paths([out, result.sidecar]) as (tmp, tmp_sidecar):
        with open(tmp, "wb") as f:
            f.write(graph.pop().SerializeToString())  # from here on the file is the model
        try:
            onnx.checker.check_model(tmp)
        except onnx.checker.ValidationError as e:
            raise VggOnnxError(f"{out}: the compiled graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        try:
            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise VggOnnxError(f"{out}: onnxruntime {ort.__version__} cannot load the compiled graph "
                               f"(IR {ir_version}, opset {opset}): {str(e).splitlines()[0]}") from None
        log(f"vgg-onnx export: onnx.checker passed; onnxruntime {ort.__version__} loads it (IR {ir_version}, "
            f"opset {opset}) [{time.perf_counter() - start:.1f} s]; comparing with torch")
        checks = compare(session, references, bound, log)
        del session
        worst = max((max(c.scores_error, c.probs_error) for c in checks), default=0.0)
        if not worst <= bound:  # also fails on NaN
            raise VggOnnxError(f"{out}: verification failed: max relative error {worst:.2e} exceeds "
                               f"{bound:.0e} (figures above); nothing written")
        with open(tmp_sidecar, "w", encoding="utf-8") as f:
            f.write(json.dumps(result.info.to_json_dict(), indent=1) + "\n")
    return checks
