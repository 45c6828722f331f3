"""Weights from a file -> a VGG module (torchvision state-dict layout), checked against a config.

Formats:
  torchvision  a .pth/.pt state dict with torchvision's keys (features.<i>.*, classifier.0/3/6.*),
               raw or inside {'state_dict': ...} / {'model': ...}; read with torch.load(weights_only=True)
  caffe        the original Caffe release as named arrays (conv1_1 ... conv5_4, fc6, fc7, fc8; any of
               `name.weight`, `name/weight`, `name_W` / `name.bias`, `name/bias`, `name_b`, `name.0`/`.1`)
               in .npz, .safetensors or a .pth dict. Its first layer reads BGR.
  checkpoint   ours: X.safetensors with X.json beside it (ModelInfo fields plus 'training')
  auto         checkpoint when the JSON is there, otherwise by the names inside the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from vgg_onnx.configs import NUM_POOLS, Config, parse_config, scaled_channels
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.metadata import FORMAT_KEY, ModelInfo
from vgg_onnx.train.checkpoint import WEIGHTS_SUFFIX, json_path_for
from vgg_onnx.train.model import VGG

FORMATS = ("auto", "torchvision", "caffe", "checkpoint")
CAFFE_KEY = re.compile(r"^(conv\d+_\d+|fc[678])[._/](weight|bias|w|b|0|1)$", re.IGNORECASE)
CAFFE_FC = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}


@dataclass
class LoadedWeights:
    state_dict: dict  # torchvision keys, float32 tensors
    format: str  # torchvision | caffe | checkpoint
    source: str  # the file's name, for the model's metadata
    sha256: str
    info: ModelInfo | None = None  # a checkpoint's own description


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_json(path: str) -> str | None:
    """X.safetensors -> X.json when that file exists (our checkpoints' layout, train/checkpoint.py)."""
    if not path.endswith(WEIGHTS_SUFFIX):
        return None
    json_path = json_path_for(path)
    return json_path if os.path.isfile(json_path) else None


def read_checkpoint_info(path: str) -> ModelInfo:
    json_path = checkpoint_json(path)
    if json_path is None:
        raise UsageError(f"{path}: not one of our checkpoints (those are X.safetensors with X.json beside it)")
    try:
        with open(json_path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VggOnnxError(f"{json_path}: cannot read the checkpoint's JSON ({_one_line(e)})") from None
    if not isinstance(document, dict) or FORMAT_KEY not in document:
        raise VggOnnxError(f"{json_path}: not a vgg-onnx checkpoint description")
    return ModelInfo.from_json_dict(document, json_path)


def _read_arrays(path: str) -> dict:
    """Every named tensor in the file, by its extension's reader; anything unreadable: one line."""
    name = os.path.basename(path)
    lower = name.lower()
    try:
        if lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                return {key: torch.from_numpy(np.array(npz[key])) for key in npz.files}
        if lower.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the load below succeeds or raises
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a weights file") from None
    except PermissionError:
        raise VggOnnxError(f"{path}: cannot read (permission denied)") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise VggOnnxError(f"{path}: truncated or corrupt ({_one_line(e)})") from None
    except Exception as e:  # torch, numpy and safetensors each raise their own types on bad files
        message = _one_line(e)
        if "Weights only load failed" in message or "Unsupported global" in str(e):
            raise VggOnnxError(f"{path}: holds Python objects other than tensors; refusing to unpickle them "
                               "(only torch.load(weights_only=True) is used)") from None
        raise VggOnnxError(f"{path}: not a readable weights file, or truncated ({message})") from None
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data:
        raise VggOnnxError(f"{path}: not a weights file (holds {type(data).__name__}, not a dict of named tensors)")
    return data


def _check_tensors(path: str, arrays: dict) -> dict:
    out = {}
    for key, value in arrays.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise VggOnnxError(f"{path}: not a weights file (entry {key!r} is {type(value).__name__}, not a tensor)")
        if key.startswith("module."):  # saved from DistributedDataParallel
            key = key[len("module."):]
        if value.is_floating_point():
            value = value.float()
        out[key] = value
    return out


def detect_format(arrays: dict) -> str | None:
    keys = list(arrays)
    if any(k.startswith(("features.", "classifier.")) for k in keys):
        return "torchvision"
    if any(CAFFE_KEY.match(k) for k in keys):
        return "caffe"
    return None


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def caffe_to_torchvision(path: str, arrays: dict, config: Config) -> dict:
    """Caffe-named arrays -> torchvision keys for `config` (the first layer stays BGR)."""
    if config.batch_norm:
        raise UsageError(f"{path}: Caffe weights have no batch norm; use config {config.base}, not {config.name}")
    target = dict(config.conv_state_keys())
    conv_names = list(target)
    target.update(CAFFE_FC)
    out = {}
    for key, value in arrays.items():
        match = CAFFE_KEY.match(key)
        if match is None:
            raise VggOnnxError(f"{path}: unexpected array {key!r} among Caffe-named weights")
        layer, part = match.group(1).lower(), match.group(2).lower()
        if layer not in target:
            raise VggOnnxError(f"{path}: layer {layer} does not exist in config {config.name} "
                               f"(its layers: {conv_names[0]} … {conv_names[-1]}, fc6, fc7, fc8)")
        part = "weight" if part in ("weight", "w", "0") else "bias"
        if part == "weight" and layer in CAFFE_FC and value.dim() == 4:
            value = value.reshape(value.shape[0], -1)  # fc stored as its conv form: same C,H,W order
        out[f"{target[layer]}.{part}"] = value
    return out


def infer_dimensions(state_dict: dict, config: Config) -> dict:
    """num_classes, width_mult and crop_size implied by torchvision-layout weights (what can be read)."""
    found = {}
    first, fc6, fc8 = state_dict.get("features.0.weight"), state_dict.get("classifier.0.weight"), \
        state_dict.get("classifier.6.weight")
    if fc8 is not None and fc8.dim() == 2:
        found["num_classes"] = int(fc8.shape[0])
    if first is not None and first.dim() == 4:
        width = first.shape[0] / config.conv_layers()[0][1]
        found["width_mult"] = width
        last = scaled_channels(config.conv_layers()[-1][1], width)
        if fc6 is not None and fc6.dim() == 2 and fc6.shape[1] % last == 0:
            k = round((fc6.shape[1] // last) ** 0.5)
            if k * k * last == fc6.shape[1]:
                found["crop_size"] = k * 2 ** NUM_POOLS
    return found


def build_model(path: str, state_dict: dict, config: Config, num_classes: int, width_mult: float,
                crop_size: int) -> VGG:
    """A VGG holding `state_dict`, after checking every name and shape against the config."""
    with torch.device("meta"):
        model = VGG(config, num_classes, width_mult, crop_size)
    expected = model.state_dict()
    what = f"config {config.name} with {num_classes} classes, width {width_mult:g}, crop {crop_size}"
    for key, tensor in expected.items():
        if key not in state_dict:
            raise VggOnnxError(f"{path}: weights don't match {what}: {key} is missing "
                               f"(expected shape {_shape(tensor.shape)})")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise VggOnnxError(f"{path}: weights don't match {what}: {key} has shape "
                               f"{_shape(state_dict[key].shape)}, expected {_shape(tensor.shape)}")
    extra = [key for key in state_dict if key not in expected]
    if extra:
        raise VggOnnxError(f"{path}: weights don't match {what}: unexpected {extra[0]} "
                           f"(shape {_shape(state_dict[extra[0]].shape)}); the config has no such layer")
    model.load_state_dict({k: state_dict[k].to(expected[k].dtype) for k in expected}, assign=True)
    return model.eval()


def load_weights(path: str, config: str | Config, fmt: str = "auto") -> LoadedWeights:
    """Read `path` in format `fmt` into a torchvision-layout state dict for `config` (names not yet
    checked against shapes: see build_model)."""
    config = parse_config(config) if isinstance(config, str) else config
    if fmt not in FORMATS:
        raise UsageError(f"unknown weights format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    info = None
    if fmt == "checkpoint" or (fmt == "auto" and checkpoint_json(path)):
        info = read_checkpoint_info(path)
    try:
        sha256 = file_sha256(path)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a weights file") from None
    except OSError as e:
        raise VggOnnxError(f"{path}: cannot read: {e.strerror or e}") from None
    if info is not None and info.weights_sha256 and info.weights_sha256 != sha256:
        raise VggOnnxError(f"{path}: does not match the sha256 in its JSON (an incomplete or mixed checkpoint)")
    arrays = _check_tensors(path, _read_arrays(path))
    found = detect_format(arrays)
    if found is None:
        sample = ", ".join(list(arrays)[:3])
        raise VggOnnxError(f"{path}: no VGG weights in it (names like {sample}; expected torchvision's "
                           "features.<i>.weight or Caffe's conv1_1 ... fc8)")
    if fmt == "caffe" and found != "caffe":
        raise UsageError(f"{path}: holds {found}-style names, not Caffe's (conv1_1 ... fc8); use --weights-format {found}")
    if fmt in ("torchvision", "checkpoint") and found != "torchvision":
        raise UsageError(f"{path}: holds Caffe-style names (conv1_1 ... fc8); use --weights-format caffe")
    if found == "caffe":
        arrays = caffe_to_torchvision(path, arrays, config)
    kind = "checkpoint" if info is not None else found
    return LoadedWeights(arrays, kind, os.path.basename(path), sha256, info)
