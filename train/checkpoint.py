"""Training checkpoints: weights as safetensors, a JSON beside them, the optimizer state alongside.

RUN_DIR/<name>.safetensors  the model's state dict (torchvision keys), float32
RUN_DIR/<name>.json         ModelInfo.to_json_dict() (what `vgg-onnx export --weights` reads)
                            plus "training": epoch, step, lr, metrics, seeds, colour statistics, args
RUN_DIR/<name>.optim.pt     the optimizer's state dict (read with torch.load(weights_only=True))

The three files are written to temporary files and fsynced first, then renamed: a failure
while writing (a full disk) leaves the previous checkpoint whole. The JSON holds the sha256
of the weights, so a checkpoint whose files do not belong together is refused on loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vgg_onnx.atomic import atomic_path
from vgg_onnx.errors import VggOnnxError
from vgg_onnx.metadata import ModelInfo

WEIGHTS_SUFFIX = ".safetensors"
OPTIM_SUFFIX = ".optim.pt"


def paths(run_dir: str, name: str) -> tuple[str, str, str]:
    base = os.path.join(run_dir, name)
    return base + WEIGHTS_SUFFIX, base + ".json", base + OPTIM_SUFFIX


def json_path_for(weights_path: str) -> str:
    """RUN_DIR/best.safetensors -> RUN_DIR/best.json"""
    stem = weights_path[:-len(WEIGHTS_SUFFIX)] if weights_path.endswith(WEIGHTS_SUFFIX) else weights_path
    return stem + ".json"


def _write(path: str, data: bytes) -> None:
    # the one place checkpoint bytes reach the disk (tests make it fail as a full disk would)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str, name: str, state_dict: dict, info: ModelInfo, training: dict,
                    optim_state: dict | None) -> None:
    """Write <name>.safetensors, <name>.json and <name>.optim.pt together, or none of them."""
    weights_path, json_path, optim_path = paths(run_dir, name)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    info.weights_source = os.path.basename(weights_path)
    info.weights_sha256 = hashlib.sha256(weights).hexdigest()
    document = info.to_json_dict()
    document["training"] = training
    text = json.dumps(document, indent=1) + "\n"
    files = [(weights_path, weights), (json_path, text.encode("utf-8"))]
    if optim_state is not None:
        buffer = io.BytesIO()
        torch.save({"optimizer": optim_state, "step": training.get("step")}, buffer)
        files.insert(1, (optim_path, buffer.getvalue()))
    # every temporary file is written and fsynced before the first rename; the JSON goes last
    with contextlib.ExitStack() as stack:
        temps = [(stack.enter_context(atomic_path(path)), data) for path, data in reversed(files)]
        for tmp, data in temps:
            _write(tmp, data)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise VggOnnxError(f"{path}: missing (a checkpoint's JSON beside its weights)") from None
    except OSError as e:
        raise VggOnnxError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise VggOnnxError(f"{path}: not JSON ({e})") from None


def load_weights(weights_path: str, expected_sha256: str = "") -> dict[str, torch.Tensor]:
    try:
        with open(weights_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise VggOnnxError(f"{weights_path}: cannot read: {e.strerror or e}") from None
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise VggOnnxError(f"{weights_path}: does not match the sha256 in its JSON (an incomplete or mixed checkpoint)")
    try:
        return load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise VggOnnxError(f"{weights_path}: not a safetensors file ({e})") from None


def load_checkpoint(run_dir: str, name: str, with_optimizer: bool = True):
    """(state_dict, JSON document, optimizer state or None), checked to belong together."""
    weights_path, json_path, optim_path = paths(run_dir, name)
    document = read_json(json_path)
    info = ModelInfo.from_json_dict(document, json_path)
    state = load_weights(weights_path, info.weights_sha256)
    optim_state = None
    if with_optimizer:
        try:
            optim_state = torch.load(optim_path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise VggOnnxError(f"{optim_path}: missing (the optimizer state of {weights_path})") from None
        except Exception as e:
            raise VggOnnxError(f"{optim_path}: cannot load optimizer state ({e})") from None
        if not isinstance(optim_state, dict) or optim_state.get("step") != document.get("training", {}).get("step"):
            raise VggOnnxError(f"{optim_path}: belongs to another step than {json_path}")
        optim_state = optim_state["optimizer"]
    return state, document, optim_state
