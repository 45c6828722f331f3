"""Weight import, for export: a file -> a VGG module (torchvision state-dict layout), checked against a config.

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
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from vgg_onnx.configs import (DEFAULT_CROP, FC_STATE_KEYS, IMAGENET_CLASSES, NUM_POOLS, Config, parse_config,
                              scaled_channels)
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.metadata import FORMAT_KEY, ModelInfo
from vgg_onnx.params import WEIGHT_FORMATS
from vgg_onnx.train.checkpoint import WEIGHTS_SUFFIX, json_path_for, read_json
from vgg_onnx.train.model import VGG

__all__ = ["ImportedWeights", "build_model", "caffe_to_torchvision", "check_consistency", "check_shapes",
           "checkpoint_json", "detect_format", "file_sha256", "import_weights", "infer_dimensions", "read_checkpoint_info"]

# deflate shrinks trained float weights by a few percent, zeros by up to 1000:1; more than this
# ratio is not weights but a zip bomb, refused before it is decompressed
MAX_NPZ_RATIO = 16
# a checkpoint's JSON: metadata and class names (ImageNet-21k's 21,841 take about 2 MiB)
NPY_HEADER_MAX = 10_000  # bytes; numpy's own default bound on a .npy header
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
CAFFE_KEY = re.compile(r"^(conv\d+_\d+|fc[678])[._/](weight|bias|w|b|0|1)$", re.IGNORECASE)


@dataclass
class ImportedWeights:
    state_dict: dict  # torchvision keys, float32 tensors
    format: str  # torchvision | caffe | checkpoint
    source: str  # the file's name, for the model's metadata
    sha256: str
    info: ModelInfo | None = None  # a checkpoint's own description
    names: dict = field(default_factory=dict)  # torchvision key -> its name in the file, where they differ


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
    document = read_json(json_path)
    if FORMAT_KEY not in document:
        raise VggOnnxError(f"{json_path}: not a vgg-onnx checkpoint description")
    return ModelInfo.from_json_dict(document, json_path)


def _check_zip_members(path: str) -> None:
    """Refuse, before decompressing anything, a zip (.npz, zip-format .pth) whose members would
    expand far beyond what weights compress to: the declared sizes are what zipfile trusts."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.compress_type != zipfile.ZIP_STORED and \
                    member.file_size > MAX_NPZ_RATIO * member.compress_size + (1 << 20):
                raise VggOnnxError(f"{path}: {member.filename} would expand {member.compress_size} bytes to "
                                   f"{member.file_size}, more than weights compress (a zip bomb?); not decompressed")


def _npz_headers(path: str) -> dict:
    """{key: empty tensor on the meta device} from each .npy header in the archive, data untouched.

    Each member's declared size must be its header plus the data its shape and dtype imply, so
    the size zipfile decompresses to is the size the shape check below has accepted."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            key = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
            with archive.open(member) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = NPY_HEADER_READERS.get(version)
                    if read_header is None:
                        raise ValueError(f".npy format version {version[0]}.{version[1]}")
                    shape, _, dtype = read_header(f, max_header_size=NPY_HEADER_MAX)
                except ValueError as e:
                    raise VggOnnxError(f"{path}: {key} is not a .npy array ({_one_line(e)})") from None
                header_size = f.tell()
            if dtype.hasobject or dtype.kind not in "fiub":
                raise VggOnnxError(f"{path}: {key} holds {dtype}, not numbers")
            data_size = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if member.file_size != header_size + data_size:
                raise VggOnnxError(f"{path}: {key} declares {member.file_size} bytes but its header "
                                   f"({_shape(shape)} {dtype}) implies {header_size + data_size}; corrupt")
            headers[key] = torch.empty(shape, dtype=torch.float32, device="meta")
    return headers


def _to_torchvision(path: str, arrays: dict, names: dict, config: Config, fmt: str) -> tuple[dict, str]:
    """(the arrays under torchvision keys, the naming they were found in), checked against `fmt`."""
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
        arrays = caffe_to_torchvision(path, arrays, config, names)
    return arrays, found


def _precheck_npz(path: str, config: Config, fmt: str) -> None:
    """The .npz's shapes against the weights `config` expects, from the headers alone (no data)."""
    arrays, names = _check_tensors(path, _npz_headers(path))
    arrays, _ = _to_torchvision(path, arrays, names, config, fmt)
    found = infer_dimensions(arrays, config)
    check_shapes(path, arrays, config, found.get("num_classes", IMAGENET_CLASSES), found.get("width_mult", 1.0),
                 found.get("crop_size", DEFAULT_CROP), names)


def _read_arrays(path: str, config: Config, fmt: str) -> dict:
    """Every named tensor in the file, by its extension's reader; anything unreadable: one line."""
    name = os.path.basename(path)
    lower = name.lower()
    try:
        if lower.endswith(".npz"):
            _check_zip_members(path)
            _precheck_npz(path, config, fmt)
            with np.load(path, allow_pickle=False) as npz:
                return {key: torch.from_numpy(np.array(npz[key])) for key in npz.files}
        if lower.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        _check_zip_members(path)
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the load below succeeds or raises
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except VggOnnxError:
        raise
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


def _check_tensors(path: str, arrays: dict) -> tuple[dict, dict]:
    """(float32 tensors under their keys, DDP's `module.` dropped; {key: its name in the file})."""
    out, names = {}, {}
    for key, value in arrays.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise VggOnnxError(f"{path}: not a weights file (entry {key!r} is {type(value).__name__}, not a tensor)")
        source = key
        if key.startswith("module."):  # saved from DistributedDataParallel
            key = key[len("module."):]
        if value.is_floating_point():
            value = value.float()
        out[key] = value
        names[key] = source
    return out, names


def detect_format(arrays: dict) -> str | None:
    keys = list(arrays)
    if any(k.startswith(("features.", "classifier.")) for k in keys):
        return "torchvision"
    if any(CAFFE_KEY.match(k) for k in keys):
        return "caffe"
    return None


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def caffe_to_torchvision(path: str, arrays: dict, config: Config, names: dict | None = None) -> dict:
    """Caffe-named arrays -> torchvision keys for `config` (the first layer stays BGR).

    `names` ({key: name in the file}), when given, is updated to map the new keys to the file's names."""
    if config.batch_norm:
        raise UsageError(f"{path}: Caffe weights have no batch norm; use config {config.base}, not {config.name}")
    target = {conv.name: conv.state_key for conv in config.conv_layers()}
    conv_names = list(target)
    target.update(FC_STATE_KEYS)
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
        if part == "weight" and layer in FC_STATE_KEYS and value.dim() == 4:
            value = value.reshape(value.shape[0], -1)  # fc stored as its conv form: same C,H,W order
        out[f"{target[layer]}.{part}"] = value
        if names is not None:
            names[f"{target[layer]}.{part}"] = names.get(key, key)
    return out


def infer_dimensions(state_dict: dict, config: Config) -> dict:
    """num_classes, width_mult and crop_size implied by torchvision-layout weights (what can be read)."""
    found = {}
    convs = config.conv_layers()
    first, fc6, fc8 = (state_dict.get(f"{key}.weight") for key in
                       (convs[0].state_key, FC_STATE_KEYS["fc6"], FC_STATE_KEYS["fc8"]))
    if fc8 is not None and fc8.dim() == 2:
        found["num_classes"] = int(fc8.shape[0])
    if first is not None and first.dim() == 4:
        width = first.shape[0] / convs[0].out_channels
        found["width_mult"] = width
        last = scaled_channels(convs[-1].out_channels, width)
        if fc6 is not None and fc6.dim() == 2 and fc6.shape[1] % last == 0:
            k = round((fc6.shape[1] // last) ** 0.5)
            if k * k * last == fc6.shape[1]:
                found["crop_size"] = k * 2 ** NUM_POOLS
    return found


def _label(key: str, names: dict | None) -> str:
    """A key as the user can find it in the file: `conv2_1_W (features.3.weight)` when they differ."""
    source = (names or {}).get(key, key)
    return key if source == key else f"{source} ({key})"


def _layer_chain(state_dict: dict, config: Config) -> list[tuple[str, str, str | None]]:
    """(weight key, bias key, next layer's weight key or None) of each layer whose outputs feed the
    next layer directly (conv -> conv, fc -> fc): three tensors that must agree on one size."""
    convs = [conv.state_key for conv in config.conv_layers()]
    fcs = list(FC_STATE_KEYS.values())
    chain = list(zip(convs, convs[1:] + [None])) + list(zip(fcs, fcs[1:] + [None]))
    out = []
    for prefix, following in chain:
        weight, bias = f"{prefix}.weight", f"{prefix}.bias"
        if weight in state_dict and bias in state_dict and state_dict[weight].dim() >= 2:
            nxt = f"{following}.weight" if following else None
            out.append((weight, bias, nxt if nxt in state_dict and state_dict[nxt].dim() >= 2 else None))
    return out


def check_consistency(path: str, state_dict: dict, config: Config, names: dict | None = None) -> None:
    """A layer's weight, its bias and the next layer must agree on its number of outputs. When they
    don't, the odd one out is named: the tensor that is wrong, not one whose size was derived from it."""
    for weight, bias, nxt in _layer_chain(state_dict, config):
        outputs, biases = state_dict[weight].shape[0], state_dict[bias].numel()
        if outputs == biases:
            continue
        taken = state_dict[nxt].shape[1] if nxt else None
        if taken == biases:
            odd, why = weight, f"{_shape(state_dict[weight].shape)}, but {_label(bias, names)} and " \
                               f"{_label(nxt, names)} agree on {biases} outputs"
        elif taken == outputs:
            odd, why = bias, f"{_shape(state_dict[bias].shape)}, but {_label(weight, names)} and " \
                             f"{_label(nxt, names)} agree on {outputs} outputs"
        else:
            raise VggOnnxError(f"{path}: {_label(weight, names)} (shape {_shape(state_dict[weight].shape)}) and "
                               f"{_label(bias, names)} ({biases} entries) disagree on the number of outputs")
        raise VggOnnxError(f"{path}: {_label(odd, names)} has shape {why}")


def check_shapes(path: str, state_dict: dict, config: Config, num_classes: int, width_mult: float,
                 crop_size: int, names: dict | None = None) -> dict:
    """Every name and shape of `state_dict` against the config's; returns the expected (meta) state dict.

    Works on meta tensors too, so a file's shapes can be checked before its data is read."""
    check_consistency(path, state_dict, config, names)
    with torch.device("meta"):
        expected = VGG(config, num_classes, width_mult, crop_size).state_dict()
    what = f"config {config.name} with {num_classes} classes, width {width_mult:g}, crop {crop_size}"
    for key, tensor in expected.items():
        if key not in state_dict:
            raise VggOnnxError(f"{path}: weights don't match {what}: {key} is missing "
                               f"(expected shape {_shape(tensor.shape)})")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise VggOnnxError(f"{path}: weights don't match {what}: {_label(key, names)} has shape "
                               f"{_shape(state_dict[key].shape)}, expected {_shape(tensor.shape)}")
    extra = [key for key in state_dict if key not in expected]
    if extra:
        raise VggOnnxError(f"{path}: weights don't match {what}: unexpected {_label(extra[0], names)} "
                           f"(shape {_shape(state_dict[extra[0]].shape)}); the config has no such layer")
    return expected


def build_model(path: str, state_dict: dict, config: Config, num_classes: int, width_mult: float,
                crop_size: int, names: dict | None = None) -> VGG:
    """A VGG holding `state_dict`, after checking every name and shape against the config.

    `names` maps keys to the names in the file (ImportedWeights.names), so errors name what the user has."""
    expected = check_shapes(path, state_dict, config, num_classes, width_mult, crop_size, names)
    with torch.device("meta"):
        model = VGG(config, num_classes, width_mult, crop_size)
    model.load_state_dict({k: state_dict[k].to(expected[k].dtype) for k in expected}, assign=True)
    return model.eval()


def import_weights(path: str, config: str | Config, fmt: str = "auto") -> ImportedWeights:
    """Read `path` in format `fmt` into a torchvision-layout state dict for `config` (names not yet
    checked against shapes: see build_model)."""
    config = parse_config(config) if isinstance(config, str) else config
    if fmt not in WEIGHT_FORMATS:
        raise UsageError(f"unknown weights format {fmt!r}; valid: {', '.join(WEIGHT_FORMATS)}")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder, not a weights file")
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise VggOnnxError(f"{path}: not a regular file; weights are read from files")
    info = None
    if fmt == "checkpoint" or (fmt == "auto" and checkpoint_json(path)):
        info = read_checkpoint_info(path)
    try:
        sha256 = file_sha256(path)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a weights file") from None
    except OSError as e:
        raise VggOnnxError(f"{path}: cannot read: {e.strerror or e}") from None
    if info is not None and not info.weights_sha256:  # every checkpoint we write records it
        raise VggOnnxError(f"{path}: its JSON has no weights_sha256, so its integrity cannot be checked")
    if info is not None and info.weights_sha256 != sha256:
        raise VggOnnxError(f"{path}: does not match the sha256 in its JSON (an incomplete or mixed checkpoint)")
    arrays, names = _check_tensors(path, _read_arrays(path, config, fmt))
    arrays, found = _to_torchvision(path, arrays, names, config, fmt)
    kind = "checkpoint" if info is not None else found
    return ImportedWeights(arrays, kind, os.path.basename(path), sha256, info, names)
