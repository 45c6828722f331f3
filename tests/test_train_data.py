"""Training data: generated ImageFolder sets (used by the other training tests), split checks, stats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40))


def draw_shape(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    """A coloured shape at a random place on a noisy background (RGB uint8); class = shape and colour."""
    import cv2

    image = rng.integers(60, 160, (size, size, 3)).astype(np.uint8)
    image = cv2.GaussianBlur(image, (5, 5), 0)
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[kind])
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(rng.integers(r, size - r)) for _ in range(2))
    if SHAPES[kind] == "circle":
        cv2.circle(image, (cx, cy), r, colour, -1)
    elif SHAPES[kind] == "square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    elif SHAPES[kind] == "triangle":
        pts = np.array([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], np.int32)
        cv2.fillPoly(image, [pts], colour)
    else:
        t = max(2, r // 3)
        cv2.rectangle(image, (cx - r, cy - t), (cx + r, cy + t), colour, -1)
        cv2.rectangle(image, (cx - t, cy - r), (cx + t, cy + r), colour, -1)
    # pixel noise everywhere: flat areas would tie in max-pooling, and which of two equal values wins
    # then depends on rounding noise (it would make the DDP equivalence test chaotic)
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_dataset(root: Path, train_per_class: int = 24, val_per_class: int = 8, size: int = 48,
                 classes: int = 4, seed: int = 0, sizes=None) -> Path:
    """root/train/<shape>/*.png and root/val/<shape>/*.png. `sizes`: optional (w, h) choices per image."""
    import cv2

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for kind in range(classes):
            folder = root / split / SHAPES[kind]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = draw_shape(rng, kind, size)
                if sizes is not None:
                    w, h = sizes[int(rng.integers(len(sizes)))]
                    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
                cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


def run_cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "vgg_onnx", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), train_per_class=6, val_per_class=2)


def test_scan_splits_and_classes(shapes):
    from vgg_onnx.train.data import scan_data

    train, val, classes = scan_data(str(shapes))
    assert train.classes == tuple(sorted(SHAPES))
    assert len(train) == 24 and len(val) == 8
    assert [c.name for c in classes] == sorted(SHAPES) and [c.index for c in classes] == [0, 1, 2, 3]
    # every class index points at its own folder
    assert all(Path(p).parent.name == train.classes[y] for p, y in train.samples)


def test_bad_splits_are_one_line_errors(tmp_path, shapes):
    import shutil

    from vgg_onnx.errors import UsageError
    from vgg_onnx.train.data import scan_data

    with pytest.raises(UsageError, match="missing split"):
        scan_data(str(shapes / "train"))
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match="empty split"):
        scan_data(str(empty))
    differ = tmp_path / "differ"
    shutil.copytree(shapes, differ)
    shutil.rmtree(differ / "val" / "cross")
    with pytest.raises(UsageError, match="classes differ.*only in train: cross"):
        scan_data(str(differ))


def test_stats_match_numpy_and_cli(tmp_path, shapes):
    import cv2

    from vgg_onnx.train.data import compute_stats, scan_split

    split = scan_split(str(shapes), "train")
    stats = compute_stats(split, workers=0, progress=False)
    pixels = np.concatenate([cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB).reshape(-1, 3) for p, _ in split.samples])
    pixels = pixels.astype(np.float64)
    np.testing.assert_allclose(stats.mean_rgb, pixels.mean(0), rtol=1e-9)
    cov = np.cov((pixels / 255).T, bias=True)
    values = np.array(stats.pca.eigenvalues)
    vectors = np.array(stats.pca.eigenvectors)
    np.testing.assert_allclose(cov @ vectors, vectors * values, atol=1e-9)  # eigen pairs of the covariance
    assert values[0] >= values[1] >= values[2] >= 0
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-9)

    out = tmp_path / "stats.json"
    result = run_cli("stats", shapes, "--out", out, "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert "mean RGB" in result.stdout
    saved = json.loads(out.read_text())
    np.testing.assert_allclose(saved["mean_rgb"], stats.mean_rgb)
    assert saved["images"] == 24


def test_stats_skips_corrupt_images(tmp_path, shapes):
    import shutil

    from vgg_onnx.train.data import compute_stats, scan_split

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "circle" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    stats = compute_stats(scan_split(str(data), "train"), workers=0, progress=False)
    assert stats.images == 24 and stats.skipped == 1


def test_stats_cli_missing_folder(tmp_path):
    result = run_cli("stats", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "missing split" in result.stderr
