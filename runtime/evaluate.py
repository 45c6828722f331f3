"""The paper's test protocol (PAPER.md §3, §5) over one or several compiled models.

Decoding, rescaling, mirroring and the crop grid come from vgg_onnx.preprocessing; this module
only batches the network inputs and averages posteriors:
- dense: per scale the image and its mirror, the mean of their `probs`; then the mean over scales;
- multi-crop: per scale the 5x5 grid of crops and their mirrors; the mean over all of them;
- both: the mean of the two; fusion: the mean over models.
Every mean here is over equally many rows per scale, so a running sum per image suffices.

Throughput: a thread pool decodes and rescales images ahead of the network (OpenCV releases
the GIL), and inputs of one shape from several images share a network batch.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from vgg_onnx.errors import UsageError
from vgg_onnx.metadata import PROBS_NAME, SCORES_NAME
from vgg_onnx.preprocessing import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, check_scales,
                                    crop_boxes, load_image, mirror, rescale)

from .flops import dense_flops
from .session import ModelSession

METHODS = ("dense", "multi-crop", "both")
DEFAULT_BATCH_SIZE = 4


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


def to_chw(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW uint8 (the float32 cast happens per batch, to keep queued images small)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))


@dataclass
class Prepared:
    """An image decoded and rescaled, ready for the network (or the reason it is not)."""

    index: int
    path: str
    error: str | None = None
    image: np.ndarray | None = None  # the decoded original, kept only for heatmaps
    dense: dict = field(default_factory=dict)  # q -> uint8 R x 3 x H x W (image[, mirror])
    crops: dict = field(default_factory=dict)  # (q, crop) -> uint8 R x 3 x c x c (25 crops[, 25 mirrors])
    seconds: float = 0.0


@dataclass
class ImageResult:
    path: str
    error: str | None = None
    posteriors: dict = field(default_factory=dict)  # method -> fused posterior (classes,)
    model_posteriors: list = field(default_factory=list)  # per model: method -> posterior
    score_maps: list = field(default_factory=list)  # per model: classes x h x w at its largest scale
    image: np.ndarray | None = None
    seconds: float = 0.0


class Evaluator:
    """Evaluate images with the paper's methods over one or several models (fused)."""

    def __init__(self, sessions: list[ModelSession], methods=("dense",), scales: list[int] | None = None,
                 flip: bool = True, batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 heatmap: bool = False):
        if not sessions:
            raise UsageError("no model given: use --model FILE.onnx (repeatable)")
        if batch_size < 1:
            raise UsageError(f"batch size {batch_size} must be at least 1")
        check_same_classes(sessions)
        self.sessions = sessions
        self.methods = check_methods(methods)
        self.need_dense = any(m in ("dense", "both") for m in self.methods)
        self.need_crops = any(m in ("multi-crop", "both") for m in self.methods)
        self.flip = flip
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.heatmap = heatmap
        self.classes = sessions[0].info.classes
        # each model's own metadata governs its preprocessing unless --scales overrides
        self.model_scales = [check_scales(list(scales or s.info.test_scales), s.info.crop_size) for s in sessions]
        self.dense_scales = sorted({q for qs in self.model_scales for q in qs})
        if not self.need_dense and heatmap:  # a heatmap needs the score map at each model's largest scale
            self.dense_scales = sorted({max(qs) for qs in self.model_scales})
        self.crop_keys = sorted({(q, s.info.crop_size) for s, qs in zip(sessions, self.model_scales) for q in qs})
        self.rows_per_image = 2 if flip else 1
        self.network_seconds = 0.0  # time inside ONNX Runtime, and the FLOPs it did (for bench)
        self.network_flops = 0

    # --- preprocessing (runs in worker threads) ------------------------------------------

    def prepare(self, index: int, path: str) -> Prepared:
        start = time.perf_counter()
        item = Prepared(index, path)
        try:
            image = load_image(path, self.max_pixels)
            crop_scales = {q for q, _ in self.crop_keys} if self.need_crops else set()
            for q in sorted(set(self.dense_scales) | crop_scales):
                scaled = rescale(image, q, self.max_pixels)
                if q in self.dense_scales:
                    rows = [to_chw(scaled)] + ([to_chw(mirror(scaled))] if self.flip else [])
                    item.dense[q] = np.stack(rows)
                for cq, crop in self.crop_keys:
                    if cq != q or q not in crop_scales:
                        continue
                    height, width = scaled.shape[:2]
                    crops = [scaled[y:y + crop, x:x + crop] for x, y in crop_boxes(width, height, crop)]
                    if self.flip:
                        crops += [mirror(c) for c in crops]
                    item.crops[(q, crop)] = np.stack(crops).transpose(0, 3, 1, 2).copy()
            if self.heatmap:
                item.image = image
        except ImageError as e:
            item.error = str(e) if str(e).startswith(path) else f"{path}: {e}"
        except MemoryError:
            item.error = f"{path}: out of memory while preprocessing"
        item.seconds = time.perf_counter() - start
        return item

    # --- the network -----------------------------------------------------------------------

    def _run_rows(self, session: ModelSession, jobs, sums, counts, seconds, failed, score_key=None,
                  score_maps=None):
        """jobs: list of (image slot, uint8 rows) of one shape. Runs them in batches of at most
        batch_size rows; adds each row's posterior to its image's sum. A batch the runtime
        cannot run (out of memory on a huge image...) fails its images, not the whole run."""
        outputs = (PROBS_NAME, SCORES_NAME) if score_key is not None else (PROBS_NAME,)
        flat = [(slot, row) for slot, rows in jobs for row in range(len(rows))]
        arrays = {slot: rows for slot, rows in jobs}
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            batch = np.stack([arrays[slot][row] for slot, row in chunk]).astype(np.float32)
            began = time.perf_counter()
            try:
                result = session.run(batch, outputs)
            except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error types
                reason = " ".join(str(e).split())[:200]
                for slot, _ in chunk:
                    failed[slot] = f"{session.name} failed on a {tuple(batch.shape)} batch: {reason}"
                continue
            elapsed = time.perf_counter() - began
            self.network_seconds += elapsed
            self.network_flops += dense_flops(session.info, batch.shape[2], batch.shape[3]) * len(batch)
            probs = result[0]
            for k, (slot, row) in enumerate(chunk):
                sums[slot] += probs[k]
                counts[slot] += 1
                seconds[slot] += elapsed / len(chunk)
                if score_key is not None and row == 0:  # the unmirrored image's score map
                    score_maps[slot] = result[1][k]

    def evaluate(self, window: list[Prepared]) -> list[ImageResult]:
        """Run the network on a window of prepared images (errors pass through)."""
        good = [p for p in window if p.error is None]
        seconds = defaultdict(float, {p.index: p.seconds for p in window})
        per_model = []
        score_maps_all = []
        failed: dict[int, str] = {}
        classes = len(self.classes)
        for session, scales in zip(self.sessions, self.model_scales):
            posts: dict[str, dict[int, np.ndarray]] = {}
            score_maps: dict[int, np.ndarray] = {}
            top_scale = max(scales)
            if self.need_dense or self.heatmap:
                sums = defaultdict(lambda: np.zeros(classes, np.float64))
                counts = defaultdict(int)
                for q in (scales if self.need_dense else [top_scale]):
                    by_shape = defaultdict(list)
                    for p in good:
                        rows = p.dense[q] if self.need_dense else p.dense[q][:1]
                        by_shape[rows.shape[2:]].append((p.index, rows))
                    want_scores = self.heatmap and q == top_scale
                    for jobs in by_shape.values():
                        self._run_rows(session, jobs, sums, counts, seconds,
                                       failed, score_key=q if want_scores else None,
                                       score_maps=score_maps)
                if self.need_dense:
                    posts["dense"] = {i: sums[i] / counts[i] for i in sums if i not in failed}
            if self.need_crops:
                sums = defaultdict(lambda: np.zeros(classes, np.float64))
                counts = defaultdict(int)
                for q in scales:
                    jobs = [(p.index, p.crops[(q, session.info.crop_size)]) for p in good]
                    self._run_rows(session, jobs, sums, counts, seconds, failed)
                posts["multi-crop"] = {i: sums[i] / counts[i] for i in sums if i not in failed}
            if "both" in self.methods:
                posts["both"] = {i: (posts["dense"][i] + posts["multi-crop"][i]) / 2
                                 for i in posts["dense"] if i in posts["multi-crop"]}
            per_model.append(posts)
            score_maps_all.append(score_maps)
        results = []
        for p in window:
            if p.error is not None or p.index in failed:
                error = p.error or f"{p.path}: {failed[p.index]}"
                results.append(ImageResult(p.path, error=error, seconds=seconds[p.index]))
                continue
            model_posts = [{m: posts[m][p.index] for m in self.methods} for posts in per_model]
            fused = {m: np.mean([mp[m] for mp in model_posts], axis=0) for m in self.methods}
            results.append(ImageResult(p.path, posteriors=fused, model_posteriors=model_posts,
                                       score_maps=[sm.get(p.index) for sm in score_maps_all],
                                       image=p.image, seconds=seconds[p.index]))
        return results

    # --- the pipeline ----------------------------------------------------------------------

    def run(self, paths: list[str], workers: int | None = None, lookahead: int | None = None):
        """Yield an ImageResult per path, in order. Preprocessing runs ahead in `workers` threads."""
        window_size = max(1, self.batch_size // self.rows_per_image)
        workers = workers or default_workers()
        lookahead = lookahead or max(2 * workers, window_size + workers)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="vgg-onnx-prep") as pool:
            queue: deque = deque()
            next_path = 0

            def fill():
                nonlocal next_path
                while next_path < len(paths) and len(queue) < lookahead:
                    queue.append(pool.submit(self.prepare, next_path, paths[next_path]))
                    next_path += 1

            fill()
            while queue:
                window = []
                while queue and len(window) < window_size:
                    window.append(queue.popleft().result())
                    fill()
                yield from self.evaluate(window)


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
    if threads is not None and threads < 1:
        raise UsageError(f"threads {threads} must be at least 1")
    return [ModelSession(m, provider, threads) for m in models]

