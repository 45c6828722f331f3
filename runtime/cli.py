"""`vgg-onnx infer`, `eval` and `bench`: the paper's test protocol from the compiled graph alone."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import click
import numpy as np

from vgg_onnx.atomic import atomic_write_text, check_writable
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.preprocessing import DEFAULT_MAX_PIXELS, parse_scales

from .evaluate import (DEFAULT_BATCH_SIZE, METHODS, Evaluator, check_methods, collect_images,
                       configure_opencv_threads, load_sessions, top_k)
from .output import FORMATS, HeatmapWriter, OutputFile, RecordWriter, make_record
from .session import PROVIDERS


DEFAULT_MODEL = os.path.join("models", "vgg_D.onnx")  # where `make export` and `make demo` write


def resolve_models(models: tuple[str, ...]) -> list[str]:
    """--model, else $VGG_ONNX_MODEL, else models/vgg_D.onnx when it exists (said on stderr)."""
    if models:
        return list(models)
    from_env = [m for m in os.environ.get("VGG_ONNX_MODEL", "").split(os.pathsep) if m]
    if from_env:
        return from_env
    if os.path.isfile(DEFAULT_MODEL):
        click.echo(f"vgg-onnx: no --model given: using {DEFAULT_MODEL}", err=True)
        return [DEFAULT_MODEL]
    raise UsageError(f"no model given: use --model FILE.onnx (repeatable) or set VGG_ONNX_MODEL "
                     f"({DEFAULT_MODEL}, what `make export` writes, is not here)")


def model_options(func):
    """Options every runtime command shares: models, scales, provider and the pipeline's knobs."""
    options = [
        click.option("--model", "-m", "models", multiple=True, metavar="FILE.onnx",
                     help="Exported model; repeat to fuse several (their posteriors are averaged). "
                          f"Default: $VGG_ONNX_MODEL (paths separated by '{os.pathsep}'), else {DEFAULT_MODEL} "
                          "(what `make export` writes) when it exists."),
        click.option("--scales", metavar="Q[,Q...]",
                     help="Test scales (shorter side). Default: each model's own, from its metadata."),
        click.option("--no-flip", is_flag=True, help="Leave out the mirror images."),
        click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
                     help="ONNX Runtime provider; auto = CUDA where its libraries load, else CPU."),
        click.option("--threads", type=int, help="CPU provider threads (default: the CPUs available)."),
        click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True,
                     help="Network inputs per run (images, mirrors or crops of one shape)."),
        click.option("--workers", type=int, default=1, show_default=True,
                     help="Threads decoding and rescaling ahead of the network."),
        click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
                     help="Refuse images (and rescaled images) larger than this."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels, methods,
                    heatmap=False) -> Evaluator:
    if workers < 1:
        raise UsageError(f"--workers {workers} must be at least 1")
    if max_pixels < 1:
        raise UsageError(f"--max-pixels {max_pixels} must be positive")
    scale_list = parse_scales(scales) if scales else None
    configure_opencv_threads()
    sessions = load_sessions(list(models), provider, threads)
    for session in sessions:
        if not session.info.weights_source:
            click.echo(f"vgg-onnx: note: {session.name} has random weights (exported without trained weights): "
                       "its predictions mean nothing", err=True)
    return Evaluator(sessions, methods, scale_list, flip=not no_flip, batch_size=batch_size,
                     max_pixels=max_pixels, heatmap=heatmap)


def progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=what, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def record_scales(evaluator: Evaluator) -> list[int]:
    return sorted({q for qs in evaluator.model_scales for q in qs})


# --- infer -------------------------------------------------------------------------------------

@click.command("infer")
@click.argument("paths", nargs=-1, required=True)
@model_options
@click.option("--method", type=click.Choice(METHODS), default="dense", show_default=True,
              help="dense, multi-crop (5x5 grid), or both (their mean).")
@click.option("--top-k", "k", type=int, default=5, show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--output", "-o", "output", metavar="FILE", help="Write results there (atomically), not stdout.")
@click.option("--heatmap", "heatmap_dir", metavar="DIR",
              help="Write DIR/<image>.png: the top class's dense score map (largest scale) over the image.")
def infer_command(paths, models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                  method, k, fmt, output, heatmap_dir):
    """Classify images (files, folders searched recursively, globs) with the paper's test protocol.

    One record per image: the top-k classes, or an error; exit status 1 if any image failed.
    """
    if k < 1:
        raise UsageError(f"--top-k {k} must be at least 1")
    if output:
        check_writable(output)
    if heatmap_dir and os.path.exists(heatmap_dir) and not os.path.isdir(heatmap_dir):
        raise UsageError(f"--heatmap {heatmap_dir}: exists and is not a folder")
    try:
        heatmaps = HeatmapWriter(heatmap_dir) if heatmap_dir else None
    except OSError as e:
        raise UsageError(f"--heatmap {heatmap_dir}: cannot create the folder: {e.strerror or e}") from None
    models = resolve_models(models)
    evaluator = build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                                (method,), heatmap=bool(heatmap_dir))
    files, missing = collect_images(list(paths))
    if not files and not missing:
        raise VggOnnxError(f"no images found in {', '.join(paths)}")
    sink = OutputFile(output) if output else None
    writer = RecordWriter(sink.buffer if sink else sys.stdout, fmt)
    classes = evaluator.classes
    scale_list, model_names = record_scales(evaluator), list(models)
    done = failed = 0
    for path in missing:
        writer.write({"path": path, "error": f"{path}: no such file or folder"})
        failed += 1
    start = time.perf_counter()
    try:
        with progress(len(files), "infer") as bar:
            for result in evaluator.run(files, workers):
                if result.error is None and heatmaps:
                    try:
                        heatmaps.write(result, method)
                    except OSError as e:
                        result.error = f"{result.path}: cannot write heatmap: {e.strerror or e}"
                writer.write(make_record(result, method, classes, min(k, len(classes)), scale_list, model_names))
                if result.error is None:
                    done += 1
                else:
                    failed += 1
                bar.update(1)
        writer.close()
    except BrokenPipeError:  # `vgg-onnx infer ... | head`: the reader has gone, so stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    elapsed = time.perf_counter() - start
    if sink:
        try:
            sink.commit()
        except OSError as e:
            raise VggOnnxError(f"{output}: cannot write: {e.strerror or e}") from None
    rate = done / elapsed if elapsed > 0 else 0.0
    click.echo(f"vgg-onnx: {done} done, {failed} failed, {rate:.3g} images/s ({elapsed:.1f} s)", err=True)
    sys.exit(1 if failed else 0)


# --- eval --------------------------------------------------------------------------------------

class ErrorCounter:
    """Top-1 and top-5 errors per (model or "fused", method), counted as results stream by
    (posteriors are not kept: ImageNet's validation set is 50,000 of them per method)."""

    def __init__(self, methods, n_models: int):
        self.methods, self.n_models = methods, n_models
        self.counts: dict = {}

    def add(self, result, truth: int) -> None:
        for who in ["fused"] + list(range(self.n_models)):
            posts = result.posteriors if who == "fused" else result.model_posteriors[who]
            for method in self.methods:
                ranked = top_k(posts[method], 5)
                c = self.counts.setdefault((who, method), [0, 0, 0])
                c[0] += ranked[0] != truth
                c[1] += truth not in ranked
                c[2] += 1

    def rates(self) -> dict:
        return {key: {"top1_error": 100.0 * c[0] / c[2], "top5_error": 100.0 * c[1] / c[2], "images": c[2]}
                for key, c in self.counts.items()}


def format_eval_table(report: dict) -> str:
    methods = report["methods"]
    rows = [(row["model"], [f"{row[m]['top1_error']:.1f} / {row[m]['top5_error']:.1f}" for m in methods])
            for row in report["rows"]]
    width = max([len("model")] + [len(name) for name, _ in rows])
    cells = [max(len(m), 11) for m in methods]
    head = "  ".join([f"{'model':<{width}}"] + [f"{m:>{w}}" for m, w in zip(methods, cells)])
    lines = ["top-1 / top-5 error (%)", head, "-" * len(head)]
    lines += ["  ".join([f"{name:<{width}}"] + [f"{c:>{w}}" for c, w in zip(cs, cells)]) for name, cs in rows]
    lines.append(f"{report['images']} images ({report['failed']} failed), scales {report['scales']}, "
                 f"{'mirrors' if report['flip'] else 'no mirrors'}, {report['images_per_second']:.3g} images/s")
    return "\n".join(lines) + "\n"


@click.command("eval")
@click.argument("data_dir")
@model_options
@click.option("--methods", default="dense,multi-crop,both", show_default=True,
              help="Comma-separated: dense, multi-crop, both.")
@click.option("--labels", "labels_file", metavar="FILE",
              help="NAME<TAB>CLASS lines mapping subfolders (or, in a flat folder, files) to classes.")
@click.option("--limit", type=int, help="Evaluate at most N images, taking the classes in turn.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--output", "-o", "output", metavar="FILE", help="Write the report there (atomically).")
def eval_command(data_dir, models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                 methods, labels_file, limit, fmt, output):
    """Top-1 / top-5 error on an ImageFolder (subfolders named by synset, class index or class name)."""
    from .imagefolder import labelled_images, limit_round_robin

    method_list = check_methods([m.strip() for m in methods.split(",") if m.strip()])
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit} must be at least 1")
    if output:
        check_writable(output)
    models = resolve_models(models)
    evaluator = build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                                method_list)
    items = limit_round_robin(labelled_images(data_dir, evaluator.classes, labels_file), limit)
    labels = dict(items)
    counter, failures, done = ErrorCounter(method_list, len(models)), [], 0
    start = time.perf_counter()
    with progress(len(items), "eval") as bar:
        for result in evaluator.run([path for path, _ in items], workers):
            if result.error is not None:
                failures.append(result.error)
                bar.write(f"vgg-onnx: {result.error}", file=sys.stderr)
            else:
                counter.add(result, labels[result.path])
                done += 1
            bar.update(1)
    elapsed = time.perf_counter() - start
    rates = counter.rates()
    rows = []
    if len(models) > 1:
        rows += [{"model": m, **{meth: rates[(i, meth)] for meth in method_list}} for i, m in enumerate(models)
                 if (i, method_list[0]) in rates]
    if ("fused", method_list[0]) in rates:
        name = " + ".join(os.path.basename(m) for m in models) if len(models) > 1 else models[0]
        rows.append({"model": name, **{meth: rates[("fused", meth)] for meth in method_list}})
    report = {"data": data_dir, "models": list(models), "methods": list(method_list),
              "scales": record_scales(evaluator), "flip": evaluator.flip, "images": done,
              "failed": len(failures), "errors": failures, "seconds": round(elapsed, 3),
              "images_per_second": done / elapsed if elapsed > 0 else 0.0, "rows": rows}
    if not rows:
        raise VggOnnxError(f"every image failed ({len(failures)}); first: {failures[0] if failures else '-'}")
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n" if fmt == "json" else format_eval_table(report)
    if output:
        try:
            atomic_write_text(output, text)
        except OSError as e:
            raise VggOnnxError(f"{output}: cannot write: {e.strerror or e}") from None
    else:
        click.echo(text, nl=False)
    sys.exit(1 if failures else 0)


# --- bench -------------------------------------------------------------------------------------

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


@click.command("bench")
@model_options
@click.option("--method", type=click.Choice(METHODS), default="dense", show_default=True)
@click.option("--images", "images_dir", metavar="DIR",
              help="Images to run (default: synthetic 500x375 JPEGs).")
@click.option("--limit", type=int, default=8, show_default=True, help="Images used from DIR.")
@click.option("--matmul-size", type=int, default=2048, show_default=True,
              help="Side of the square float32 MatMul that measures the peak.")
@click.option("--matmul-seconds", type=float, default=3.0, show_default=True,
              help="How long to repeat the MatMul (before and after the network runs).")
@click.option("--repeat", type=int, default=2, show_default=True,
              help="Measure network and pipeline this many times each, alternating; report the best.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def bench_command(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels, method,
                  images_dir, limit, matmul_size, matmul_seconds, repeat, fmt):
    """Measure the network alone, the whole pipeline and ONNX Runtime's MatMul peak; print the ratios."""
    from .matmul import matmul_rates

    if limit < 1 or repeat < 1:
        raise UsageError("--limit and --repeat must be at least 1")
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    models = resolve_models(models)
    evaluator = build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                                (method,))
    session = evaluator.sessions[0]
    with tempfile.TemporaryDirectory(prefix="vgg-onnx-bench-") as tmp:
        if images_dir:
            files, _ = collect_images([images_dir])
            files = files[:limit]
            if not files:
                raise UsageError(f"{images_dir}: no images found")
        else:
            files = synthetic_images(tmp, limit)
        click.echo(f"vgg-onnx bench: {len(files)} images, {method}, scales {record_scales(evaluator)}, "
                   f"{'mirrors' if evaluator.flip else 'no mirrors'}, provider {session.provider}, "
                   f"threads {session.threads}, batch {batch_size}, workers {workers}", err=True)
        peaks, peaks_cpu = [], []
        if session.provider == "cpu":
            wall, cpu_rate = matmul_rates(session.threads, matmul_size, matmul_seconds)
            peaks.append(wall)
            peaks_cpu.append(cpu_rate)
        prepared = [evaluator.prepare(i, p) for i, p in enumerate(files)]
        bad = [p.error for p in prepared if p.error]
        if bad:
            raise VggOnnxError(f"{len(bad)} image(s) cannot be used; first: {bad[0]}")
        evaluator.evaluate(prepared[:1])  # warm-up: ONNX Runtime's first run of a shape allocates
        window = max(1, batch_size // evaluator.rows_per_image)
        # network alone and pipeline alternate, `repeat` times each, and the best of each counts:
        # on a shared machine the best run is the one least disturbed by other processes
        # CPU time (all threads) is recorded too: on a shared machine it shows the work each
        # phase did, where wall time also shows what other processes took
        network_runs, pipeline_runs, network_cpu, pipeline_cpu = [], [], [], []
        for _ in range(repeat):
            evaluator.network_seconds, evaluator.network_flops = 0.0, 0
            cpu = time.process_time()
            for start in range(0, len(prepared), window):
                evaluator.evaluate(prepared[start:start + window])
            network_cpu.append(time.process_time() - cpu)
            network_runs.append(evaluator.network_seconds)
            flops = evaluator.network_flops
            began, cpu = time.perf_counter(), time.process_time()
            results = list(evaluator.run(files, workers))
            pipeline_runs.append(time.perf_counter() - began)
            pipeline_cpu.append(time.process_time() - cpu)
        if session.provider == "cpu":
            wall, cpu_rate = matmul_rates(session.threads, matmul_size, matmul_seconds)
            peaks.append(wall)
            peaks_cpu.append(cpu_rate)
        del prepared
    network_s, pipeline_s, peak = min(network_runs), min(pipeline_runs), max(peaks, default=None)
    failed = [r.error for r in results if r.error]
    if failed:
        raise VggOnnxError(f"pipeline failed on {len(failed)} image(s); first: {failed[0]}")
    network_gflops = flops / network_s / 1e9
    network_cpu_rate = flops / min(network_cpu) / 1e9
    peak_cpu = max(peaks_cpu, default=None)
    report = {
        "model": models[0] if len(models) == 1 else list(models), "method": method,
        "scales": record_scales(evaluator), "flip": evaluator.flip, "images": len(files),
        "provider": session.provider, "threads": session.threads, "batch_size": batch_size, "workers": workers,
        "network_images_per_second": len(files) / network_s, "network_gflops_per_second": network_gflops,
        "gflop_per_image": flops / len(files) / 1e9,
        "pipeline_images_per_second": len(files) / pipeline_s,
        "matmul_size": matmul_size, "matmul_peak_gflops_per_second": peak,
        "network_vs_peak": network_gflops / peak if peak else None,
        "pipeline_vs_network": network_s / pipeline_s,
        "network_seconds_runs": [round(t, 3) for t in network_runs],
        "pipeline_seconds_runs": [round(t, 3) for t in pipeline_runs],
        "network_cpu_seconds_runs": [round(t, 3) for t in network_cpu],
        "pipeline_cpu_seconds_runs": [round(t, 3) for t in pipeline_cpu],
        "matmul_peak_runs": [round(p, 1) for p in peaks],
        # per CPU-second of all threads: independent of what other processes take of the machine
        "network_gflop_per_cpu_second": network_cpu_rate,
        "matmul_gflop_per_cpu_second": peak_cpu,
        "network_vs_peak_cpu_time": network_cpu_rate / peak_cpu if peak_cpu else None,
        "pipeline_vs_network_cpu_time": min(network_cpu) / min(pipeline_cpu),
        "load_average_1min_before": load_before,
    }
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    lines = [
        f"network alone   {report['network_images_per_second']:8.3f} images/s  {network_gflops:8.1f} GFLOP/s "
        f"({report['gflop_per_image']:.1f} GFLOP per image)",
        f"pipeline        {report['pipeline_images_per_second']:8.3f} images/s  "
        f"= {100 * report['pipeline_vs_network']:.1f}% of the network alone",
    ]
    if peak:
        lines.append(f"MatMul peak     {peak:8.1f} GFLOP/s ({matmul_size}^3 float32); network at "
                     f"{100 * report['network_vs_peak']:.1f}% of it")
    lines.append(f"best of {repeat}: network runs {report['network_seconds_runs']} s, pipeline runs "
                 f"{report['pipeline_seconds_runs']} s; load average before {load_before}")
    lines.append(f"CPU time (all threads): network {report['network_cpu_seconds_runs']} s, pipeline "
                 f"{report['pipeline_cpu_seconds_runs']} s (pipeline at "
                 f"{100 * report['pipeline_vs_network_cpu_time']:.1f}% of the network's rate)")
    if peak_cpu:
        lines.append(f"per CPU-second: network {network_cpu_rate:.1f} GFLOP, MatMul {peak_cpu:.1f} GFLOP; network at "
                     f"{100 * report['network_vs_peak_cpu_time']:.1f}% of it (independent of other load)")
    click.echo("\n".join(lines))
