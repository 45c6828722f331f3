"""The runtime as a Python library: load a compiled model, classify images by the paper's protocol.

    from vgg_onnx.runtime import load_model
    model = load_model("models/vgg_D.onnx")
    result = model.classify("samples/chelsea.png", method="dense")
    result.top_k(5)   # [Prediction(index, synset, name, prob), ...]

The same scheduler and protocol functions as `vgg-onnx infer` and `eval` do the work, so the
figures are theirs. No torch and no onnx package are needed: ONNX Runtime, OpenCV and numpy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from vgg_onnx.classes import ClassInfo
from vgg_onnx.decoding import DEFAULT_MAX_PIXELS
from vgg_onnx.errors import ImageError, VggOnnxError
from vgg_onnx.metadata import ModelInfo

from .evaluate import DEFAULT_BATCH_SIZE, Evaluator, ImageResult, check_same_classes, top_k
from .inputs import ImageInput
from .session import ModelSession, open_session

__all__ = ["load_model", "fuse", "Model", "Classification", "Prediction", "ImageError"]


class Prediction(NamedTuple):
    """One ranked class of a classification."""

    index: int
    synset: str  # WordNet id ("n02123045"), "" for classes without one
    name: str
    prob: float


@dataclass(frozen=True)
class Classification:
    """One image's result: the posterior under one method, fused over the model's networks.

    Fields: `source` (the path, or "<bytes #i>" / "<array #i>"), `method`, `scales` (every test
    scale used, ascending), `models` (the model files, in fusion order), `classes` (the class
    list), `posterior` (float64, one probability per class, summing to 1), `model_posteriors`
    (each network's own posterior before fusion), `seconds` (decoding, rescaling and this
    image's share of the network time), `error` and `score_maps`.

    `error` is set (and `posterior` is None) only for results of `Model.classify_many`, which
    goes on past bad images; `Model.classify` raises ImageError instead.
    """

    source: str
    method: str
    scales: tuple[int, ...]
    models: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    posterior: np.ndarray | None
    model_posteriors: tuple[np.ndarray, ...] = ()
    seconds: float = 0.0
    error: str | None = None
    score_maps: tuple[dict, ...] = field(default=(), repr=False)  # per network: scale -> classes x h x w

    @property
    def ok(self) -> bool:
        """Whether the image was classified (False: see `error`)."""
        return self.error is None

    def top_k(self, k: int = 5) -> list[Prediction]:
        """The k most probable classes, most probable first; ties go to the lower class index."""
        if self.posterior is None:
            raise ImageError(self.error or "no posterior")
        return [Prediction(self.classes[i].index, self.classes[i].synset, self.classes[i].name,
                           float(self.posterior[i])) for i in top_k(self.posterior, max(1, k))]

    def score_map(self, scale: int, model: int = 0) -> np.ndarray:
        """The class score map (classes x h x w, before softmax) of the unmirrored image at a
        test scale, from network `model` of a fused model. Needs `score_maps=True` and a dense
        method (dense or both) when classifying."""
        maps = self.score_maps[model] if model < len(self.score_maps) else {}
        if scale not in maps:
            raise KeyError(f"no score map at scale {scale} (have {sorted(maps) or 'none'}): classify with "
                           "score_maps=True and method 'dense' or 'both' at that scale")
        return maps[scale]


def to_classification(result: ImageResult, method: str, evaluator: Evaluator, models: tuple[str, ...],
                    index: int = 0) -> Classification:
    common = dict(source=result.path, method=method, scales=tuple(evaluator.scales), models=models,
                  classes=tuple(evaluator.classes), seconds=result.seconds)
    if result.error is not None:
        return Classification(posterior=None, error=result.error, **common)
    return Classification(posterior=result.posteriors[method],
                          model_posteriors=tuple(p[method] for p in result.model_posteriors),
                          score_maps=tuple(result.scale_maps), **common)


class Model:
    """One compiled network, or several fused (see `fuse`), ready to classify images.

    One Model may be used from several threads at once: each call builds its own small
    scheduler and ONNX Runtime sessions accept concurrent runs.
    """

    def __init__(self, sessions: Sequence[ModelSession], max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if not sessions:
            raise ValueError("a Model needs at least one network")
        check_same_classes(list(sessions))
        self.sessions = tuple(sessions)
        self.max_pixels = max_pixels
        self.batch_size = batch_size

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        """The class list (index, synset, name), the same for every fused network."""
        return tuple(self.sessions[0].info.classes)

    @property
    def info(self) -> ModelInfo:
        """The first network's metadata (configuration, crop size, test scales...)."""
        return self.sessions[0].info

    @property
    def paths(self) -> tuple[str, ...]:
        """The model files, in fusion order."""
        return tuple(s.path for s in self.sessions)

    def evaluator(self, methods: Sequence[str], scales: Sequence[int] | None = None, flip: bool = True,
                  batch_size: int | None = None, score_maps: bool = False) -> Evaluator:
        """The scheduler `classify` and `classify_many` use (also what `infer` and `eval` run)."""
        return Evaluator(list(self.sessions), tuple(methods), list(scales) if scales else None, flip=flip,
                         batch_size=batch_size or self.batch_size, max_pixels=self.max_pixels,
                         heatmap=score_maps)

    def classify(self, image: ImageInput, method: str = "dense", scales: Sequence[int] | None = None,
                 flip: bool = True, score_maps: bool = False) -> Classification:
        """Classify one image by the paper's test protocol.

        image: a file path, the bytes of an encoded image (JPEG, PNG, BMP, GIF, WebP, TIFF, PNM,
        e.g. read from a socket or a database), or an RGB uint8 numpy array H x W x 3. Arrays
        are taken as RGB (pass `bgr[..., ::-1]` for OpenCV's BGR); gray H x W is replicated and
        an alpha channel dropped, as the decoder does for files; uint16 is scaled to 8 bits;
        float arrays are refused (0..1 and 0..255 cannot be told apart). The pixel limit
        applies to all three kinds.
        method: "dense" (whole image and mirror), "multi-crop" (5x5 grid and mirrors) or "both".
        scales: test scales (shorter side); default each network's own, from its metadata.
        flip: include the mirror images. score_maps: keep the dense score maps (see
        `Classification.score_map`).
        Raises ImageError (one line naming the image and the problem) for an unusable image.
        """
        evaluator = self.evaluator((method,), scales, flip, score_maps=score_maps)
        result = evaluator.evaluate([evaluator.prepare(0, image)])[0]
        if result.error is not None:
            raise ImageError(result.error)
        return to_classification(result, method, evaluator, self.paths)

    def classify_many(self, images: Iterable[ImageInput], method: str = "dense",
                      scales: Sequence[int] | None = None, flip: bool = True, batch_size: int | None = None,
                      workers: int = 1, score_maps: bool = False) -> Iterator[Classification]:
        """Classify images in order, decoding ahead in `workers` threads and batching network
        inputs of one shape across images (`batch_size` rows per network run). A bad image
        yields a Classification with `error` set and the run goes on. Arguments as `classify`."""
        evaluator = self.evaluator((method,), scales, flip, batch_size, score_maps)
        for result in evaluator.run(images, workers=workers):
            yield to_classification(result, method, evaluator, self.paths)


def load_model(path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = DEFAULT_BATCH_SIZE,
               backend: str = "onnxruntime") -> Model:
    """Load a model exported by `vgg-onnx export`, its metadata checked once, fully.

    provider: "auto" (CUDA where its libraries load, else CPU), "cuda", "tensorrt" or "cpu";
    threads: CPU threads of ONNX Runtime (1 to the CPUs available; default all of them);
    max_pixels: refuse larger images (and rescaled images); batch_size: network inputs per run;
    backend: "onnxruntime" (the default) or "openvino" (OpenVINO's CPU plugin, bf16 where the CPU
    has it, else float32; the openvino extra). The protocol code is the same for both.
    Raises VggOnnxError (one line) for a missing, corrupt or foreign model file, UsageError when
    the backend's package is not installed.
    """
    return Model([open_session(path, provider, threads, backend)], max_pixels, batch_size)


def fuse(models: Sequence[Model]) -> Model:
    """Several models as one whose posterior is the mean of theirs (the paper's fusion). They
    must share a class list; each keeps its own test scales unless `scales` overrides them."""
    if not models:
        raise VggOnnxError("fuse needs at least one model")
    return Model([s for m in models for s in m.sessions], models[0].max_pixels, models[0].batch_size)
