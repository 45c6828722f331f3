"""The values the commands take, each parsed and checked once, where it enters.

Click parameter types for the command line (a config name, a crop size, training scales) and
the closed choices (initialisations, weight formats). They raise the project's UsageError, so a
bad value is one line naming the option (vgg_onnx/cli.py prints it) before any slow import; the
code behind the command takes the parsed values as they are.
"""

from __future__ import annotations

import click

from .configs import Config, check_crop, parse_config
from .errors import UsageError
from .scales import check_train_scales, parse_scales

__all__ = ["CONFIG", "CROP", "INIT_METHODS", "TRAIN_SCALES", "WEIGHT_FORMATS", "ConfigType", "CropType",
           "TrainScalesType"]

INIT_METHODS = ("gaussian", "glorot")  # the paper's Gaussian std 0.01, or Glorot's uniform
WEIGHT_FORMATS = ("auto", "torchvision", "caffe", "checkpoint")


class ConfigType(click.ParamType):
    """A configuration name (Table 1's "D", "d-bn", torchvision's "vgg16") -> its canonical name."""

    name = "config"

    def convert(self, value, param, ctx) -> str:
        return value.name if isinstance(value, Config) else parse_config(value).name


class CropType(click.ParamType):
    """A crop size: a positive multiple of 32."""

    name = "crop"

    def convert(self, value, param, ctx) -> int:
        try:
            crop = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"--crop {value!r}: not an integer") from None
        return check_crop(crop)


class TrainScalesType(click.ParamType):
    """Training scales "S" or "SMIN,SMAX" (SMIN < SMAX) -> [S] or [Smin, Smax]."""

    name = "scales"

    def convert(self, value, param, ctx) -> list[int]:
        scales = value if isinstance(value, list) else parse_scales(value)
        return check_train_scales(scales)


CONFIG, CROP, TRAIN_SCALES = ConfigType(), CropType(), TrainScalesType()
