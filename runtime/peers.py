"""`vgg-onnx bench --peers`: one network on every engine here, in one run on the same inputs.

ONNX Runtime float32 (the reference) and, given an int8 model (`vgg-onnx quantize`), int8;
OpenVINO f32, bf16 (where the CPU has it) and int8 when the openvino extra is installed; PyTorch
eager float32 when torch and onnx are installed (the project's own torch twin of the graph,
random weights: speed does not depend on them). Each network runs on the same batches, the
engines interleaved within each repetition so that all see the same background load; the best
time of each engine and shape counts. Rates are GFLOP/s (2 x multiply-adds of the convolutions)
and ratios to ONNX Runtime float32.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from vgg_onnx.errors import UsageError
from vgg_onnx.metadata import ModelInfo
from vgg_onnx.scales import rescaled_size

from .flops import dense_flops
from .peaks import installed
from .session import ModelSession

__all__ = ["Peer", "default_shapes", "parse_shapes", "peer_networks", "measure_peers", "format_peers"]


@dataclass
class Peer:
    """One engine and precision: `network(batch) -> probs` on float32 N x 3 x H x W, 0..255."""

    label: str
    network: Callable[[np.ndarray], np.ndarray]


def default_shapes(info: ModelInfo) -> list[tuple[int, int, int, int]]:
    """Dense inputs of a 500x375 photo at the model's test scales, batch 1."""
    return [(1, 3, h, w) for w, h in (rescaled_size(500, 375, q) for q in info.test_scales)]


def parse_shapes(text: str, crop: int) -> list[tuple[int, int, int, int]]:
    """'1x3x224x224,1x3x384x549' -> shapes; each N x 3 x H x W with H, W at least the crop size."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(v) for v in item.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 4 or shape[1] != 3 or shape[0] < 1 or min(shape[2:]) < crop:
            raise UsageError(f"--shapes {item!r}: give N x 3 x H x W (such as 1x3x224x224), H and W at least "
                             f"the crop size {crop}")
        shapes.append(shape)
    return shapes


def _probs(session) -> Callable[[np.ndarray], np.ndarray]:
    return lambda batch: session.run(batch)[0]


def _openvino_peers(model: str, int8: str | None, threads: int | None) -> list[Peer]:
    from .openvino_backend import OpenVinoSession, cpu_has_bf16

    bf16 = cpu_has_bf16()
    peers = [Peer("OpenVINO f32", _probs(OpenVinoSession(model, threads, "f32")))]
    if bf16:
        peers.append(Peer("OpenVINO bf16", _probs(OpenVinoSession(model, threads, "bf16"))))
    if int8:
        # the int8 graph's float parts in bf16 where the CPU has it, OpenVINO's own default
        peers.append(Peer("OpenVINO int8", _probs(OpenVinoSession(int8, threads, "bf16" if bf16 else "f32"))))
    return peers


def _torch_peer(info: ModelInfo, threads: int | None) -> Peer:
    # the torch code lives in the export stage (it owns torch); the runtime never imports torch
    torch_peer = importlib.import_module("vgg_onnx.export.torch_peer")
    return Peer("PyTorch eager fp32", torch_peer.torch_network(info, threads))


def peer_networks(model: str, int8: str | None = None, threads: int | None = None,
                  note: Callable[[str], None] = lambda m: None) -> tuple[ModelInfo, list[Peer]]:
    """The float32 model's metadata and every engine available here, ONNX Runtime float32 first;
    `note` is told which engines are left out and why."""
    reference = ModelSession(model, "cpu", threads)
    peers = [Peer("ONNX Runtime fp32", _probs(reference))]
    if int8:
        quantized = ModelSession(int8, "cpu", threads)
        if quantized.info.precision != "int8":
            raise UsageError(f"--int8 {int8}: its precision is {quantized.info.precision}, not int8")
        peers.append(Peer("ONNX Runtime int8", _probs(quantized)))
    else:
        note("no --int8 model: the int8 engines are left out (make one with `vgg-onnx quantize`)")
    if installed("openvino"):
        peers += _openvino_peers(model, int8, threads)
    else:
        note("OpenVINO left out: pip install '.[openvino]'")
    if installed("torch") and installed("onnx"):
        peers.append(_torch_peer(reference.info, threads))
    else:
        note("PyTorch left out: torch (the export extra) is not installed")
    return reference.info, peers


def _seconds(network: Callable, batch: np.ndarray) -> float:
    start = time.perf_counter()
    network(batch)
    return time.perf_counter() - start


def measure_peers(info: ModelInfo, peers: Sequence[Peer], shapes: Sequence[tuple[int, ...]], repeat: int = 3,
                  progress: Callable[[int], None] = lambda n: None) -> list[dict]:
    """One row per peer: best seconds per shape, GFLOP/s over all shapes, ratio to the first peer."""
    batches = [np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32) for shape in shapes]
    for peer in peers:  # warm-up: every engine prepares its kernels on the first run of a shape
        for batch in batches:
            peer.network(batch)
        progress(1)
    best = np.full((len(peers), len(batches)), np.inf)
    for _ in range(repeat):
        for j, batch in enumerate(batches):
            for i, peer in enumerate(peers):
                best[i, j] = min(best[i, j], _seconds(peer.network, batch))
        progress(len(peers))
    flops = sum(shape[0] * dense_flops(info, shape[2], shape[3]) for shape in shapes)
    rates = [flops / row.sum() / 1e9 for row in best]
    return [{"engine": peer.label, "seconds": [round(float(t), 6) for t in row], "gflops_per_second": rate,
             "vs_onnxruntime_fp32": rate / rates[0]} for peer, row, rate in zip(peers, best, rates)]


def format_peers(rows: list[dict], shapes: Sequence[tuple[int, ...]]) -> str:
    """The table `bench --peers` prints."""
    names = ["x".join(map(str, s)) for s in shapes]
    lines = [f"{'engine':<20} {'GFLOP/s':>8} {'vs ORT fp32':>11}  " + "  ".join(f"{n:>14}" for n in names)]
    for row in rows:
        times = "  ".join(f"{t * 1e3:11.1f} ms" for t in row["seconds"])
        rate, ratio = row["gflops_per_second"], row["vs_onnxruntime_fp32"]
        lines.append(f"{row['engine']:<20} {rate:8.1f} {ratio:10.2f}x  {times}")
    return "\n".join(lines) + "\n"
