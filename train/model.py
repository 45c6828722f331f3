"""The VGG network built from the configuration table, with torchvision's state-dict layout.

Keys are torchvision's (`features.<i>.*`, `classifier.0/3/6.*`), so torchvision's vgg11/13/16/19
(and `_bn`) checkpoints load as they are. This is the FC form used in training; export
rewrites the classifier into convolutions for dense evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from vgg_onnx.configs import (DEFAULT_CROP, FC_STATE_KEYS, FC_WIDTH, IMAGENET_CLASSES, LRN_PARAMS, NUM_POOLS,
                              Config, LrnSpec, PoolSpec, check_crop, parse_config, scaled_channels)
from vgg_onnx.params import INIT_METHODS


class _LrnFunction(torch.autograd.Function):
    """y = x * d^-beta, d = k + alpha/size * (sum of x^2 over `size` neighbouring channels), with a
    hand-written backward: torch's LocalResponseNorm goes through avg_pool3d and its autograd, twice as
    slow on CPU (forward and backward of a 128-image batch at width 1/8 and crop 128, one thread: 1.6 s
    against 0.8 s; a whole A-LRN training step at two threads: 64 against 75 images/s)."""

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float):
        d = _channel_window_sum(x * x, size, size // 2).mul_(alpha / size).add_(k)
        scale = d.pow(-beta)
        ctx.save_for_backward(x, d, scale)
        ctx.params = (size, alpha, beta)
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        x, d, scale = ctx.saved_tensors
        size, alpha, beta = ctx.params
        # dy_i/dx_j = [i == j] d_i^-beta - 2 beta alpha/size x_i x_j d_i^(-beta-1) for j in i's window,
        # so channel j gathers the term from every i whose window holds j (the window mirrored)
        through_d = _channel_window_sum(grad * x * scale / d, size, (size - 1) // 2)
        return grad * scale - (2 * beta * alpha / size) * x * through_d, None, None, None, None


def _channel_window_sum(x: torch.Tensor, size: int, before: int) -> torch.Tensor:
    """Sum over channels c-before .. c-before+size-1 (zeros outside), for each channel c: one matmul
    with a band matrix over the channel axis (faster than summing shifted slices, in either layout)."""
    index = torch.arange(x.shape[1], device=x.device)
    offset = index[:, None] - index[None, :] + before  # band[j, c] = 1 when channel j is in c's window
    band = ((offset >= 0) & (offset < size)).to(x.dtype)
    return (x.permute(0, 2, 3, 1) @ band).permute(0, 3, 1, 2)


class LocalResponseNorm(nn.LocalResponseNorm):
    """torch's LocalResponseNorm (same parameters, same result to float rounding), faster to train."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LrnFunction.apply(x, self.size, self.alpha, self.beta, self.k)


def make_features(config: Config, width_mult: float = 1.0) -> nn.Sequential:
    """The conv part from the config's layer specs, in torchvision's module order (the specs' state keys)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for layer in config.feature_layers():
        if isinstance(layer, PoolSpec):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif isinstance(layer, LrnSpec):
            layers.append(LocalResponseNorm(**LRN_PARAMS))
        else:
            channels = scaled_channels(layer.out_channels, width_mult)
            layers.append(nn.Conv2d(in_channels, channels, kernel_size=layer.kernel, padding=layer.padding))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG in FC form: features -> flatten (C,H,W order) -> fc6 -> fc7 -> fc8."""

    def __init__(self, config: str | Config = "D", num_classes: int = IMAGENET_CLASSES,
                 width_mult: float = 1.0, crop_size: int = DEFAULT_CROP, dropout: float = 0.5,
                 batch_norm: bool | None = None):
        super().__init__()
        config = parse_config(config) if isinstance(config, str) else config
        if batch_norm is not None and batch_norm != config.batch_norm:
            config = parse_config(config.base + ("-BN" if batch_norm else ""))
        self.config = config
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.crop_size = check_crop(crop_size)
        self.fc6_kernel = crop_size // 2 ** NUM_POOLS  # 7 for 224
        self.features = make_features(config, width_mult)
        last_channels = self.features[-4 if config.batch_norm else -3].out_channels
        hidden = scaled_channels(FC_WIDTH, width_mult)
        self.classifier = nn.Sequential(  # module indices 0, 3, 6: configs.FC_STATE_KEYS
            nn.Linear(last_channels * self.fc6_kernel ** 2, hidden),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),  # fc8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-2:] != (self.fc6_kernel, self.fc6_kernel):
            raise ValueError(f"FC form needs {self.crop_size}x{self.crop_size} input, "
                             f"got {x.shape[-2] * 32}x{x.shape[-1] * 32}; use the conv form for dense evaluation")
        return self.classifier(torch.flatten(x, 1))

    def conv_layers(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def fc_layers(self) -> list[nn.Linear]:
        return [self.get_submodule(key) for key in FC_STATE_KEYS.values()]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_weights(model: VGG, method: str = "glorot", generator: torch.Generator | None = None) -> VGG:
    """The paper's initialisations: Gaussian std 0.01 (the authors' Caffe solver) or Glorot; biases zero."""
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init {method!r}: {' or '.join(INIT_METHODS)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if method == "gaussian":
                nn.init.normal_(m.weight, 0.0, 0.01, generator=generator)
            else:
                nn.init.xavier_uniform_(m.weight, generator=generator)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
