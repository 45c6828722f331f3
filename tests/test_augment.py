"""The training augmentation: scale jitter, crops inside the image, mirror, PCA colour shift, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from vgg_onnx.scales import rescale, rescaled_size
from vgg_onnx.train.augment import PCA, SAMPLE_STREAM, augment, centre_crop, draw, generator

# a PCA with well-separated, known eigen pairs (an orthonormal basis, not the identity)
_Q, _ = np.linalg.qr(np.array([[0.6, 0.5, 0.3], [0.55, -0.2, 0.8], [0.58, -0.7, -0.4]]))
TEST_PCA = PCA((0.04, 0.01, 0.002), tuple(tuple(row) for row in _Q))


def test_generator_depends_on_seed_epoch_and_index_only():
    a = generator(SAMPLE_STREAM, 7, 2, 11).integers(0, 1 << 30, 4)
    assert np.array_equal(a, generator(SAMPLE_STREAM, 7, 2, 11).integers(0, 1 << 30, 4))
    for other in ((SAMPLE_STREAM, 8, 2, 11), (SAMPLE_STREAM, 7, 3, 11), (SAMPLE_STREAM, 7, 2, 12), (2, 7, 2, 11)):
        assert not np.array_equal(a, generator(*other).integers(0, 1 << 30, 4))


def test_scale_jitter_covers_the_range_uniformly():
    scales = [draw(generator(SAMPLE_STREAM, 0, 0, i), [256, 512], 500, 375, 224).scale for i in range(4000)]
    assert min(scales) == 256 and max(scales) == 512
    counts = np.histogram(scales, bins=4, range=(256, 513))[0]
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000
    fixed = {draw(generator(SAMPLE_STREAM, 0, 0, i), [384], 500, 375, 224).scale for i in range(50)}
    assert fixed == {384}


@pytest.mark.parametrize("width,height", [(70, 50), (41, 90), (48, 48)])
def test_crops_lie_inside_the_rescaled_image_and_mirror_is_exact(width, height):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    crop, scales = 32, [36, 48]
    flips, lefts, tops = 0, set(), set()
    for i in range(300):
        patch, d = augment(image, generator(SAMPLE_STREAM, 1, 0, i), scales, crop, pca=None)
        assert patch.shape == (crop, crop, 3) and patch.dtype == np.float32
        new_w, new_h = rescaled_size(width, height, d.scale)
        assert 0 <= d.left <= new_w - crop and 0 <= d.top <= new_h - crop
        region = rescale(image, d.scale)[d.top:d.top + crop, d.left:d.left + crop]
        expected = region[:, ::-1] if d.flip else region
        assert np.array_equal(patch, expected.astype(np.float32))
        flips += d.flip
        lefts.add(d.left)
        tops.add(d.top)
    assert 110 < flips < 190  # mirror with probability 1/2
    assert len(lefts) > 3 and len(tops) > 3  # crops move


def test_colour_shift_statistics():
    """shift = 255 * sum_i alpha_i lambda_i p_i with alpha_i ~ N(0, 0.1): project onto p_i and check."""
    image = np.full((40, 40, 3), 128, np.uint8)
    shifts = []
    for i in range(3000):
        patch, d = augment(image, generator(SAMPLE_STREAM, 2, 0, i), [40], 32, TEST_PCA)
        offset = patch - 128.0
        assert np.allclose(offset, offset[0, 0], atol=1e-4)  # one RGB offset for the whole image
        shifts.append(offset[0, 0].astype(np.float64))
    shifts = np.array(shifts)
    vectors, values = np.array(TEST_PCA.eigenvectors), np.array(TEST_PCA.eigenvalues)
    alphas = shifts @ vectors / (255 * values)  # recovered alpha_i
    assert np.all(np.abs(alphas.mean(0)) < 0.01)
    np.testing.assert_allclose(alphas.std(0), 0.1, rtol=0.06)
    corr = np.corrcoef(alphas.T)
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.08)  # independent draws


def test_centre_crop_is_central():
    image = np.arange(60 * 90 * 3, dtype=np.uint8).reshape(60, 90, 3)
    out = centre_crop(image, 60, 32)
    assert np.array_equal(out, image[14:46, 29:61])


def _batches(dataset, sampler, workers):
    import torch

    from vgg_onnx.train.data import collate

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    return [(x.clone(), y.clone()) for x, y, _ in loader]


def test_samples_do_not_depend_on_workers_or_processes(tmp_path):
    import torch

    from test_train_data import make_dataset
    from vgg_onnx.normalization import normalization_preset
    from vgg_onnx.train.data import EpochBatches, TrainDataset, scan_data

    data = make_dataset(tmp_path / "d", train_per_class=6, val_per_class=1, sizes=[(48, 48), (64, 40), (40, 56)])
    train, _, _ = scan_data(str(data))
    dataset = TrainDataset(train, [36, 48], 32, normalization_preset("paper", (120, 110, 100)), TEST_PCA, seed=5)

    def sampler(rank=0, world=1, epoch=1):
        s = EpochBatches(len(train), 8, rank, world, seed=5)
        s.set_epoch(epoch)
        return s

    one = _batches(dataset, sampler(), 0)
    assert len(one) == 3
    two_workers = _batches(dataset, sampler(), 2)
    for (x0, y0), (x1, y1) in zip(one, two_workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # two processes: each global batch is the concatenation of the ranks' parts
    rank0, rank1 = _batches(dataset, sampler(0, 2), 0), _batches(dataset, sampler(1, 2), 0)
    for (x, y), (a, ya), (b, yb) in zip(one, rank0, rank1):
        assert torch.equal(x, torch.cat([a, b])) and torch.equal(y, torch.cat([ya, yb]))
    # another epoch: another order and other augmentations
    other = _batches(dataset, sampler(epoch=2), 0)
    assert not torch.equal(one[0][0], other[0][0])
    # resuming at step 1 of the epoch gives the same later batches
    resumed = sampler()
    resumed.set_epoch(1, start=1)
    later = _batches(dataset, resumed, 0)
    assert len(later) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(one[1:], later))
