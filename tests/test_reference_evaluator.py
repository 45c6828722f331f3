"""A third, independent executor: ONNX's own reference evaluator (onnx.reference, plain numpy)
runs small exported graphs and agrees with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import export_small_model

TOLERANCE = 1e-4


@pytest.mark.parametrize("config, normalization", [("A", "paper"), ("A-LRN", "torchvision"), ("A", "caffe")])
def test_reference_evaluator_agrees_with_onnxruntime(tmp_path, config, normalization):
    import onnx
    import onnxruntime
    from onnx.reference import ReferenceEvaluator

    model = export_small_model(tmp_path / "model.onnx", config=config, normalization=normalization)
    # a batch of two non-square images, big enough for a 2x3 score map
    image = np.random.default_rng(0).uniform(0, 255, (2, 3, 96, 128)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    scores, probs = session.run(["scores", "probs"], {"image": image})
    ref_scores, ref_probs = ReferenceEvaluator(onnx.load(str(model))).run(["scores", "probs"], {"image": image})

    assert ref_scores.shape == scores.shape == (2, 10, 2, 3)
    assert ref_probs.shape == probs.shape == (2, 10)
    # scores relative to their range (they are O(10)); probabilities absolutely
    assert np.max(np.abs(ref_scores - scores)) / np.max(np.abs(scores)) < TOLERANCE
    assert np.max(np.abs(ref_probs - probs)) < TOLERANCE
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    # the posterior is the softmax of the score map's spatial mean
    mean = scores.astype(np.float64).mean(axis=(2, 3))
    softmax = np.exp(mean - mean.max(axis=1, keepdims=True))
    assert np.max(np.abs(softmax / softmax.sum(axis=1, keepdims=True) - probs)) < 1e-5
