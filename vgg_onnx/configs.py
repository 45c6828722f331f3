"""The paper's Table 1 as one configuration table, in the style of torchvision's `cfgs`.

Layer codes: an int is a 3x3 conv (stride 1, padding 1) with that many output channels,
("1x1", n) a 1x1 conv (padding 0, config C), "M" a 2x2 max-pool with stride 2 and "LRN"
AlexNet's local response normalisation (config A-LRN). Every conv is followed by ReLU
(and by batch norm first in the "-BN" variants, as in torchvision's vgg*_bn).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

__all__ = ["CFGS", "CONFIG_ALIASES", "Config", "DEFAULT_CROP", "FC_WIDTH", "IMAGENET_CLASSES", "check_crop",
           "config_depth", "config_names", "describe_configs", "parse_config", "scaled_channels", "score_map_size"]

CFGS: dict[str, list] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, ("1x1", 256), "M",
          512, 512, ("1x1", 512), "M", 512, 512, ("1x1", 512), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# AlexNet's LRN as the paper uses it. torch's LocalResponseNorm and ONNX's LRN both divide
# alpha by `size`, as Caffe did, so the trained net and the exported graph agree.
LRN_PARAMS = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}

FC_WIDTH = 4096  # fc6 and fc7 outputs
NUM_POOLS = 5  # the network's total stride is 2**5 = 32
DEFAULT_CROP = 224  # the training crop; fc6 becomes a (crop/32) x (crop/32) conv
IMAGENET_CLASSES = 1000

# torchvision's names for the same architectures, for its checkpoints.
TORCHVISION_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}

# Caffe's layer names (conv1_1 ... conv5_4, fc6, fc7, fc8) follow block and position.


@dataclass(frozen=True)
class Config:
    """A parsed configuration name such as "D" or "D-BN"."""

    name: str  # canonical: "D-BN" for "d-bn" or "vgg16_bn"
    base: str  # the Table 1 column: "D"
    batch_norm: bool

    @property
    def layers(self) -> list:
        return CFGS[self.base]

    @property
    def has_lrn(self) -> bool:
        return "LRN" in self.layers

    def conv_state_keys(self) -> list[tuple[str, str]]:
        """(Caffe name, torchvision state-dict prefix "features.<i>") of every conv, in order.

        The module order is train.model.make_features': conv, [batch norm], ReLU per conv;
        one module per "M" and "LRN".
        """
        names = [name for name, _, _ in self.conv_layers()]
        out, index = [], 0
        for layer in self.layers:
            if layer in ("M", "LRN"):
                index += 1
                continue
            out.append((names[len(out)], f"features.{index}"))
            index += 3 if self.batch_norm else 2
        return out

    def conv_layers(self) -> list[tuple[str, int, int]]:
        """(caffe name, out channels, kernel size) of every conv, in order."""
        out, block, pos = [], 1, 0
        for layer in self.layers:
            if layer == "M":
                block, pos = block + 1, 0
            elif layer != "LRN":
                pos += 1
                channels, kernel = (layer[1], 1) if isinstance(layer, tuple) else (layer, 3)
                out.append((f"conv{block}_{pos}", channels, kernel))
        return out


def config_names() -> list[str]:
    """Every valid configuration name: Table 1 plus the batch-norm extension."""
    return list(CFGS) + [f"{name}-BN" for name in CFGS if name != "A-LRN"]


def config_depth(base: str) -> int:
    """Weight layers of a Table 1 column: its convs plus the three FC layers (A: 11 ... E: 19)."""
    return sum(1 for layer in CFGS[base] if layer not in ("M", "LRN")) + 3


# torchvision's names, as people know them: vgg16 -> D, vgg16_bn -> D-BN
CONFIG_ALIASES = {name: base for base, name in TORCHVISION_NAMES.items()}
CONFIG_ALIASES.update({f"{name}_bn": f"{base}-BN" for base, name in TORCHVISION_NAMES.items()})


def describe_configs() -> str:
    """The valid names with their depths, for error messages and help texts."""
    depths = ", ".join(str(config_depth(base)) for base in CFGS)
    aliases = ", ".join(f"{alias}={base}" for base, alias in TORCHVISION_NAMES.items())
    return (f"{', '.join(CFGS)} with {depths} weight layers (torchvision's names: {aliases}); "
            "X-BN or vgg16_bn etc. with batch norm (not A-LRN)")


def parse_config(name: str) -> Config:
    """A configuration by its Table 1 name ("D", "d-bn") or torchvision's ("vgg16", "vgg16_bn")."""
    canonical = CONFIG_ALIASES.get(name.strip().lower(), name).strip().upper()
    if canonical.endswith("-BN") and canonical[:-3] in CFGS and canonical != "A-LRN-BN":
        return Config(canonical, canonical[:-3], True)
    if canonical in CFGS:
        return Config(canonical, canonical, False)
    raise UsageError(f"unknown config {name!r}; valid configs: {describe_configs()}")


def check_crop(crop: int) -> int:
    if crop < 32 or crop % 32:
        raise UsageError(f"crop size {crop} is not a positive multiple of 32 (the network's stride)")
    return crop


def score_map_size(height: int, width: int, crop: int) -> tuple[int, int]:
    """(h, w) of the class score map for an HxW input: five halvings, then fc6's (crop/32)-wide conv."""
    k = crop // 2 ** NUM_POOLS
    h, w = height >> NUM_POOLS, width >> NUM_POOLS
    if h < k or w < k:
        raise ValueError(f"input {height}x{width} is smaller than the crop size {crop}")
    return h - k + 1, w - k + 1


def scaled_channels(channels: int, width_mult: float) -> int:
    """Channel count under a width multiplier (used for small, fast test models)."""
    return max(1, int(round(channels * width_mult)))
