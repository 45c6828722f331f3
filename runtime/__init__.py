"""Runtime stage: the paper's test protocol on ONNX Runtime and OpenCV. Imports no torch.

The Python API (docs/api.md): `load_model` a compiled model, `Model.classify` an image (path,
encoded bytes or RGB array), `fuse` several models; the protocol's arithmetic is in
`vgg_onnx.runtime.protocol`.
"""

from vgg_onnx.errors import UsageError, VggOnnxError

from .api import Classification, ImageError, Model, Prediction, fuse, load_model
from .protocol import METHODS

__all__ = ["load_model", "fuse", "Model", "Classification", "Prediction", "ImageError", "VggOnnxError",
           "UsageError", "METHODS"]
