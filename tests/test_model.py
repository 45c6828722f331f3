"""The torch model: FC form and conv form (DenseVGG) agree; score-map sizes; initialisers."""

from __future__ import annotations

import pytest
import torch

from vgg_onnx.export.compiler import DenseVGG, reference_outputs, relative_error
from vgg_onnx.configs import fc_layers, score_map_size
from vgg_onnx.normalization import normalization_preset
from vgg_onnx.train.model import VGG, init_weights


def small(config="A", crop=64, classes=10, seed=0):
    torch.manual_seed(seed)
    return init_weights(VGG(config, classes, 0.125, crop), "glorot").eval()


@pytest.mark.parametrize("config,crop,preset", [("A", 64, "paper"), ("C", 96, "torchvision"),
                                                ("A-LRN", 64, "caffe"), ("B-BN", 64, "paper")])
def test_fc_form_equals_conv_form_at_crop_size(config, crop, preset):
    model = small(config, crop)
    for m in model.modules():  # batch norm with non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0), m.bias.data.uniform_(-0.1, 0.1)
    norm = normalization_preset(preset)
    image = torch.rand(2, 3, crop, crop) * 255
    logits = reference_outputs(model, norm, image)
    with torch.no_grad():
        scores, probs = DenseVGG(model, norm)(image)
    assert scores.shape == (2, 10, 1, 1)
    assert relative_error(scores[:, :, 0, 0].numpy(), logits.numpy()) < 1e-5
    assert relative_error(probs.numpy(), torch.softmax(logits, 1).numpy()) < 1e-5


def test_dense_model_leaves_the_fc_model_untouched():
    model = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DenseVGG(model, normalization_preset("caffe"))  # BGR folds into a copy of conv1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("height,width,crop,expected", [
    (64, 64, 64, (1, 1)), (96, 128, 64, (2, 3)), (100, 130, 64, (2, 3)), (127, 64, 64, (2, 1)),
    (224, 224, 224, (1, 1)), (256, 341, 224, (2, 4)), (512, 683, 224, (10, 15)), (384, 384, 224, (6, 6))])
def test_score_map_size(height, width, crop, expected):
    assert score_map_size(height, width, crop) == expected


@pytest.mark.parametrize("height,width", [(64, 64), (100, 130), (127, 64)])
def test_score_map_size_matches_the_network(height, width):
    with torch.no_grad():
        scores, _ = DenseVGG(small(), normalization_preset("paper"))(torch.rand(1, 3, height, width) * 255)
    assert tuple(scores.shape[2:]) == score_map_size(height, width, 64)


def test_score_map_size_refuses_small_inputs():
    with pytest.raises(ValueError, match="smaller than the crop"):
        score_map_size(200, 300, 224)


def test_fc_form_refuses_other_sizes():
    with pytest.raises(ValueError, match="conv form"):
        small()(torch.rand(1, 3, 96, 96))


def test_initialisers():
    torch.manual_seed(0)
    model = init_weights(VGG("A", 10, 0.25, 64), "gaussian")
    conv = model.conv_layers()[3].weight
    assert abs(conv.std().item() - 0.01) < 0.001 and abs(conv.mean().item()) < 0.001
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model.conv_layers() + model.fc_layers())
    glorot = init_weights(VGG("A", 10, 0.25, 64), "glorot").fc_layers()[1].weight
    bound = (6 / (glorot.shape[0] + glorot.shape[1])) ** 0.5
    assert glorot.abs().max() <= bound and glorot.abs().max() > 0.9 * bound
    with pytest.raises(ValueError):
        init_weights(model, "he")


@pytest.mark.parametrize("config", ["A", "A-LRN", "C", "E", "D-BN"])
def test_config_state_keys_name_the_models_convs(config):
    """The layer specs' state keys (Caffe name -> features.<i>, fc6-8 -> classifier.<i>), used by weight
    import, --init-from and the compiler, point at exactly the model's conv, batch-norm and FC layers."""
    model = VGG(config, 10, 0.125, 64)
    convs = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, torch.nn.Conv2d)]
    norms = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, torch.nn.BatchNorm2d)]
    specs = model.config.conv_layers()
    assert [c.state_key for c in specs] == convs
    assert [c.batch_norm_key for c in specs if c.batch_norm_key] == norms
    assert specs[0].name == "conv1_1"
    linears = [f"classifier.{i}" for i, m in enumerate(model.classifier) if isinstance(m, torch.nn.Linear)]
    assert [fc.state_key for fc in fc_layers()] == linears


@pytest.mark.parametrize("size", [1, 2, 5, 6])
def test_training_lrn_matches_torch_in_value_and_gradient(size):
    """A-LRN trains with a hand-written LRN backward; it must be torch's LocalResponseNorm exactly."""
    from vgg_onnx.train.model import LocalResponseNorm

    torch.manual_seed(size)
    x = (torch.randn(2, 7, 3, 4, dtype=torch.float64) * 30).requires_grad_()
    ours, torchs = LocalResponseNorm(size, 1e-2, 0.75, 1.0), torch.nn.LocalResponseNorm(size, 1e-2, 0.75, 1.0)
    assert torch.autograd.gradcheck(ours, (x,))
    weights = torch.randn_like(x)
    for mine, theirs in ((ours(x), torchs(x)),
                         (torch.autograd.grad((ours(x) * weights).sum(), x)[0],
                          torch.autograd.grad((torchs(x) * weights).sum(), x)[0])):
        assert torch.allclose(mine, theirs, rtol=1e-12, atol=1e-12)
    assert isinstance(small("A-LRN").features[2], LocalResponseNorm)
