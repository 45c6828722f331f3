"""The compiler: VGG (FC form) -> one verified, dynamic-shape ONNX graph with its own preprocessing."""
