"""Training checkpoints: weights as safetensors, a JSON beside them, the optimizer state alongside.

RUN_DIR/<name>.safetensors  the model's state dict (torchvision keys), float32
RUN_DIR/<name>.json         ModelInfo.to_json_dict() (what `vgg-onnx export --weights` reads)
                            plus "training": epoch, step, lr, metrics, seeds, colour statistics, args
RUN_DIR/<name>.optim.pt     the optimizer's state dict (read with torch.load(weights_only=True))

The three files are written to temporary files and fsynced first, then renamed (the JSON
last): a failure while writing (a full disk) leaves the previous checkpoint whole. The JSON
holds the sha256 of the weights and the optimizer file its step, so files that do not belong
together are refused on loading. Before the renames the current files are hard-linked to
RUN_DIR/.<file>.prev, so a kill between two renames (a preempted machine) still leaves one
whole generation: load_newest_whole falls back to it and restores it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vgg_onnx.errors import VggOnnxError
from vgg_onnx.metadata import ModelInfo

__all__ = ["json_path_for", "load_checkpoint", "load_newest_whole", "load_trained", "load_weights", "paths",
           "read_json", "save_checkpoint"]

WEIGHTS_SUFFIX = ".safetensors"
OPTIM_SUFFIX = ".optim.pt"
PREVIOUS_SUFFIX = ".prev"
MAX_JSON_BYTES = 64 << 20  # a checkpoint's JSON is a few hundred KB (the class list); refuse far larger


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


def _previous(path: str) -> str:
    """RUN_DIR/last.json -> RUN_DIR/.last.json.prev: the generation before the newest save."""
    folder, name = os.path.split(path)
    return os.path.join(folder, "." + name + PREVIOUS_SUFFIX)


def _link_or_copy(source: str, target: str) -> None:
    """Make `target` hold `source`'s bytes, atomically (a hard link where the file system has them)."""
    if os.path.exists(target) and os.path.samefile(source, target):
        return  # already one file (a rename between two links of it would do nothing and keep the temporary)
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, "." + name + ".link.tmp")  # hidden *.tmp: a run started later removes leftovers
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links (some network file systems): a copy does the same
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _commit(tmp: str, path: str) -> None:
    # the one place a new checkpoint file replaces the old (tests stall here to kill a run mid-save)
    os.replace(tmp, path)


def _keep_previous(files: list[str]) -> None:
    """Link the current files to their `.prev` names before any of them is replaced: a kill between
    the renames of a save then leaves a whole previous generation to resume from."""
    if not all(os.path.exists(path) for path in files):
        return  # the first save of this name: nothing to keep
    for path in files:
        _link_or_copy(path, _previous(path))


def save_checkpoint(run_dir: str, name: str, state_dict: dict, info: ModelInfo, training: dict,
                    optim_state: dict | None) -> None:
    """Write <name>.safetensors, <name>.optim.pt and <name>.json together, or none of them."""
    weights_path, json_path, optim_path = paths(run_dir, name)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    info.weights_source = os.path.basename(weights_path)
    info.weights_sha256 = hashlib.sha256(weights).hexdigest()
    document = info.to_json_dict()
    document["training"] = training
    text = json.dumps(document, indent=1) + "\n"
    files = [(weights_path, weights)]
    if optim_state is not None:
        buffer = io.BytesIO()
        torch.save({"optimizer": optim_state, "step": training.get("step")}, buffer)
        files.append((optim_path, buffer.getvalue()))
    files.append((json_path, text.encode("utf-8")))  # the JSON last: it commits the generation
    temps: list[str] = []
    try:
        for path, data in files:  # every file written and fsynced before the first rename
            fd, tmp = tempfile.mkstemp(dir=run_dir, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
            os.close(fd)
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a checkpoint is an ordinary file
            temps.append(tmp)
            _write(tmp, data)
        _keep_previous([path for path, _ in files])
        for tmp, (path, _) in zip(temps, files):
            _commit(tmp, path)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def read_json(path: str) -> dict:
    """A checkpoint's JSON document (the one reader of it: training, --resume, --init-from, export)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise VggOnnxError(f"{path}: missing (a checkpoint's JSON beside its weights)") from None
    except OSError as e:
        raise VggOnnxError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(text) > MAX_JSON_BYTES:
        raise VggOnnxError(f"{path}: over {MAX_JSON_BYTES >> 20} MiB, too large for a checkpoint's JSON")
    try:
        document = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise VggOnnxError(f"{path}: not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(document, dict):
        raise VggOnnxError(f"{path}: not a vgg-onnx checkpoint description (not a JSON object)")
    return document


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
    return _load_files(weights_path, json_path, optim_path if with_optimizer else None)


def load_trained(weights_path: str) -> tuple[dict, ModelInfo]:
    """A checkpoint's weights and description (X.safetensors and X.json), checked to belong together."""
    state, _, info = _load_checked(weights_path, json_path_for(weights_path))
    return state, info


def _load_checked(weights_path: str, json_path: str) -> tuple[dict, dict, ModelInfo]:
    """(weights, JSON document, its ModelInfo), the weights checked against the document's hash."""
    document = read_json(json_path)
    info = ModelInfo.from_json_dict(document, json_path)
    if not info.weights_sha256:  # an empty hash must not switch the integrity check off
        raise VggOnnxError(f"{json_path}: no weights_sha256 (the weights cannot be checked against it)")
    return load_weights(weights_path, info.weights_sha256), document, info


def _load_files(weights_path: str, json_path: str, optim_path: str | None):
    state, document, _ = _load_checked(weights_path, json_path)
    if optim_path is None:
        return state, document, None
    try:
        optim_state = torch.load(optim_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VggOnnxError(f"{optim_path}: missing (the optimizer state of {weights_path})") from None
    except Exception as e:
        raise VggOnnxError(f"{optim_path}: cannot load optimizer state ({e})") from None
    training = document.get("training")
    if not isinstance(optim_state, dict) or not isinstance(training, dict) or optim_state.get("step") != training.get("step"):
        raise VggOnnxError(f"{optim_path}: belongs to another step than {json_path}")
    return state, document, optim_state["optimizer"]


def load_newest_whole(run_dir: str, name: str):
    """Like load_checkpoint, but a generation that a kill left mixed (some files renamed, some not)
    gives way to the previous one, which is then restored under the normal names.

    Returns (state_dict, document, optimizer state, note); note is "" or says what was restored.
    """
    current = paths(run_dir, name)
    try:
        return (*_load_files(*current), "")
    except VggOnnxError as error:
        failure = str(error)
        previous = [_previous(path) for path in current]
        if not all(os.path.exists(path) for path in previous):
            raise
        try:
            loaded = _load_files(*previous)
        except VggOnnxError:
            raise error from None
    for source, target in zip(previous, current):  # weights, optimizer, then the JSON that commits them
        _link_or_copy(source, target)
    step = loaded[1]["training"].get("step")
    return (*loaded, f"{current[1]} was left mixed by an interrupted save ({failure}); "
                     f"restored the previous checkpoint (step {step})")
