"""`export_model`: weights (or a random init) -> a verified .onnx and its JSON sidecar.

Order of work: every cheap check first (options, output path), then the weights, then a plan
(`plan_export`: what to build, from which weights, with which normalisation and metadata), then
the net and its graph, written to a temporary file beside the output; that file is checked by onnx.checker,
imported by ONNX Runtime and verified against torch before it is renamed into place.
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
from vgg_onnx.configs import DEFAULT_CROP, IMAGENET_CLASSES, Config, check_crop, parse_config
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.export.compiler import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, DenseVGG, compile_model, reference_outputs, relative_error
from vgg_onnx.export.weights import build_model, checkpoint_json, import_weights, infer_dimensions, read_checkpoint_info
from vgg_onnx.metadata import INPUT_NAME, ModelInfo, sidecar_path
from vgg_onnx.normalization import normalization_preset
from vgg_onnx.params import INIT_METHODS
from vgg_onnx.scales import check_train_scales
from vgg_onnx.train.model import VGG, count_parameters, init_weights

__all__ = ["Check", "ExportPlan", "ExportRequest", "ExportResult", "WeightsFacts", "check_graph_size", "compare",
           "export_model", "parameter_count", "plan_export", "torch_references", "verification_sizes"]

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


def parameter_count(cfg, num_classes: int, width_mult: float, crop: int) -> int:
    """Weights and biases of a net, counted without allocating them."""
    with torch.device("meta"):
        return count_parameters(VGG(cfg, num_classes, width_mult, crop))


def check_graph_size(cfg, num_classes: int, width_mult: float, crop: int, fp16: bool) -> int:
    """Refuse, before allocating anything, a net whose weights cannot fit in one ONNX file: the file
    is one protobuf message, and protobuf refuses messages of 2 GiB or more (16 MiB are kept for
    the graph and metadata). Large --classes or --crop values reach it (fc8 and fc6 grow with them).
    Returns the parameter count."""
    params = parameter_count(cfg, num_classes, width_mult, crop)
    weight_bytes = params * (2 if fp16 else 4)
    if weight_bytes > MAX_GRAPH_BYTES:
        raise UsageError(f"VGG-{cfg.name} with {num_classes} classes, width {width_mult:g}, crop {crop} has "
                         f"{params:,} parameters ({weight_bytes / 2**30:.1f} GiB); one ONNX file holds at most "
                         f"{MAX_GRAPH_BYTES / 2**30:.2f} GiB of weights")
    return params


@dataclass(frozen=True)
class ExportRequest:
    """What the user asked for; None: decided from the weights, else the defaults."""
    out: str
    config: str | None = None
    weights: str | None = None
    weights_format: str = "auto"
    normalization: str | None = None
    num_classes: int | None = None
    width_mult: float | None = None
    crop: int | None = None
    train_scales: list[int] | None = None
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    init: str = "glorot"
    seed: int = 0


@dataclass(frozen=True)
class WeightsFacts:
    """What a weights file says of itself: its kind, identity, checkpoint JSON and the sizes its tensors imply."""
    kind: str  # torchvision | caffe | checkpoint | random
    source: str = ""
    sha256: str = ""
    checkpoint: ModelInfo | None = None
    found: dict = field(default_factory=dict)  # num_classes, width_mult, crop_size read from shapes


@dataclass(frozen=True)
class ExportPlan:
    """What an export builds: which net (cfg and info's sizes), from which weights, with which
    normalisation and metadata (info), written where, at which opset."""
    request: ExportRequest
    cfg: Config
    info: ModelInfo
    kind: str

    @property
    def fp16(self) -> bool:
        return self.info.precision == "fp16"


def _check_request(request: ExportRequest) -> None:
    """The option values that are wrong in themselves, found before any slow work."""
    if not MIN_OPSET <= request.opset <= MAX_OPSET:
        raise UsageError(f"opset {request.opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET}")
    if request.init not in INIT_METHODS:
        raise UsageError(f"unknown init {request.init!r}; valid: {', '.join(INIT_METHODS)}")
    if request.normalization is not None:
        normalization_preset(request.normalization)
    if request.width_mult is not None and not 0 < request.width_mult <= 1:
        raise UsageError(f"width multiplier {request.width_mult} must be in (0, 1]")
    if request.num_classes is not None and request.num_classes < 1:
        raise UsageError(f"--classes {request.num_classes} must be at least 1")
    if request.train_scales is not None:
        check_train_scales(request.train_scales)


def _resolve_config(config: str | None, weights: str | None, weights_format: str) -> Config:
    """The config to build: --config, or the one a checkpoint's JSON names (they must agree)."""
    checkpoint = None
    if weights is not None and (weights_format == "checkpoint"
                                or (weights_format == "auto" and checkpoint_json(weights))):
        checkpoint = read_checkpoint_info(weights)
        if config is not None and parse_config(config).name != parse_config(checkpoint.config).name:
            raise UsageError(f"{weights}: is a checkpoint of config {checkpoint.config}, not {parse_config(config).name}")
        config = checkpoint.config
    if config is None:
        raise UsageError("--config is required (unless --weights is one of our checkpoints, which names it)")
    return parse_config(config)


def _choose_normalization(asked: str | None, checkpoint: ModelInfo | None, kind: str):
    """The normalisation asked for, else the checkpoint's, else the one the kind of weights expects
    (Caffe's BGR mean, torchvision's mean/std, the paper's mean); `paper` keeps a checkpoint's own mean."""
    if asked is None:
        if checkpoint:
            return checkpoint.normalization
        return normalization_preset({"caffe": "caffe", "torchvision": "torchvision"}.get(kind, "paper"))
    if asked == "paper" and checkpoint and checkpoint.normalization.preset == "paper":
        return checkpoint.normalization  # the checkpoint's own training-set mean
    return normalization_preset(asked)


def _choose(asked, checkpoint_value, found, default):
    """A size: asked for, else the checkpoint's, else read from the weights, else the default."""
    return asked or checkpoint_value or found or default


def plan_export(request: ExportRequest, cfg: Config, facts: WeightsFacts) -> ExportPlan:
    """Decide everything the export builds from the request and what the weights say (pure but for
    a meta-device parameter count); raises UsageError for a net that cannot be written."""
    checkpoint = facts.checkpoint
    num_classes = _choose(request.num_classes, checkpoint and checkpoint.num_classes, facts.found.get("num_classes"),
                          IMAGENET_CLASSES)
    width_mult = _choose(request.width_mult, checkpoint and checkpoint.width_mult, facts.found.get("width_mult"), 1.0)
    crop = _choose(request.crop, checkpoint and checkpoint.crop_size, facts.found.get("crop_size"), DEFAULT_CROP)
    check_crop(crop)
    params = check_graph_size(cfg, num_classes, width_mult, crop, request.fp16)
    train_scales = request.train_scales or (list(checkpoint.train_scales) if checkpoint else [max(256, crop)])
    check_train_scales(train_scales, crop)
    classes = checkpoint.classes if checkpoint and checkpoint.num_classes == num_classes else default_classes(num_classes)
    info = ModelInfo(cfg.name, classes, _choose_normalization(request.normalization, checkpoint, facts.kind),
                     crop_size=crop, width_mult=width_mult, train_scales=list(train_scales), param_count=params,
                     weights_source=facts.source, weights_sha256=facts.sha256,
                     precision="fp16" if request.fp16 else "fp32")
    return ExportPlan(request, cfg, info, facts.kind)


def _log_plan(plan: ExportPlan, log) -> None:
    info, norm = plan.info, plan.info.normalization
    if plan.kind == "random":
        log(f"vgg-onnx export: no --weights given: RANDOM weights ({plan.request.init} initialisation, seed "
            f"{plan.request.seed}); the model's predictions are meaningless")
    else:
        log(f"vgg-onnx export: {plan.kind} weights for VGG-{plan.cfg.name}: {info.num_classes} classes, width "
            f"{info.width_mult:g}, crop {info.crop_size}, sha256 {info.weights_sha256[:12]}…")
    if plan.kind == "caffe" and norm.channel_order != "BGR":
        log(f"vgg-onnx export: warning: Caffe weights read BGR, but normalization {norm.preset!r} feeds RGB")
    std = f", std {', '.join(f'{s:g}' for s in norm.std_rgb)}" if any(s != 1 for s in norm.std_rgb) else ""
    log(f"vgg-onnx export: normalization {norm.preset} ({norm.channel_order}, mean "
        f"{', '.join(f'{m:g}' for m in norm.mean_rgb)}{std}); train scales {info.train_scales}, test scales "
        f"{info.test_scales}; {info.param_count:,} parameters")


def _read_weights(request: ExportRequest, cfg, log):
    """(what the weights file says, the imported weights); random weights when there is no file."""
    if request.weights is None:
        return WeightsFacts("random"), None
    log(f"vgg-onnx export: reading weights {request.weights}")
    imported = import_weights(request.weights, cfg, request.weights_format)
    facts = WeightsFacts(imported.format, imported.source, imported.sha256, imported.info,
                         infer_dimensions(imported.state_dict, cfg))
    return facts, imported


def _build_model(plan: ExportPlan, imported) -> VGG:
    """The torch net of the plan, holding the imported weights (consumed) or a seeded random init."""
    info = plan.info
    if imported is None:
        generator = torch.Generator().manual_seed(plan.request.seed)
        net = VGG(plan.cfg, info.num_classes, info.width_mult, info.crop_size)
        return init_weights(net, plan.request.init, generator).eval()
    return build_model(plan.request.weights, imported.state_dict, plan.cfg, info.num_classes, info.width_mult,
                       info.crop_size, imported.names)


def _writable(path: str, inputs: list[str | None]) -> None:
    check_writable(path, inputs)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{path}: cannot write there (the file exists and is read-only)")


def _check_outputs(request: ExportRequest) -> None:
    """Neither output may replace what the export reads: the weights, or a checkpoint's JSON."""
    weights = request.weights
    inputs = [weights, checkpoint_json(weights)] if weights is not None else []
    _writable(request.out, inputs)
    _writable(sidecar_path(request.out), inputs)


def export_model(out: str, config: str | None = None, weights: str | None = None, weights_format: str = "auto",
                 normalization: str | None = None, num_classes: int | None = None, width_mult: float | None = None,
                 crop: int | None = None, train_scales: list[int] | None = None, opset: int = DEFAULT_OPSET,
                 fp16: bool = False, init: str = "glorot", seed: int = 0, log=_stderr) -> ExportResult:
    """Compile a VGG net to `out` (.onnx) and its JSON sidecar, verified; see `vgg-onnx export --help`."""
    start = time.perf_counter()
    request = ExportRequest(os.fspath(out), config, weights, weights_format, normalization, num_classes,
                            width_mult, crop, train_scales, opset, fp16, init, seed)
    _check_request(request)  # the cheap checks before any slow work
    _check_outputs(request)
    cfg = _resolve_config(config, weights, weights_format)
    facts, imported = _read_weights(request, cfg, log)
    plan = plan_export(request, cfg, facts)
    _log_plan(plan, log)
    # handed over in a list, so that the only reference to the weights goes with it (see below)
    model = [_build_model(plan, imported)]
    del imported
    return _compile_and_write(plan, model, start, log)


def _compile_and_write(plan: ExportPlan, holder: list, start: float, log) -> ExportResult:
    """Compile the plan's net (`holder` holds it; emptied), run the torch references, then write
    and verify (see _write_verified)."""
    model = holder.pop()
    opset = plan.request.opset
    log(f"vgg-onnx export: compiling (opset {opset}, {'fp16 weights' if plan.fp16 else 'fp32'})")
    proto, dense = compile_model(model, plan.info, opset, check=False)
    ir_version = proto.ir_version
    log(f"vgg-onnx export: compiled [{time.perf_counter() - start:.1f} s]; running the torch references")
    references = torch_references(model, dense, plan.info)
    del model, dense  # the graph holds the weights now; keeping one copy in memory, not two
    out = plan.request.out
    result = ExportResult(out, sidecar_path(out), plan.info, bound=FP16_BOUND if plan.fp16 else FP32_BOUND)
    graph = [proto]  # handed over in a list so that the only reference goes with it (one copy in memory)
    del proto
    result.checks = _write_verified(result, graph, references, ir_version, opset, start, log)
    result.seconds = time.perf_counter() - start
    log(f"vgg-onnx export: verified (max relative error {result.max_error:.2e} <= {result.bound:.0e}); wrote {out} "
        f"({os.path.getsize(out) / 2**20:.1f} MiB) and {result.sidecar} in {result.seconds:.1f} s")
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
