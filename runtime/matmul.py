"""The machine's GEMM peak: ONNX Runtime's CPU float32 MatMul, for the benchmark's efficiency figures.

The one-node graph C = MatMul(A, B), with symbolic dimensions (A: M x K, B: K x N), is the
129 bytes below, serialised once by onnx.helper: the runtime does not depend on the onnx
package (only the export extra has it). tests/test_runtime.py rebuilds the graph with onnx.helper
and checks that these bytes are that graph.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["MATMUL_ONNX", "matmul_peak", "matmul_rates"]

MATMUL_ONNX = bytes.fromhex(
    "080812087667672d6f6e6e783a6d0a190a01410a01421201431a066d61746d756c22064d61744d756c120b6d61746d756c5f7065616b"
    "5a150a014112100a0e0801120a0a0312014d0a0312014b5a150a014212100a0e0801120a0a0312014b0a0312014e62150a014312100a"
    "0e0801120a0a0312014d0a0312014e42040a001011")


def matmul_peak(threads: int, size: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of ONNX Runtime's CPU float32 MatMul on size x size operands (best of the runs)."""
    return matmul_rates(threads, size, seconds)[0]


def matmul_rates(threads: int, size: int = 2048, seconds: float = 3.0) -> tuple[float, float]:
    """(GFLOP per wall second, GFLOP per CPU second of all threads) of ONNX Runtime's CPU float32
    MatMul on size x size operands, each the best of the runs. The second does not depend on
    how much of the machine other processes take."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(MATMUL_ONNX, options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    session.run(None, {"A": a, "B": b})  # warm-up: thread pool, packing buffers
    best_wall = best_cpu = float("inf")
    spent = 0.0
    while spent < seconds or best_wall == float("inf"):
        start, cpu = time.perf_counter(), time.process_time()
        session.run(None, {"A": a, "B": b})
        elapsed = time.perf_counter() - start
        best_wall, best_cpu = min(best_wall, elapsed), min(best_cpu, time.process_time() - cpu)
        spent += elapsed
    flop = 2 * size ** 3 / 1e9
    return flop / best_wall, flop / max(best_cpu, 1e-9)
