"""Weight files -> torchvision-layout state dicts: formats, inference of sizes, mismatches, bad files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vgg_onnx.configs import parse_config
from vgg_onnx.errors import VggOnnxError
from vgg_onnx.train.model import VGG, init_weights
from vgg_onnx.export.weights import build_model, file_sha256, import_weights, infer_dimensions

CONFIG = "A"


def small(config=CONFIG, classes=10, crop=64, seed=0):
    torch.manual_seed(seed)
    return init_weights(VGG(config, classes, 0.125, crop), "glorot").eval()


def caffe_arrays(model: VGG, config=CONFIG, style="dot") -> dict[str, np.ndarray]:
    """The model's weights under Caffe's layer names, in one of the naming styles seen in the wild."""
    names = [c.name for c in parse_config(config).conv_layers()] + ["fc6", "fc7", "fc8"]
    layers = model.conv_layers() + model.fc_layers()
    suffix = {"dot": (".weight", ".bias"), "slash": ("/weight", "/bias"), "caffe": ("_W", "_b"), "blob": (".0", ".1")}[style]
    out = {}
    for name, layer in zip(names, layers):
        out[name + suffix[0]] = layer.weight.detach().numpy().copy()
        out[name + suffix[1]] = layer.bias.detach().numpy().copy()
    return out


def assert_same_weights(model: VGG, state_dict: dict):
    for key, value in model.state_dict().items():
        assert torch.equal(state_dict[key], value), key


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "ddp"])
def test_torchvision_pth(tmp_path, wrap):
    model = small()
    sd = model.state_dict()
    data = {"raw": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
            "ddp": {"module." + k: v for k, v in sd.items()}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(data, path)
    loaded = import_weights(str(path), CONFIG)
    assert loaded.format == "torchvision" and loaded.source == "w.pth" and len(loaded.sha256) == 64
    assert_same_weights(model, loaded.state_dict)
    assert infer_dimensions(loaded.state_dict, parse_config(CONFIG)) == {"num_classes": 10, "width_mult": 0.125,
                                                                         "crop_size": 64}


@pytest.mark.parametrize("style,ext", [("dot", "npz"), ("slash", "safetensors"), ("caffe", "pth"), ("blob", "npz")])
def test_caffe_named_arrays_become_torchvision_keys(tmp_path, style, ext):
    model = small()
    arrays = caffe_arrays(model, style=style)
    path = tmp_path / f"caffe.{ext}"
    if ext == "npz":
        np.savez(path, **arrays)
    elif ext == "safetensors":
        save_file({k: torch.from_numpy(v) for k, v in arrays.items()}, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    loaded = import_weights(str(path), CONFIG)
    assert loaded.format == "caffe"
    assert_same_weights(model, loaded.state_dict)


def test_caffe_fc_layers_in_conv_shape_are_accepted(tmp_path):
    model = small()
    arrays = caffe_arrays(model)
    arrays["fc6.weight"] = arrays["fc6.weight"].reshape(-1, 8 * 8, 2, 2)  # 8 channels, 2x2 at crop 64... as conv
    np.savez(tmp_path / "c.npz", **arrays)
    assert_same_weights(model, import_weights(str(tmp_path / "c.npz"), CONFIG).state_dict)


def test_caffe_layer_that_the_config_lacks(tmp_path):
    arrays = caffe_arrays(small())
    arrays["conv5_4.weight"] = arrays["conv5_2.weight"]
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(VggOnnxError, match="layer conv5_4 does not exist in config A"):
        import_weights(str(tmp_path / "c.npz"), CONFIG)


def test_build_model_checks_every_shape(tmp_path):
    sd = small().state_dict()
    cfg = parse_config(CONFIG)
    model = build_model("w.pth", dict(sd), cfg, 10, 0.125, 64)
    assert_same_weights(small(), model.state_dict())
    with pytest.raises(VggOnnxError, match=r"classifier.6.weight has shape 10x512, expected 1000x512"):
        build_model("w.pth", dict(sd), cfg, 1000, 0.125, 64)
    with pytest.raises(VggOnnxError, match=r"features.3.weight is missing \(expected shape 16x8x3x3\)"):
        build_model("w.pth", {k: v for k, v in sd.items() if k != "features.3.weight"}, cfg, 10, 0.125, 64)
    with pytest.raises(VggOnnxError, match="config B .*features.0.weight has shape 8x3x3x3, expected 64x3x3x3"):
        build_model("w.pth", dict(sd), parse_config("B"), 10, 1.0, 64)


def test_checkpoint_with_json(tmp_path):
    from vgg_onnx.classes import default_classes
    from vgg_onnx.metadata import ModelInfo
    from vgg_onnx.normalization import normalization_preset

    model = small()
    path = tmp_path / "best.safetensors"
    save_file(model.state_dict(), str(path))
    info = ModelInfo("A", default_classes(10), normalization_preset("paper", (120.0, 115.0, 100.0)), crop_size=64,
                     width_mult=0.125, train_scales=[96])
    document = info.to_json_dict() | {"training": {"epoch": 1}, "weights_sha256": file_sha256(str(path))}
    (tmp_path / "best.json").write_text(json.dumps(document))
    loaded = import_weights(str(path), CONFIG)
    assert loaded.format == "checkpoint" and loaded.info.normalization.mean_rgb == (120.0, 115.0, 100.0)
    assert_same_weights(model, loaded.state_dict)
    # the JSON records the weights' sha256: a mixed-up pair is refused
    (tmp_path / "best.json").write_text(json.dumps(document | {"weights_sha256": "0" * 64}))
    with pytest.raises(VggOnnxError, match="does not match the sha256"):
        import_weights(str(path), CONFIG)
    # an empty sha256 does not switch the check off
    (tmp_path / "best.json").write_text(json.dumps(document | {"weights_sha256": ""}))
    with pytest.raises(VggOnnxError, match="no weights_sha256, so its integrity cannot be checked"):
        import_weights(str(path), CONFIG)


@pytest.mark.parametrize("kind", ["truncated_pth", "truncated_npz", "truncated_safetensors", "text", "pickle_object",
                                  "not_tensors", "no_vgg_names"])
def test_bad_files_give_one_line(tmp_path, kind):
    model = small()
    path = tmp_path / "w.pth"
    if kind == "truncated_pth":
        torch.save(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "truncated_npz":
        path = tmp_path / "w.npz"
        np.savez(path, **caffe_arrays(model))
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "truncated_safetensors":
        path = tmp_path / "w.safetensors"
        save_file(model.state_dict(), str(path))
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "text":
        path.write_text("hello, I am not a weights file\n")
    elif kind == "pickle_object":
        path.write_bytes(pickle.dumps({"features.0.weight": Exception("arbitrary object")}))
    elif kind == "not_tensors":
        torch.save({"features.0.weight": [1, 2, 3]}, path)
    else:
        torch.save({"layer.weight": torch.zeros(3)}, path)
    with pytest.raises(VggOnnxError) as error:
        import_weights(str(path), CONFIG)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
