"""The configuration table: parameter counts (docs/protocol.md §1), names and aliases, crop checks."""

from __future__ import annotations

import pytest
import torch

from vgg_onnx.configs import check_crop, config_depth, config_names, fc_layers, parse_config
from vgg_onnx.errors import UsageError
from vgg_onnx.train.model import VGG, count_parameters

EXACT_COUNTS = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848, "C": 133_638_952,
                "D": 138_357_544, "E": 143_667_240}
FC_PARAMS = 123_642_856  # fc6 + fc7 + fc8 with 1000 classes, the same in every config


def meta_model(config: str, **kwargs) -> VGG:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return VGG(config, **kwargs)


@pytest.mark.parametrize("config", list(EXACT_COUNTS))
def test_parameter_counts_match_the_paper(config):
    model = meta_model(config)
    assert count_parameters(model) == EXACT_COUNTS[config]
    assert sum(p.numel() for p in model.classifier.parameters()) == FC_PARAMS


@pytest.mark.parametrize("config", ["A", "B", "C", "D", "E"])
def test_batch_norm_variant_adds_scale_and_shift_per_channel(config):
    channels = sum(c.out_channels for c in parse_config(config).conv_layers())
    assert count_parameters(meta_model(config + "-BN")) == EXACT_COUNTS[config] + 2 * channels


def test_caffe_layer_names_follow_blocks():
    assert [c.name for c in parse_config("D").conv_layers()][-3:] == ["conv5_1", "conv5_2", "conv5_3"]
    assert [c.name for c in parse_config("E").conv_layers()][-1] == "conv5_4"
    c_layers = [(c.name, c.out_channels, c.kernel, c.padding) for c in parse_config("C").conv_layers()]
    assert ("conv3_3", 256, 1, 0) in c_layers and ("conv5_3", 512, 1, 0) in c_layers
    assert len(parse_config("A-LRN").conv_layers()) == 8
    assert [layer.name for layer in parse_config("A-LRN").feature_layers()][:4] == ["conv1_1", "norm1", "pool1",
                                                                                     "conv2_1"]
    assert [fc.kernel for fc in fc_layers(224, 1000)] == [7, 1, 1] and fc_layers(64, 10)[2].out_channels == 10


def test_config_c_one_by_one_convs_have_no_padding():
    convs = [m for m in meta_model("C").features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.padding) for c in convs if c.kernel_size == (1, 1)] == [((1, 1), (0, 0))] * 3


def test_config_names_and_errors():
    assert parse_config("d-bn").name == "D-BN" and parse_config(" a-lrn ").name == "A-LRN"
    assert "A-LRN-BN" not in config_names()
    with pytest.raises(UsageError, match=r"valid configs: A, A-LRN, B, C, D, E with 11, 11, 13, 16, 16, 19 "
                                         r"weight layers \(torchvision's names: vgg11=A, vgg13=B, vgg16=D, vgg19=E\)"):
        parse_config("F")
    for crop in (0, 100, 230):
        with pytest.raises(UsageError, match="multiple of 32"):
            check_crop(crop)
    assert check_crop(224) == 224


@pytest.mark.parametrize("alias, name", [("vgg11", "A"), ("vgg13", "B"), ("VGG16", "D"), ("vgg19", "E"),
                                         ("vgg11_bn", "A-BN"), ("vgg16_bn", "D-BN"), (" vgg19_BN ", "E-BN")])
def test_torchvision_names_are_aliases(alias, name):
    assert parse_config(alias) == parse_config(name)
    assert parse_config(alias).name == name


def test_depths_count_weight_layers():
    assert {base: config_depth(base) for base in EXACT_COUNTS} == {"A": 11, "A-LRN": 11, "B": 13, "C": 16,
                                                                    "D": 16, "E": 19}
