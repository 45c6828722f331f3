"""The machine's matrix-multiply peaks per precision, each from a one-node graph, for `bench --peers`.

float32: ONNX Runtime's MatMul (runtime/matmul.py). int8: ONNX Runtime's MatMulInteger (uint8
activations x int8 weights, as the quantized convolutions compute), built with the onnx package
when it is installed. bf16: OpenVINO's MatMul compiled with its bf16 precision hint, where the
openvino extra is installed and the CPU has bf16. Each is GOP/s (2 x multiply-adds per second)
on size x size operands, the best of the runs within `seconds`.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Callable

import numpy as np

__all__ = ["bf16_peak", "installed", "int8_peak", "machine_peaks"]


def _best_rate(run: Callable[[], object], size: int, seconds: float) -> float:
    run()  # warm-up: thread pool, packing buffers
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size ** 3 / best / 1e9


def int8_peak(threads: int, size: int = 2048, seconds: float = 3.0) -> float:
    """GOP/s of ONNX Runtime's CPU MatMulInteger, uint8 x int8 -> int32 (needs onnx)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["C"])], "int8_peak",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size]),
         helper.make_tensor_value_info("B", TensorProto.INT8, [size, size])],
        [helper.make_tensor_value_info("C", TensorProto.INT32, [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = {"A": rng.integers(0, 256, (size, size), dtype=np.uint8),
              "B": rng.integers(-128, 128, (size, size), dtype=np.int8)}
    return _best_rate(lambda: session.run(None, inputs), size, seconds)


def bf16_peak(threads: int, size: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of OpenVINO's CPU MatMul under its bf16 precision hint (needs openvino)."""
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([size, size], np.float32, name="A")
    b = ops.parameter([size, size], np.float32, name="B")
    model = ov.Model([ops.matmul(a, b, False, False)], [a, b], "bf16_peak")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                      "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((size, size), dtype=np.float32) for _ in range(2)]
    return _best_rate(lambda: request.infer(inputs), size, seconds)


def installed(package: str) -> bool:
    """Whether `package` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def machine_peaks(threads: int, size: int = 2048, seconds: float = 3.0,
                  note: Callable[[str], None] = lambda m: None) -> dict[str, float | None]:
    """{"fp32", "int8", "bf16"} -> the peak, None for each that cannot be measured here (`note` says why)."""
    from .matmul import matmul_peak

    peaks: dict[str, float | None] = {"fp32": matmul_peak(threads, size, seconds), "int8": None, "bf16": None}
    if installed("onnx"):
        peaks["int8"] = int8_peak(threads, size, seconds)
    else:
        note("int8 peak left out: its one-node graph is built with onnx (the export extra)")
    if not installed("openvino"):
        note("bf16 peak left out: pip install '.[openvino]'")
    else:
        from .openvino_backend import cpu_has_bf16

        if cpu_has_bf16():
            peaks["bf16"] = bf16_peak(threads, size, seconds)
        else:
            note("bf16 peak left out: this CPU has no native bf16")
    return peaks
