"""Training stage (PyTorch): the VGG model, weight import and the paper's training recipe."""
