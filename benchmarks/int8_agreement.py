"""Top-1 agreement of an int8 model with its float32 original on an ImageFolder, per method.

    python benchmarks/int8_agreement.py vgg_A.onnx vgg_A.int8.onnx $IMAGENETTE/val --limit 500

The same images `vgg-onnx eval --limit N` takes (classes in turn), through the Python API; one
JSON object per method on stdout: images, top-1 agreement, largest probability difference.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from vgg_onnx.runtime import load_model
from vgg_onnx.runtime.imagefolder import labelled_images, limit_round_robin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fp32")
    parser.add_argument("int8")
    parser.add_argument("data")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--methods", default="dense,multi-crop")
    args = parser.parse_args()
    fp32, int8 = load_model(args.fp32, "cpu"), load_model(args.int8, "cpu")
    paths = [p for p, _ in limit_round_robin(labelled_images(args.data, fp32.classes), args.limit)]
    for method in args.methods.split(","):
        reference = [r.posterior for r in fp32.classify_many(paths, method=method)]
        quantized = [r.posterior for r in int8.classify_many(paths, method=method)]
        agree = np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(reference, quantized)])
        largest = max(float(np.abs(a - b).max()) for a, b in zip(reference, quantized))
        print(json.dumps({"method": method, "images": len(paths), "top1_agreement": float(agree),
                          "max_prob_diff": largest}), flush=True)


if __name__ == "__main__":
    main()
