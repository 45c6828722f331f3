"""ImageFolder splits, the training and validation datasets, and the training set's colour statistics.

Decoding and rescaling are the runtime's own (vgg_onnx.decoding, vgg_onnx.scales), so training and
inference see identical pixels; only the random augmentation lives here (train/augment.py).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from vgg_onnx.atomic import atomic_write_text
from vgg_onnx.classes import ClassInfo, classes_from_folders
from vgg_onnx.decoding import IMAGE_EXTENSIONS, load_image
from vgg_onnx.errors import ImageError, UsageError, VggOnnxError
from vgg_onnx.normalization import Normalization

from .augment import PCA, SAMPLE_STREAM, SHUFFLE_STREAM, augment, centre_crop, generator


@dataclass(frozen=True)
class Split:
    root: str
    classes: tuple[str, ...]  # sorted folder names
    samples: tuple[tuple[str, int], ...]  # (path, class index), sorted by class then file name

    def __len__(self) -> int:
        return len(self.samples)


def scan_split(data_dir: str, name: str) -> Split:
    """DIR/<name>/<class>/<image>; a missing or empty split is a usage error."""
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        raise UsageError(f"{root}: missing split (expected {data_dir}/train/<class>/... and {data_dir}/val/<class>/...)")
    classes = tuple(sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise UsageError(f"{root}: empty split (no class folders)")
    samples = []
    for index, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith("."):
                    samples.append((os.path.join(dirpath, filename), index))
    if not samples:
        raise UsageError(f"{root}: empty split (no images in {len(classes)} class folders)")
    return Split(root, classes, tuple(samples))


def limit_per_class(split: Split, limit: int | None) -> Split:
    """The first `limit` images (in file-name order) of each class: a fixed subset for quick trials."""
    if limit is None:
        return split
    taken = [0] * len(split.classes)
    samples = []
    for path, index in split.samples:
        if taken[index] < limit:
            taken[index] += 1
            samples.append((path, index))
    return Split(split.root, split.classes, tuple(samples))


def scan_data(data_dir: str, limit: int | None = None) -> tuple[Split, Split, tuple[ClassInfo, ...]]:
    """The train and val splits of DIR (at most `limit` images per class) and the classes they share."""
    if not os.path.isdir(data_dir):
        raise UsageError(f"{data_dir}: data folder not found")
    train, val = scan_split(data_dir, "train"), scan_split(data_dir, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        detail = "; ".join(part for part in (
            f"only in train: {', '.join(only_train[:5])}" if only_train else "",
            f"only in val: {', '.join(only_val[:5])}" if only_val else "") if part)
        raise UsageError(f"{data_dir}: classes differ between train/ and val/ ({detail})")
    train, val = limit_per_class(train, limit), limit_per_class(val, limit)
    return train, val, classes_from_folders(list(train.classes))


# --- colour statistics ----------------------------------------------------------------------

STATS_FILE = "stats.json"


@dataclass(frozen=True)
class ColourStats:
    """Mean RGB (0..255) and the PCA of the RGB pixel covariance ([0, 1] units) of a training set."""

    mean_rgb: tuple[float, float, float]
    pca: PCA
    images: int
    pixels: int
    skipped: int = 0

    def to_dict(self) -> dict:
        return {"mean_rgb": list(self.mean_rgb), "eigenvalues": list(self.pca.eigenvalues),
                "eigenvectors": [list(row) for row in self.pca.eigenvectors],
                "pixel_units": "mean 0..255; covariance of pixels / 255",
                "images": self.images, "pixels": self.pixels, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict, source: str = "stats") -> "ColourStats":
        try:
            mean = tuple(float(v) for v in d["mean_rgb"])
            values = tuple(float(v) for v in d["eigenvalues"])
            vectors = tuple(tuple(float(v) for v in row) for row in d["eigenvectors"])
            if len(mean) != 3 or len(values) != 3 or len(vectors) != 3 or any(len(r) != 3 for r in vectors):
                raise ValueError("expected 3 values, 3 eigenvalues and a 3x3 eigenvector matrix")
            return cls(mean, PCA(values, vectors), int(d.get("images", 0)), int(d.get("pixels", 0)),
                       int(d.get("skipped", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise VggOnnxError(f"{source}: malformed colour statistics ({e})") from None


def stats_from_moments(count: int, total: np.ndarray, outer: np.ndarray, images: int, skipped: int) -> ColourStats:
    """Mean and covariance from the pixel count, the sum and the sum of outer products (0..255 units)."""
    mean = total / count
    cov = (outer / count - np.outer(mean, mean)) / 255.0 ** 2
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]  # largest first, as AlexNet lists them
    values, vectors = values[order], vectors[:, order]
    vectors = vectors * np.where(vectors.sum(axis=0) < 0, -1.0, 1.0)  # a fixed sign per vector
    return ColourStats(tuple(float(v) for v in mean), PCA(tuple(float(v) for v in np.maximum(values, 0.0)),
                                                         tuple(tuple(float(v) for v in row) for row in vectors)),
                       images, count, skipped)


def compute_stats(split: Split, workers: int = 0, progress: bool = True) -> ColourStats:
    """One pass over the decoded training images (every pixel counts once). Corrupt images are skipped."""
    loader = torch.utils.data.DataLoader(_MomentDataset(split), batch_size=None, num_workers=workers)
    count, total, outer, images, skipped = 0, np.zeros(3), np.zeros((3, 3)), 0, 0
    for item in tqdm(loader, total=len(split), desc="colour statistics", unit="img", disable=not progress,
                     leave=False):
        if isinstance(item, str):
            tqdm.write(f"vgg-onnx: warning: skipped {item}", file=sys.stderr)  # stdout carries only results
            skipped += 1
            continue
        n, s, o = item
        count, total, outer, images = count + int(n), total + s.numpy(), outer + o.numpy(), images + 1
    if images == 0:
        raise VggOnnxError(f"{split.root}: no readable images for the colour statistics")
    return stats_from_moments(count, total, outer, images, skipped)


class _MomentDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            image = load_image(self.split.samples[i][0])
        except ImageError as e:
            return str(e)
        pixels = image.reshape(-1, 3).astype(np.float64)
        return pixels.shape[0], torch.from_numpy(pixels.sum(0)), torch.from_numpy(pixels.T @ pixels)


def save_stats(path: str, stats: ColourStats) -> None:
    atomic_write_text(path, json.dumps(stats.to_dict(), indent=2) + "\n")


def load_stats(path: str) -> ColourStats:
    try:
        with open(path, encoding="utf-8") as f:
            return ColourStats.from_dict(json.load(f), path)
    except OSError as e:
        raise VggOnnxError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise VggOnnxError(f"{path}: not JSON ({e})") from None


# --- datasets -------------------------------------------------------------------------------

def to_tensor(image: np.ndarray, norm: Normalization) -> torch.Tensor:
    """HxWx3 (0..255 RGB) -> 3xHxW float32, normalised as the weights expect (the exported graph does the same)."""
    return torch.from_numpy(np.ascontiguousarray(norm.apply(image).transpose(2, 0, 1)))


class TrainDataset(torch.utils.data.Dataset):
    """Items are addressed by (epoch, sample index): the sample's generator follows from them and the seed.

    A corrupt image yields (None, label, message) and the batch goes on without it.
    """

    def __init__(self, split: Split, scales: list[int], crop: int, norm: Normalization, pca: PCA | None, seed: int):
        self.split, self.scales, self.crop, self.norm, self.pca, self.seed = split, scales, crop, norm, pca, seed

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.split.samples[index]
        try:
            image = load_image(path)
            patch, _ = augment(image, generator(SAMPLE_STREAM, self.seed, epoch, index), self.scales, self.crop, self.pca)
        except ImageError as e:
            return None, label, str(e)
        return to_tensor(patch, self.norm), label, None


class ValDataset(torch.utils.data.Dataset):
    """The centre crop of each image rescaled to Q."""

    def __init__(self, split: Split, q: int, crop: int, norm: Normalization):
        self.split, self.q, self.crop, self.norm = split, q, crop, norm

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index: int):
        path, label = self.split.samples[index]
        try:
            return to_tensor(centre_crop(load_image(path), self.q, self.crop), self.norm), label, None
        except ImageError as e:
            return None, label, str(e)


def collate(items):
    """Stack the good samples; report the corrupt ones by message."""
    images = [x for x, _, err in items if err is None]
    labels = [y for _, y, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    if images:
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), errors
    return None, torch.zeros(0, dtype=torch.long), errors


class EpochBatches:
    """The batch sampler: this process's part of every global batch of an epoch, from a start step.

    The global batch of step k is perm[k*B:(k+1)*B] for the epoch's permutation (seeded by
    (seed, epoch)); process r of W takes its r-th slice of B/W. The last partial batch is dropped.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int):
        self.num_samples, self.global_batch, self.rank, self.world, self.seed = num_samples, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.steps_per_epoch() - self.start

    def __iter__(self):
        perm = generator(SHUFFLE_STREAM, self.seed, self.epoch).permutation(self.num_samples)
        for step in range(self.start, self.steps_per_epoch()):
            first = step * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, int(i)) for i in perm[first:first + self.local_batch]]


def shard(num_samples: int, rank: int, world: int, batch: int):
    """Validation: process r takes samples r, r+W, r+2W, ... in batches."""
    indices = list(range(rank, num_samples, world))
    return [indices[i:i + batch] for i in range(0, len(indices), batch)]
