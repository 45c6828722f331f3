"""`vgg-onnx infer` (here), `eval` (cli_eval.py) and `bench` (bench.py): the paper's test
protocol from the compiled graph alone."""

from __future__ import annotations

import os
import sys
import time

import click

from vgg_onnx.atomic import check_writable
from vgg_onnx.errors import UsageError, VggOnnxError

from .api import to_classification
from .bench import bench_command
from .cli_eval import eval_command
from .evaluate import Evaluator, collect_images, top_k
from .heatmap import HeatmapWriter
from .options import (METHOD_HELP, advance, announce_work, bar_paused, build_evaluator, model_options, progress,
                      resolve_models)
from .output import FORMATS, OutputFile, RecordWriter, make_record, printable
from .protocol import METHODS

__all__ = ["infer_command", "eval_command", "bench_command"]


def open_heatmaps(folder: str | None) -> HeatmapWriter | None:
    if not folder:
        return None
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--heatmap {folder}: exists and is not a folder")
    try:
        return HeatmapWriter(folder)
    except OSError as e:
        raise UsageError(f"--heatmap {folder}: cannot create the folder: {e.strerror or e}") from None


def infer_records(evaluator: Evaluator, files: list[str], method: str, k: int, models: list[str],
                  heatmaps: HeatmapWriter | None, workers: int):
    """Yield each image's record; a heatmap that cannot be written fails its image only."""
    for result in evaluator.run(files, workers):
        classification = to_classification(result, method, evaluator, tuple(models))
        heatmap = None
        if classification.ok and heatmaps:
            best = top_k(classification.posterior, 1)[0]
            try:
                heatmap = heatmaps.write(result.image, result.score_maps, best,
                                         evaluator.classes[best].name, result.path)
            except OSError as e:
                yield {"path": printable(result.path),
                       "error": printable(f"{result.path}: cannot write heatmap: {e.strerror or e}")}
                continue
        yield make_record(classification, k, heatmap)


@click.command("infer")
@click.argument("paths", nargs=-1, required=True)
@model_options
@click.option("--method", type=click.Choice(METHODS), default="dense", show_default=True, help=METHOD_HELP)
@click.option("--top-k", "k", type=int, default=5, show_default=True, metavar="K",
              help="How many classes each record lists, most probable first.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table (for people), json (one array), jsonl (a record per line) or csv (a row per class).")
@click.option("--output", "-o", "output", metavar="FILE", help="Write results there (atomically), not stdout.")
@click.option("--heatmap", "heatmap_dir", metavar="DIR",
              help="Write DIR/<image>.png: the top class's dense score map (largest scale) over the image, "
                   "with the class name and colour scale; its path goes in the record.")
def infer_command(paths, models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                  method, k, fmt, output, heatmap_dir):
    """Classify images (files, folders searched recursively, globs) with the paper's test protocol.

    One record per image: the top-k classes, or an error; exit status 1 if any image failed.
    """
    if k < 1:
        raise UsageError(f"--top-k {k} must be at least 1")
    models = resolve_models(models)
    files, missing = collect_images(list(paths))
    if not files and not missing:
        raise VggOnnxError(f"no images found in {', '.join(paths)}")
    if output:  # before the models load: never replace a model or an image with the results
        check_writable(output, inputs=[*models, *files])
    heatmaps = open_heatmaps(heatmap_dir)
    evaluator = build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                                (method,), heatmap=bool(heatmap_dir))
    announce_work(evaluator, len(files))
    sink = OutputFile(output) if output else None
    writer = RecordWriter(sink.buffer if sink else sys.stdout, fmt)
    records = [{"path": p, "error": f"{p}: no such file or folder"} for p in missing]
    start = time.perf_counter()
    done, failed = write_records(writer, records, evaluator, files, method, min(k, len(evaluator.classes)),
                                 models, heatmaps, workers)
    elapsed = time.perf_counter() - start
    if sink:
        try:
            sink.commit()
        except OSError as e:
            raise VggOnnxError(f"{output}: cannot write: {e.strerror or e}") from None
    rate = done / elapsed if elapsed > 0 else 0.0
    click.echo(f"vgg-onnx: {done} done, {failed} failed, {rate:.3g} images/s ({elapsed:.1f} s)", err=True)
    sys.exit(1 if failed else 0)


def write_records(writer: RecordWriter, missing: list[dict], evaluator: Evaluator, files: list[str], method: str,
                  k: int, models: list[str], heatmaps: HeatmapWriter | None, workers: int) -> tuple[int, int]:
    """Write every record as it comes, the bar moving per network batch; (done, failed)."""
    done = failed = 0
    try:
        for record in missing:
            writer.write(record)
        with progress(len(files), "infer") as bar:
            evaluator.progress = advance(bar)
            for record in infer_records(evaluator, files, method, k, models, heatmaps, workers):
                with bar_paused(bar):
                    writer.write(record)
                if "error" in record:
                    failed += 1
                else:
                    done += 1
        writer.close()
    except BrokenPipeError:  # `vgg-onnx infer ... | head`: the reader has gone, so stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    return done, failed + len(missing)
