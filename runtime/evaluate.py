"""The scheduler that runs the paper's test protocol (protocol.py) over many images and models.

The arithmetic is protocol.py's; this module only decides what runs when, for throughput:
- a thread pool decodes and rescales images ahead of the network (OpenCV releases the GIL);
- inputs of one shape from several images (images, mirrors, crops) share a network batch;
- each model's rows come back per (image, view), and protocol.py's functions turn them into
  dense, multi-crop and combined posteriors per model, then fuse the models.
A batch the runtime cannot run (out of memory on a huge image...) fails its images only.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from vgg_onnx.decoding import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from vgg_onnx.errors import ImageError, UsageError
from vgg_onnx.metadata import PROBS_NAME, SCORES_NAME
from vgg_onnx.scales import check_scales, rescale

from .flops import dense_flops
from .inputs import ImageInput, source_label, to_rgb
from .prefetch import prefetch
from .protocol import (METHODS, combine_dense_multi_crop, crop_views, dense_views, fuse_posteriors,
                       multi_scale_posterior, view_posterior)
from .session import ModelSession

DEFAULT_BATCH_SIZE = 4
ViewKey = tuple  # ("dense", q) or ("crops", q, crop): one set of network inputs of an image


def check_methods(methods) -> tuple[str, ...]:
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"unknown method {bad[0] if bad else ''!r}; valid: {', '.join(METHODS)}")
    return tuple(dict.fromkeys(methods))


def check_same_classes(sessions: list[ModelSession]) -> None:
    """Fusion averages posteriors class by class: every model must have the same class list."""
    first = sessions[0]
    for other in sessions[1:]:
        a = [(c.synset, c.name) for c in first.info.classes]
        b = [(c.synset, c.name) for c in other.info.classes]
        if a == b:
            continue
        if len(a) != len(b):
            raise UsageError(f"cannot fuse {first.path} ({len(a)} classes) with {other.path} ({len(b)} classes): "
                             "fused models need the same class list")
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        raise UsageError(f"cannot fuse {first.path} with {other.path}: class {i} is {a[i][1]!r} in one and "
                         f"{b[i][1]!r} in the other; fused models need the same class list")


@dataclass
class Prepared:
    """An image decoded and rescaled, ready for the network (or the reason it is not)."""

    index: int
    path: str
    error: str | None = None
    image: np.ndarray | None = None  # the decoded original, kept only for heatmaps
    views: dict = field(default_factory=dict)  # ViewKey -> uint8 R x 3 x H x W
    seconds: float = 0.0


@dataclass
class ImageResult:
    """One image's posteriors under each requested method (fused over models), or its error."""

    path: str
    error: str | None = None
    posteriors: dict = field(default_factory=dict)  # method -> fused posterior (classes,)
    model_posteriors: list = field(default_factory=list)  # per model: method -> posterior
    score_maps: list = field(default_factory=list)  # per model: classes x h x w at its largest scale
    scale_maps: list = field(default_factory=list)  # per model: scale -> classes x h x w
    image: np.ndarray | None = None
    seconds: float = 0.0


@dataclass
class Job:
    """One image's rows of one view set for one model."""

    slot: int
    key: ViewKey
    rows: np.ndarray
    want_scores: bool = False


@dataclass
class NetworkOutcome:
    """What one model's network produced for a window of images."""

    probs: dict = field(default_factory=dict)  # (slot, ViewKey) -> R x classes
    scores: dict = field(default_factory=dict)  # (slot, scale) -> the unmirrored view's score map
    failed: dict = field(default_factory=dict)  # slot -> reason
    seconds: dict = field(default_factory=lambda: defaultdict(float))  # slot -> its share of network time
    parts: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, chunk: list, outputs: list[np.ndarray], elapsed: float) -> None:
        for k, (job, row) in enumerate(chunk):
            self.parts[(job.slot, job.key)].append(outputs[0][k])
            self.seconds[job.slot] += elapsed / len(chunk)
            if job.want_scores and row == 0:
                self.scores[(job.slot, job.key[1])] = outputs[1][k]

    def fail(self, chunk: list, reason: str) -> None:
        for job, _ in chunk:
            self.failed[job.slot] = reason

    def finish(self) -> "NetworkOutcome":
        self.probs = {key: np.stack(rows) for key, rows in self.parts.items()}
        return self


class Evaluator:
    """Evaluate images with the paper's methods over one or several models (fused)."""

    def __init__(self, sessions: list[ModelSession], methods=("dense",), scales: list[int] | None = None,
                 flip: bool = True, batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 heatmap: bool = False, progress: Callable[[float], None] | None = None):
        if not sessions:
            raise UsageError("no model given: use --model FILE.onnx (repeatable)")
        if batch_size < 1:
            raise UsageError(f"batch size {batch_size} must be at least 1")
        check_same_classes(sessions)
        self.sessions, self.methods = sessions, check_methods(methods)
        self.need_dense = any(m in ("dense", "both") for m in self.methods)
        self.need_crops = any(m in ("multi-crop", "both") for m in self.methods)
        self.flip, self.batch_size, self.max_pixels, self.heatmap = flip, batch_size, max_pixels, heatmap
        self.progress = progress  # called with the images' worth of work each network batch did
        self.classes = sessions[0].info.classes
        # each model's own metadata governs its preprocessing unless --scales overrides
        self.model_scales = [check_scales(list(scales or s.info.test_scales), s.info.crop_size) for s in sessions]
        self.dense_scales = {q for qs in self.model_scales for q in qs}
        if not self.need_dense:  # a heatmap needs the score map at each model's largest scale
            self.dense_scales = {max(qs) for qs in self.model_scales} if heatmap else set()
        self.crops_at = defaultdict(set)
        for session, qs in zip(sessions, self.model_scales):
            for q in qs if self.need_crops else ():
                self.crops_at[q].add(session.info.crop_size)
        self.rows_per_image = 2 if flip else 1
        self.network_seconds = 0.0  # time inside ONNX Runtime, and the FLOPs it did (for bench)
        self.network_flops = 0

    @property
    def scales(self) -> list[int]:
        """Every test scale any model uses, ascending."""
        return sorted({q for qs in self.model_scales for q in qs})

    # --- preprocessing (runs in worker threads) ------------------------------------------

    def views(self, image: np.ndarray) -> dict:
        """The network inputs the methods need, per view set (protocol.py's dense and crop views)."""
        views = {}
        for q in sorted(self.dense_scales | set(self.crops_at)):
            scaled = rescale(image, q, self.max_pixels)
            if q in self.dense_scales:
                views[("dense", q)] = dense_views(scaled, self.flip)
            for crop in sorted(self.crops_at.get(q, ())):
                views[("crops", q, crop)] = crop_views(scaled, crop, self.flip)
        return views

    def prepare(self, index: int, source: ImageInput) -> Prepared:
        start = time.perf_counter()
        item = Prepared(index, source_label(source, index))
        try:
            image = to_rgb(source, self.max_pixels)
            item.views = self.views(image)
            if self.heatmap:
                item.image = image
        except ImageError as e:
            item.error = str(e) if str(e).startswith(item.path) else f"{item.path}: {e}"
        except MemoryError:
            item.error = f"{item.path}: out of memory while preprocessing"
        item.seconds = time.perf_counter() - start
        return item

    # --- the network -----------------------------------------------------------------------

    def jobs(self, session: ModelSession, scales: list[int], good: list[Prepared]) -> list[Job]:
        """The rows one model runs for a window: dense views per scale and/or crops per scale."""
        crop, jobs = session.info.crop_size, []
        for p in good:
            if self.need_dense:
                jobs += [Job(p.index, ("dense", q), p.views[("dense", q)], self.heatmap) for q in scales]
            elif self.heatmap:  # only the unmirrored image at the largest scale, for its score map
                q = max(scales)
                jobs.append(Job(p.index, ("dense", q), p.views[("dense", q)][:1], True))
            if self.need_crops:
                jobs += [Job(p.index, ("crops", q, crop), p.views[("crops", q, crop)]) for q in scales]
        return jobs

    def run_network(self, session: ModelSession, jobs: list[Job], work: "WindowProgress") -> NetworkOutcome:
        """Run the jobs' rows, those of one shape together, in batches of at most batch_size."""
        outcome = NetworkOutcome()
        by_shape = defaultdict(list)
        for job in jobs:
            by_shape[job.rows.shape[1:]].append(job)
        for group in by_shape.values():
            flat = [(job, row) for job in group for row in range(len(job.rows))]
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start:start + self.batch_size]
                batch = np.stack([job.rows[row] for job, row in chunk]).astype(np.float32)
                want_scores = any(job.want_scores for job, _ in chunk)
                began = time.perf_counter()
                try:
                    outputs = session.run(batch, (PROBS_NAME, SCORES_NAME) if want_scores else (PROBS_NAME,))
                except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error types
                    reason = " ".join(str(e).split())[:200]
                    outcome.fail(chunk, f"{session.name} failed on a {tuple(batch.shape)} batch: {reason}")
                    continue
                elapsed = time.perf_counter() - began
                flops = dense_flops(session.info, batch.shape[2], batch.shape[3])
                self.network_seconds += elapsed
                self.network_flops += flops * len(batch)
                outcome.add(chunk, outputs, elapsed)
                work.done([job.slot for job, _ in chunk], flops)
        return outcome.finish()

    # --- the protocol's arithmetic, per image ------------------------------------------------

    def method_posteriors(self, outcome: NetworkOutcome, slot: int, scales: list[int], crop: int) -> dict:
        """One image's posterior under each method for one model (protocol.py's functions)."""
        posts = {}
        if self.need_dense:
            posts["dense"] = multi_scale_posterior(
                [view_posterior(outcome.probs[(slot, ("dense", q))]) for q in scales])
        if self.need_crops:
            posts["multi-crop"] = multi_scale_posterior(
                [view_posterior(outcome.probs[(slot, ("crops", q, crop))]) for q in scales])
        if "both" in self.methods:
            posts["both"] = combine_dense_multi_crop(posts["dense"], posts["multi-crop"])
        return {m: posts[m] for m in self.methods}

    def evaluate(self, window: list[Prepared]) -> list[ImageResult]:
        """Run the network on a window of prepared images (errors pass through)."""
        good = [p for p in window if p.error is None]
        plans = [(s, qs, self.jobs(s, qs, good)) for s, qs in zip(self.sessions, self.model_scales)]
        work = WindowProgress(self.progress, len(window), plans)
        outcomes = [self.run_network(session, jobs, work) for session, _, jobs in plans]
        work.finish()
        return [self.image_result(p, plans, outcomes) for p in window]

    def image_result(self, p: Prepared, plans: list, outcomes: list[NetworkOutcome]) -> ImageResult:
        seconds = p.seconds + sum(o.seconds[p.index] for o in outcomes)
        failed = [o.failed[p.index] for o in outcomes if p.index in o.failed]
        if p.error is not None or failed:
            return ImageResult(p.path, error=p.error or f"{p.path}: {failed[0]}", seconds=seconds)
        model_posts = [self.method_posteriors(o, p.index, qs, s.info.crop_size)
                       for (s, qs, _), o in zip(plans, outcomes)]
        fused = {m: fuse_posteriors([mp[m] for mp in model_posts]) for m in self.methods}
        scale_maps = [{q: m for (slot, q), m in o.scores.items() if slot == p.index} for o in outcomes]
        return ImageResult(p.path, posteriors=fused, model_posteriors=model_posts,
                           score_maps=[maps.get(max(qs)) for maps, (_, qs, _) in zip(scale_maps, plans)],
                           scale_maps=scale_maps, image=p.image, seconds=seconds)

    # --- the pipeline ----------------------------------------------------------------------

    def run(self, sources: Iterable[ImageInput], workers: int | None = None,
            lookahead: int | None = None) -> Iterator[ImageResult]:
        """Yield an ImageResult per source, in order. Preprocessing runs ahead in `workers` threads."""
        window_size = max(1, self.batch_size // self.rows_per_image)
        workers = workers or default_workers()
        lookahead = lookahead or max(2 * workers, window_size + workers)
        window: list[Prepared] = []
        for item in prefetch(lambda pair: self.prepare(*pair), enumerate(sources), workers, lookahead):
            window.append(item)
            if len(window) == window_size:
                yield from self.evaluate(window)
                window = []
        if window:
            yield from self.evaluate(window)


class WindowProgress:
    """Reports a window's network work as it happens, in images: each batch adds its rows' share
    of their images' FLOPs, so a progress bar moves per batch and reaches one per image."""

    def __init__(self, callback: Callable[[float], None] | None, images: int, plans: list):
        self.callback, self.images, self.reported = callback, images, 0.0
        self.total: dict = defaultdict(int)
        for session, _, jobs in plans:
            for job in jobs:
                self.total[job.slot] += len(job.rows) * dense_flops(session.info, *job.rows.shape[2:])

    def done(self, slots: list[int], flops_per_row: int) -> None:
        if self.callback is None:
            return
        amount = sum(flops_per_row / self.total[slot] for slot in slots if self.total[slot])
        self.reported += amount
        self.callback(amount)

    def finish(self) -> None:
        """The rest of the window's images (failed ones, rounding), so the window counts whole."""
        if self.callback is not None and self.images - self.reported > 0:
            self.callback(self.images - self.reported)


def default_workers() -> int:
    # one decoder keeps ahead of a CPU network many times over; more would take cores from it
    return 1


def configure_opencv_threads(threads: int | None = None) -> None:
    """OpenCV's own thread pool would add threads on top of the decode workers and ONNX Runtime's."""
    import cv2

    cv2.setNumThreads(1 if threads is None else threads)


def top_k(posterior: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest probabilities; ties go to the lower class index."""
    return [int(i) for i in np.argsort(-posterior, kind="stable")[:k]]


def collect_images(paths: list[str]) -> tuple[list[str], list[str]]:
    """PATH arguments -> (image files, paths that exist as nothing). Folders are searched
    recursively for image extensions; a file named explicitly is taken whatever its name;
    a missing path with wildcards is a glob."""
    import glob

    found, missing = [], []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.lexists(path):
            found.append(path)
        elif glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                missing.append(path)
            for match in matches:
                found += collect_images([match])[0] if os.path.isdir(match) else [match]
        else:
            missing.append(path)
    return list(dict.fromkeys(found)), missing


def load_sessions(models: list[str], provider: str, threads: int | None) -> list[ModelSession]:
    if not models:
        raise UsageError("no model given: use --model FILE.onnx (repeatable)")
    return [ModelSession(m, provider, threads) for m in models]
