"""vgg-onnx: train, compile to ONNX and deploy the VGG networks of Simonyan & Zisserman (2015)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
