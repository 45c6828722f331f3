"""Reference outputs from torchvision itself, run under a separate interpreter that has it.

    python tests/torchvision_reference.py OUT_DIR [MODEL ...]   (default: vgg11 vgg16 vgg16_bn)

For each model: torchvision builds it with seeded random weights (batch norm given non-trivial
running statistics, fc8 scaled so the softmax is far from uniform), and OUT_DIR receives
MODEL.pth (its state dict), MODEL_logits.npy and MODEL_probs.npy (torchvision's own forward on the
normalised image) and, once, image.npy (a random uint8 224x224 RGB image, H x W x 3).
Standalone on purpose: it imports no vgg_onnx, only torch, torchvision and numpy.
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.transforms import functional as F

# torchvision's ImageNet normalisation, as its VGG weights' transforms use it
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main(out_dir: Path, names: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(2015).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.save(out_dir / "image.npy", image)
    x = F.normalize(F.to_tensor(image), MEAN, STD).unsqueeze(0)  # torchvision's own preprocessing
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, name)(weights=None).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            logits = model(x)
            model.classifier[6].weight.mul_(4.0 / float(logits.std()))  # logits with std ~4: a peaked softmax
            model.classifier[6].bias.uniform_(-1, 1)
            logits = model(x)
        torch.save(model.state_dict(), out_dir / f"{name}.pth")
        np.save(out_dir / f"{name}_logits.npy", logits.numpy())
        np.save(out_dir / f"{name}_probs.npy", torch.softmax(logits, 1).numpy())
        print(f"{name}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"top-1 prob {float(torch.softmax(logits, 1).max()):.3f}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["vgg11", "vgg16", "vgg16_bn"])
