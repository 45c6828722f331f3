"""A one-node ONNX MatMul graph written as protobuf bytes, for the machine's GEMM peak.

The runtime does not depend on the onnx package (only the export extra has it), and this
graph is five messages, so it is encoded here directly (tests check it with onnx.checker).
Field numbers are onnx.proto3's.
"""

from __future__ import annotations

import time

import numpy as np

FLOAT = 1  # TensorProto.FLOAT


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One field: an int as a varint, bytes/str as length-delimited (strings, sub-messages)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor_value_info(name: str, shape: tuple) -> bytes:
    dims = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in shape)
    tensor_type = _field(1, FLOAT) + _field(2, dims)  # TypeProto.Tensor: elem_type, shape
    return _field(1, name) + _field(2, _field(1, tensor_type))  # ValueInfoProto: name, type


def matmul_model_bytes(m: int, k: int, n: int, ir_version: int = 8, opset: int = 17) -> bytes:
    """ModelProto bytes of C = MatMul(A, B), A: m x k, B: k x n, both graph inputs, float32."""
    node = _field(1, "A") + _field(1, "B") + _field(2, "C") + _field(3, "matmul") + _field(4, "MatMul")
    graph = (_field(1, node) + _field(2, "matmul_peak")
             + _field(11, _tensor_value_info("A", (m, k))) + _field(11, _tensor_value_info("B", (k, n)))
             + _field(12, _tensor_value_info("C", (m, n))))
    opset_import = _field(1, "") + _field(2, opset)
    return _field(1, ir_version) + _field(2, "vgg-onnx") + _field(7, graph) + _field(8, opset_import)


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
    session = ort.InferenceSession(matmul_model_bytes(size, size, size), options,
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
