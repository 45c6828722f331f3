"""--init-from: start a net from a trained one, as the paper started the deeper nets from net A.

Different configs: the first four conv layers of the source (A: conv1_1, conv2_1, conv3_1,
conv3_2) go to the layers of the same names in the target (whose shapes they match), and the
three FC layers are copied; the rest keeps its random initialisation. Equal configs (S=384
from S=256): every tensor whose shape matches is copied.
"""

from __future__ import annotations

import os

import torch

from vgg_onnx.configs import FC_STATE_KEYS, parse_config
from vgg_onnx.errors import UsageError, VggOnnxError

from .checkpoint import load_trained
from .model import VGG

FIRST_CONVS = 4


def init_from_checkpoint(model: VGG, weights_path: str) -> str:
    """Copy layers from a trained checkpoint (ours: weights + JSON beside them); returns what was done."""
    if not os.path.isfile(weights_path):  # before its JSON, which would otherwise be the file named missing
        raise UsageError(f"--init-from {weights_path}: no such file")
    source, info = load_trained(weights_path)
    source_config = parse_config(info.config)
    target = model.state_dict()
    if source_config == model.config:
        copied = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
        skipped = sorted(set(target) - set(copied))
        if not copied:
            raise UsageError(f"--init-from {weights_path}: no tensor fits this model (width or classes differ)")
        note = f"initialised all {len(copied)} matching tensors from {weights_path}"
        note += f" (kept random: {', '.join(skipped)})" if skipped else ""
    else:
        target_prefixes = {conv.name: conv.state_key for conv in model.config.conv_layers()}
        pairs = [(conv.name, conv.state_key, target_prefixes.get(conv.name))
                 for conv in source_config.conv_layers()[:FIRST_CONVS]]
        pairs += [(key, key, key) for key in FC_STATE_KEYS.values()]
        copied = {}
        for name, src, dst in pairs:
            if dst is None:
                raise UsageError(f"--init-from {weights_path}: config {model.config.name} has no layer {name}")
            for suffix in (".weight", ".bias"):
                tensor = source.get(src + suffix)
                if tensor is None:
                    raise VggOnnxError(f"{weights_path}: missing {src + suffix} (not a VGG-{info.config} state dict)")
                if tensor.shape != target[dst + suffix].shape:
                    raise UsageError(f"--init-from {weights_path}: {name} has shape {tuple(tensor.shape)}, this model "
                                     f"needs {tuple(target[dst + suffix].shape)} (width, crop and classes must match)")
                copied[dst + suffix] = tensor
        note = (f"initialised {', '.join(n for n, _, _ in pairs[:FIRST_CONVS])}, fc6, fc7, fc8 from "
                f"VGG-{info.config} {weights_path}; other layers random")
    with torch.no_grad():
        for key, tensor in copied.items():
            target[key].copy_(tensor)
    return note
