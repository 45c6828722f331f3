"""Runtime stage: the paper's test protocol on ONNX Runtime and OpenCV. Imports no torch."""
