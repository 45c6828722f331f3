"""The paper's Table 1 as one configuration table, in the style of torchvision's `cfgs`.

Layer codes: an int is a 3x3 conv (stride 1, padding 1) with that many output channels,
("1x1", n) a 1x1 conv (padding 0, config C), "M" a 2x2 max-pool with stride 2 and "LRN"
AlexNet's local response normalisation (config A-LRN). Every conv is followed by ReLU
(and by batch norm first in the "-BN" variants, as in torchvision's vgg*_bn).

`Config.feature_layers()` and `fc_layers()` walk the table once into typed layer specs, with
Caffe's layer names and torchvision's state-dict keys; the torch model, the weight import, the
compiler and the FLOP count all build on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .errors import UsageError

__all__ = ["CFGS", "CONFIG_ALIASES", "Config", "ConvSpec", "DEFAULT_CROP", "FC_STATE_KEYS", "FC_WIDTH",
           "IMAGENET_CLASSES", "LRN_PARAMS", "LayerSpec", "LrnSpec", "NUM_POOLS", "PoolSpec", "check_crop",
           "config_depth", "config_names", "describe_configs", "fc_layers", "parse_config", "scaled_channels",
           "score_map_size"]

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

@dataclass(frozen=True)
class ConvSpec:
    """One conv of the network, fc6-fc8 included (they are convs in the compiled graph)."""

    name: str  # Caffe's: conv1_1 ... conv5_4, fc6, fc7, fc8
    out_channels: int  # Table 1's, before any width multiplier (fc8: the class count)
    kernel: int  # 3, or 1 for config C's 1x1 convs; fc6: crop/32; fc7, fc8: 1
    padding: int
    state_key: str  # torchvision's state-dict prefix: features.<i> or classifier.<i>
    batch_norm_key: str | None = None  # the batch norm after it in the -BN variants


@dataclass(frozen=True)
class PoolSpec:
    """A 2x2 max-pool with stride 2, ending block `name[-1]`."""

    name: str  # pool1 ... pool5


@dataclass(frozen=True)
class LrnSpec:
    """AlexNet's local response normalisation (config A-LRN) with LRN_PARAMS."""

    name: str  # norm1


LayerSpec = Union[ConvSpec, PoolSpec, LrnSpec]

# torchvision's classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
FC_STATE_KEYS = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}


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

    def feature_layers(self) -> list[LayerSpec]:
        """The conv part of the network, walked once: Caffe-style names by block and position, and
        torchvision's module order (conv, [batch norm], ReLU per conv; one module per pool and LRN)."""
        out: list[LayerSpec] = []
        block, pos, index = 1, 0, 0
        for layer in self.layers:
            if layer == "M":
                out.append(PoolSpec(f"pool{block}"))
                block, pos, index = block + 1, 0, index + 1
            elif layer == "LRN":
                out.append(LrnSpec(f"norm{block}"))
                index += 1
            else:
                pos += 1
                channels, kernel = (layer[1], 1) if isinstance(layer, tuple) else (layer, 3)
                bn_key = f"features.{index + 1}" if self.batch_norm else None
                out.append(ConvSpec(f"conv{block}_{pos}", channels, kernel, kernel // 2, f"features.{index}", bn_key))
                index += 3 if self.batch_norm else 2
        return out

    def conv_layers(self) -> list[ConvSpec]:
        """Every conv of the feature part, in order."""
        return [layer for layer in self.feature_layers() if isinstance(layer, ConvSpec)]


def fc_layers(crop: int | None = None, num_classes: int | None = None) -> list[ConvSpec]:
    """fc6, fc7, fc8 as the convs the compiler makes of them: fc6 (crop/32)x(crop/32), fc7 and fc8 1x1."""
    crop = DEFAULT_CROP if crop is None else crop
    num_classes = IMAGENET_CLASSES if num_classes is None else num_classes
    return [ConvSpec("fc6", FC_WIDTH, crop // 2 ** NUM_POOLS, 0, FC_STATE_KEYS["fc6"]),
            ConvSpec("fc7", FC_WIDTH, 1, 0, FC_STATE_KEYS["fc7"]),
            ConvSpec("fc8", num_classes, 1, 0, FC_STATE_KEYS["fc8"])]


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
