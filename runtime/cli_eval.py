"""`vgg-onnx eval`: top-1 / top-5 error on an ImageFolder, per method, per model and fused.

Ctrl-C stops the run and still reports the images done so far, marked partial (and writes
them with --output), then exits 130.
"""

from __future__ import annotations

import json
import sys
import time

import click

from vgg_onnx.atomic import atomic_write_text, check_writable
from vgg_onnx.errors import UsageError, VggOnnxError

from .evaluate import Evaluator, check_methods
from .options import advance, announce_work, build_evaluator, model_options, progress, resolve_models
from .output import ErrorCounter, format_eval_table

__all__ = ["eval_command"]


def count_errors(evaluator: Evaluator, items: list, counter: ErrorCounter, workers: int) -> tuple[list, bool]:
    """Stream the images through the evaluator into the counter; (error messages, interrupted)."""
    labels, failures = dict(items), []
    try:
        with progress(len(items), "eval") as bar:
            evaluator.progress = advance(bar)
            for result in evaluator.run([path for path, _ in items], workers):
                if result.error is not None:
                    failures.append(result.error)
                    bar.write(f"vgg-onnx: {result.error}", file=sys.stderr)
                else:
                    counter.add(result, labels[result.path])
    except KeyboardInterrupt:
        return failures, True
    return failures, False


def write_report(report: dict, fmt: str, output: str | None) -> None:
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n" if fmt == "json" else format_eval_table(report)
    if output:
        try:
            atomic_write_text(output, text)
        except OSError as e:
            raise VggOnnxError(f"{output}: cannot write: {e.strerror or e}") from None
    else:
        click.echo(text, nl=False)


@click.command("eval")
@click.argument("data_dir")
@model_options
@click.option("--methods", default="dense,multi-crop,both", show_default=True,
              help="Comma-separated: dense, multi-crop, both.")
@click.option("--labels", "labels_file", metavar="FILE",
              help="NAME<TAB>CLASS lines mapping subfolders (or, in a flat folder, files) to classes.")
@click.option("--limit", type=int, metavar="N", help="Evaluate at most N images, taking the classes in turn.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table (the paper's Table 5 shape) or json (every figure, and the errors).")
@click.option("--output", "-o", "output", metavar="FILE", help="Write the report there (atomically).")
def eval_command(data_dir, models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                 methods, labels_file, limit, fmt, output):
    """Top-1 / top-5 error on an ImageFolder (subfolders named by synset, class index or class name)."""
    from .imagefolder import labelled_images, limit_round_robin

    method_list = check_methods([m.strip() for m in methods.split(",") if m.strip()])
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit} must be at least 1")
    models = resolve_models(models)
    if output:  # never replace a model or the labels file with the report
        check_writable(output, inputs=[*models, labels_file])
    evaluator = build_evaluator(models, scales, no_flip, provider, threads, batch_size, workers, max_pixels,
                                method_list)
    items = limit_round_robin(labelled_images(data_dir, evaluator.classes, labels_file), limit)
    if output:  # nor one of the images
        check_writable(output, inputs=[item[0] for item in items])
    announce_work(evaluator, len(items))
    counter = ErrorCounter(method_list, len(models))
    start = time.perf_counter()
    failures, interrupted = count_errors(evaluator, items, counter, workers)
    elapsed = time.perf_counter() - start
    rows = counter.rows(models)
    done = rows[-1][method_list[0]]["images"] if rows else 0
    report = {"data": data_dir, "models": list(models), "methods": list(method_list),
              "scales": evaluator.scales, "flip": evaluator.flip, "images": done,
              "failed": len(failures), "errors": failures, "seconds": round(elapsed, 3),
              "images_per_second": done / elapsed if elapsed > 0 else 0.0, "rows": rows,
              "partial": interrupted, "planned": len(items)}
    if not rows:
        if interrupted:
            raise KeyboardInterrupt
        raise VggOnnxError(f"every image failed ({len(failures)}); first: {failures[0] if failures else '-'}")
    write_report(report, fmt, output)
    if interrupted:
        click.echo(f"vgg-onnx: interrupted: the report covers the {done + len(failures)} image(s) done "
                   f"of {len(items)}", err=True)
        sys.exit(130)
    sys.exit(1 if failures else 0)
