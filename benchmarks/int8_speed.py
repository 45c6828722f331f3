"""int8 / float32 network speed on ONNX Runtime's CPU provider, the two models' runs interleaved.

    python benchmarks/int8_speed.py models/vgg_D.onnx models/vgg_D.int8.onnx --shape 1x3x224x224 --shape 1x3x384x549

Each shape: one warm-up run of each model, then `--runs` rounds of (float32 run, int8 run), so
both see the same background load; the median time of each, the ratio, and GFLOP/s from the
model's metadata (2 x multiply-adds of its convolutions). One JSON object per shape on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(fp32, int8, shape: tuple[int, ...], runs: int) -> tuple[float, float]:
    batch = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    calls = [lambda s=s: s.run(["probs"], {"image": batch}) for s in (fp32, int8)]
    for call in calls:  # warm-up: ORT picks its kernels on the first run of a shape
        call()
    times = ([], [])
    for _ in range(runs):
        for call, store in zip(calls, times):
            store.append(timed(call))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fp32")
    parser.add_argument("int8")
    parser.add_argument("--shape", action="append", default=[], help="NxCxHxW; repeat (default 1x3x224x224)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from vgg_onnx.runtime.flops import dense_flops
    from vgg_onnx.runtime.session import ModelSession

    info = ModelSession(args.fp32, "cpu").info
    fp32, int8 = session(args.fp32), session(args.int8)
    for text in args.shape or ["1x3x224x224"]:
        shape = tuple(int(v) for v in text.split("x"))
        t32, t8 = measure(fp32, int8, shape, args.runs)
        flops = shape[0] * dense_flops(info, shape[2], shape[3])
        print(json.dumps({"shape": text, "fp32_ms": round(t32 * 1e3, 1), "int8_ms": round(t8 * 1e3, 1),
                          "int8_speedup": round(t32 / t8, 2), "fp32_gflops": round(flops / t32 / 1e9, 1),
                          "int8_gflops": round(flops / t8 / 1e9, 1), "runs": args.runs}), flush=True)
        print(f"{text}: fp32 {t32 * 1e3:.0f} ms, int8 {t8 * 1e3:.0f} ms: {t32 / t8:.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
