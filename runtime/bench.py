"""`vgg-onnx bench`: the network alone, the whole pipeline and ONNX Runtime's MatMul peak.

`measure` returns a BenchResult (the raw runs); `BenchResult.report()` gives every figure as a
dict (what --format json prints) and `format_bench` the table.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import click
import numpy as np

from vgg_onnx.errors import UsageError, VggOnnxError

from .evaluate import Evaluator, collect_images
from .options import METHOD_HELP, build_evaluator, model_options, resolve_models
from .protocol import METHODS

__all__ = ["BenchResult", "measure", "format_bench", "bench_command"]


@dataclass
class BenchResult:
    """What one bench run measured: each repetition's times and the FLOPs of the work done."""

    models: list[str]
    method: str
    evaluator: Evaluator
    images: int
    workers: int
    flops: int = 0  # network FLOPs of one pass over the images
    network_runs: list = field(default_factory=list)  # seconds inside ONNX Runtime per pass
    pipeline_runs: list = field(default_factory=list)  # seconds from files to posteriors per pass
    network_cpu: list = field(default_factory=list)  # CPU seconds (all threads) of the same
    pipeline_cpu: list = field(default_factory=list)
    peaks: list = field(default_factory=list)  # MatMul GFLOP/s before and after
    peaks_cpu: list = field(default_factory=list)  # MatMul GFLOP per CPU-second
    matmul_size: int = 0
    load_before: float | None = None

    def report(self) -> dict:
        """Every figure, named; the best run of each kind counts (the least disturbed one)."""
        ev, session = self.evaluator, self.evaluator.sessions[0]
        network_s, pipeline_s = min(self.network_runs), min(self.pipeline_runs)
        peak, peak_cpu = max(self.peaks, default=None), max(self.peaks_cpu, default=None)
        network_gflops = self.flops / network_s / 1e9
        network_cpu_rate = self.flops / min(self.network_cpu) / 1e9
        return {
            "model": self.models[0] if len(self.models) == 1 else list(self.models), "method": self.method,
            "scales": ev.scales, "flip": ev.flip, "images": self.images, "provider": session.provider,
            "threads": session.threads, "batch_size": ev.batch_size, "workers": self.workers,
            "network_images_per_second": self.images / network_s, "network_gflops_per_second": network_gflops,
            "gflop_per_image": self.flops / self.images / 1e9,
            "pipeline_images_per_second": self.images / pipeline_s,
            "matmul_size": self.matmul_size, "matmul_peak_gflops_per_second": peak,
            "network_vs_peak": network_gflops / peak if peak else None,
            "pipeline_vs_network": network_s / pipeline_s,
            "network_seconds_runs": [round(t, 3) for t in self.network_runs],
            "pipeline_seconds_runs": [round(t, 3) for t in self.pipeline_runs],
            "network_cpu_seconds_runs": [round(t, 3) for t in self.network_cpu],
            "pipeline_cpu_seconds_runs": [round(t, 3) for t in self.pipeline_cpu],
            "matmul_peak_runs": [round(p, 1) for p in self.peaks],
            # per CPU-second of all threads: independent of what other processes take of the machine
            "network_gflop_per_cpu_second": network_cpu_rate,
            "matmul_gflop_per_cpu_second": peak_cpu,
            "network_vs_peak_cpu_time": network_cpu_rate / peak_cpu if peak_cpu else None,
            "pipeline_vs_network_cpu_time": min(self.network_cpu) / min(self.pipeline_cpu),
            "load_average_1min_before": self.load_before,
        }


def synthetic_images(folder: str, count: int) -> list[str]:
    """JPEG noise images of ImageNet's typical 500 x 375, so the pipeline decodes real files."""
    import cv2

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = cv2.GaussianBlur(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), (0, 0), 3)
        path = os.path.join(folder, f"synthetic_{i:03d}.jpg")
        cv2.imwrite(path, image)
        paths.append(path)
    return paths


def measure_matmul(result: BenchResult, seconds: float) -> None:
    from .matmul import matmul_rates

    session = result.evaluator.sessions[0]
    if session.provider == "cpu":
        wall, cpu_rate = matmul_rates(session.threads, result.matmul_size, seconds)
        result.peaks.append(wall)
        result.peaks_cpu.append(cpu_rate)


def measure_runs(result: BenchResult, files: list[str], repeat: int) -> None:
    """Network alone and pipeline alternate, `repeat` times each. CPU time (all threads) is
    recorded too: on a shared machine it shows the work each phase did, where wall time also
    shows what other processes took."""
    ev = result.evaluator
    prepared = [ev.prepare(i, p) for i, p in enumerate(files)]
    bad = [p.error for p in prepared if p.error]
    if bad:
        raise VggOnnxError(f"{len(bad)} image(s) cannot be used; first: {bad[0]}")
    ev.evaluate(prepared[:1])  # warm-up: ONNX Runtime's first run of a shape allocates
    window = max(1, ev.batch_size // ev.rows_per_image)
    for _ in range(repeat):
        ev.network_seconds, ev.network_flops = 0.0, 0
        cpu = time.process_time()
        for start in range(0, len(prepared), window):
            ev.evaluate(prepared[start:start + window])
        result.network_cpu.append(time.process_time() - cpu)
        result.network_runs.append(ev.network_seconds)
        result.flops = ev.network_flops
        began, cpu = time.perf_counter(), time.process_time()
        failed = [r.error for r in ev.run(files, result.workers) if r.error]
        result.pipeline_runs.append(time.perf_counter() - began)
        result.pipeline_cpu.append(time.process_time() - cpu)
        if failed:
            raise VggOnnxError(f"pipeline failed on {len(failed)} image(s); first: {failed[0]}")


def measure(evaluator: Evaluator, models: list[str], method: str, files: list[str], workers: int = 1,
            repeat: int = 2, matmul_size: int = 2048, matmul_seconds: float = 3.0) -> BenchResult:
    """Measure the network alone, the pipeline, and (CPU provider) the MatMul peak around them."""
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    result = BenchResult(models, method, evaluator, len(files), workers, matmul_size=matmul_size,
                         load_before=load_before)
    measure_matmul(result, matmul_seconds)
    measure_runs(result, files, repeat)
    measure_matmul(result, matmul_seconds)
    return result


def format_bench(report: dict) -> str:
    """The table `bench` prints: rates, then the runs behind them."""
    peak, peak_cpu = report["matmul_peak_gflops_per_second"], report["matmul_gflop_per_cpu_second"]
    lines = [
        f"network alone   {report['network_images_per_second']:8.3f} images/s  "
        f"{report['network_gflops_per_second']:8.1f} GFLOP/s ({report['gflop_per_image']:.1f} GFLOP per image)",
        f"pipeline        {report['pipeline_images_per_second']:8.3f} images/s  "
        f"= {100 * report['pipeline_vs_network']:.1f}% of the network alone",
    ]
    if peak:
        lines.append(f"MatMul peak     {peak:8.1f} GFLOP/s ({report['matmul_size']}^3 float32); network at "
                     f"{100 * report['network_vs_peak']:.1f}% of it")
    lines.append(f"best of {len(report['network_seconds_runs'])}: network runs {report['network_seconds_runs']} s, "
                 f"pipeline runs {report['pipeline_seconds_runs']} s; load average before "
                 f"{report['load_average_1min_before']}")
    lines.append(f"CPU time (all threads): network {report['network_cpu_seconds_runs']} s, pipeline "
                 f"{report['pipeline_cpu_seconds_runs']} s (pipeline at "
                 f"{100 * report['pipeline_vs_network_cpu_time']:.1f}% of the network's rate)")
    if peak_cpu:
        lines.append(f"per CPU-second: network {report['network_gflop_per_cpu_second']:.1f} GFLOP, MatMul "
                     f"{peak_cpu:.1f} GFLOP; network at {100 * report['network_vs_peak_cpu_time']:.1f}% of it "
                     "(independent of other load)")
    return "\n".join(lines) + "\n"


def bench_files(images_dir: str | None, limit: int, tmp: str) -> list[str]:
    if not images_dir:
        return synthetic_images(tmp, limit)
    files = collect_images([images_dir])[0][:limit]
    if not files:
        raise UsageError(f"{images_dir}: no images found")
    return files


@click.command("bench")
@model_options
@click.option("--method", type=click.Choice(METHODS), default="dense", show_default=True, help=METHOD_HELP)
@click.option("--images", "images_dir", metavar="DIR", help="Images to run (default: synthetic 500x375 JPEGs).")
@click.option("--limit", type=int, default=8, show_default=True, metavar="N", help="Images used from DIR.")
@click.option("--matmul-size", type=int, default=2048, show_default=True, metavar="N",
              help="Side of the square float32 MatMul that measures the peak.")
@click.option("--matmul-seconds", type=float, default=3.0, show_default=True, metavar="S",
              help="How long to repeat the MatMul (before and after the network runs).")
@click.option("--repeat", type=int, default=2, show_default=True, metavar="N",
              help="Measure network and pipeline this many times each, alternating; report the best.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table (for people) or json (every figure and run, for scripts).")
@click.option("--peers", is_flag=True,
              help="Instead: the network on every engine here on the same inputs, interleaved: ONNX Runtime "
                   "fp32 and int8 (--int8), OpenVINO f32, bf16 and int8 (the openvino extra), PyTorch eager fp32 "
                   "(where torch is installed); GFLOP/s and the ratio to ONNX Runtime fp32.")
@click.option("--int8", "int8_model", type=click.Path(dir_okay=False), metavar="FILE.onnx",
              help="With --peers: the int8 version of --model (from `vgg-onnx quantize`).")
@click.option("--shapes", metavar="NxCxHxW[,...]",
              help="With --peers: the input shapes. Default: a 500x375 photo at the model's test scales, batch 1.")
def bench_command(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels, method,
                  images_dir, limit, matmul_size, matmul_seconds, repeat, fmt, peers, int8_model, shapes):
    """Measure the network alone, the whole pipeline and ONNX Runtime's MatMul peak; print the ratios.
    With --peers, compare the engines on the network alone instead."""
    if limit < 1 or repeat < 1:
        raise UsageError("--limit and --repeat must be at least 1")
    models = resolve_models(models)
    if peers:
        bench_peers(models, int8_model, shapes, threads, repeat, fmt, matmul_size, matmul_seconds)
        return
    evaluator = build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                                (method,))
    session = evaluator.sessions[0]
    with tempfile.TemporaryDirectory(prefix="vgg-onnx-bench-") as tmp:
        files = bench_files(images_dir, limit, tmp)
        click.echo(f"vgg-onnx bench: {len(files)} images, {method}, scales {evaluator.scales}, "
                   f"{'mirrors' if evaluator.flip else 'no mirrors'}, provider {session.provider}, "
                   f"threads {session.threads}, batch {batch_size}, workers {workers}", err=True)
        report = measure(evaluator, models, method, files, workers, repeat, matmul_size, matmul_seconds).report()
    click.echo(json.dumps(report, indent=2) if fmt == "json" else format_bench(report), nl=fmt == "json")


def bench_peers(models: list[str], int8_model: str | None, shapes: str | None, threads: int | None, repeat: int,
                fmt: str, matmul_size: int, matmul_seconds: float) -> None:
    """`bench --peers`: one table (or JSON) of every engine's rate on the same inputs, and the
    machine's MatMul peaks in float32, int8 and bf16."""
    from tqdm import tqdm

    from .peaks import machine_peaks
    from .peers import default_shapes, format_peers, measure_peers, parse_shapes, peer_networks
    from .session import available_cpus, check_threads

    if len(models) != 1:
        raise UsageError("--peers compares engines on one --model")
    check_threads(threads)
    def note(message: str) -> None:
        click.echo(f"vgg-onnx bench: {message}", err=True)

    info, peers = peer_networks(models[0], int8_model, threads, note)
    shape_list = parse_shapes(shapes, info.crop_size) if shapes else default_shapes(info)
    click.echo(f"vgg-onnx bench: {len(peers)} engines on {', '.join('x'.join(map(str, s)) for s in shape_list)}, "
               f"best of {repeat}", err=True)
    with tqdm(total=len(peers) * (repeat + 1), desc="peers", unit="run", leave=False, dynamic_ncols=True) as bar:
        rows = measure_peers(info, peers, shape_list, repeat, bar.update)
    peaks = machine_peaks(threads or available_cpus(), matmul_size, matmul_seconds, note)
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    report = {"model": models[0], "int8_model": int8_model, "shapes": [list(s) for s in shape_list],
              "repeat": repeat, "load_average_1min_after": load, "engines": rows, "matmul_size": matmul_size,
              "matmul_peaks_gops_per_second": peaks}
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    measured = ", ".join(f"{k} {v:.1f}" for k, v in peaks.items() if v is not None)
    click.echo(format_peers(rows, shape_list) + f"MatMul peaks ({matmul_size}^3, GOP/s): {measured}")
