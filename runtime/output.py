"""What infer and eval print: infer's records (the schema the C++ and Node hosts copy) in their
formats, and eval's error counts and table.

A record is {"path", "top_k": [{"index", "synset", "name", "prob"}...], "method", "scales",
"models", "seconds"[, "heatmap"]} or {"path", "error"}; docs/api.md describes every field.
"""

from __future__ import annotations

import csv
import io
import json
import os

from vgg_onnx.atomic import atomic_write_bytes

from .api import Classification
from .evaluate import top_k

FORMATS = ("table", "json", "jsonl", "csv")
CSV_COLUMNS = ["path", "rank", "index", "synset", "name", "prob", "method", "scales", "models", "seconds", "error"]


def printable(text: str) -> str:
    """A file name that is not valid UTF-8 (os gives it as surrogates) shown with U+FFFD, so
    writing it as UTF-8 cannot fail."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def make_record(result: "Classification", k: int, heatmap: str | None = None) -> dict:
    """The JSON record of one image (docs/api.md describes every field)."""
    if result.error is not None:
        return {"path": printable(result.source), "error": printable(result.error)}
    record = {
        "path": printable(result.source),
        "top_k": [p._asdict() for p in result.top_k(k)],
        "method": result.method,
        "scales": list(result.scales),
        "models": [printable(m) for m in result.models],
        "seconds": round(result.seconds, 4),
    }
    if heatmap is not None:
        record["heatmap"] = printable(heatmap)
    return record


class RecordWriter:
    """Writes records as they come (json: the whole array at the end) to a text stream."""

    def __init__(self, stream, fmt: str):
        self.stream, self.fmt = stream, fmt
        self.records: list[dict] = []
        self.csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(CSV_COLUMNS)

    def write(self, record: dict) -> None:
        if self.fmt == "json":
            self.records.append(record)
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            if "error" in record:
                self.csv.writerow([record["path"]] + [""] * 9 + [record["error"]])
            for rank, entry in enumerate(record.get("top_k", []), 1):
                self.csv.writerow([record["path"], rank, entry["index"], entry["synset"], entry["name"],
                                   f"{entry['prob']:.6f}", record["method"],
                                   " ".join(map(str, record["scales"])), " ".join(record["models"]),
                                   record["seconds"], ""])
        else:
            self.stream.write(format_table_record(record))
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps(self.records, indent=2, ensure_ascii=False) + "\n")
            self.stream.flush()


def format_table_record(record: dict) -> str:
    """One image as a small table: the path, then a header and one line per class."""
    if "error" in record:
        return f"{record['path']}\n  error: {record['error']}\n"
    lines = [f"{record['path']}  ({record['method']}, scales {','.join(map(str, record['scales']))}, "
             f"{record['seconds']:.2f} s)", f"  {'#':<2} {'prob':>7}  {'index':>5}  class"]
    for rank, entry in enumerate(record["top_k"], 1):
        synset = f"{entry['synset']} " if entry["synset"] else ""
        lines.append(f"  {rank}. {entry['prob']:7.4f}  {entry['index']:>5}  {synset}{entry['name']}")
    if "heatmap" in record:
        lines.append(f"  heatmap: {record['heatmap']}")
    return "\n".join(lines) + "\n"


class OutputFile:
    """--output FILE: a text stream in memory, written atomically on close (whole or not at all)."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = io.StringIO()

    def commit(self) -> None:
        atomic_write_bytes(self.path, self.buffer.getvalue().encode("utf-8"))


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

    def rows(self, models: list[str]) -> list[dict]:
        """The report's rows: each model when several are fused, then the fusion (or the model)."""
        rates, first = self.rates(), self.methods[0]
        rows = []
        if len(models) > 1:
            rows += [{"model": m, **{meth: rates[(i, meth)] for meth in self.methods}}
                     for i, m in enumerate(models) if (i, first) in rates]
        if ("fused", first) in rates:
            name = " + ".join(os.path.basename(m) for m in models) if len(models) > 1 else models[0]
            rows.append({"model": name, **{meth: rates[("fused", meth)] for meth in self.methods}})
        return rows


def format_eval_table(report: dict) -> str:
    """The paper's Table 5 shape: a row per model (and their fusion), a column per method."""
    methods = report["methods"]
    rows = [(row["model"], [f"{row[m]['top1_error']:.1f} / {row[m]['top5_error']:.1f}" for m in methods])
            for row in report["rows"]]
    width = max([len("model")] + [len(name) for name, _ in rows])
    cells = [max([len(m)] + [len(cs[i]) for _, cs in rows]) for i, m in enumerate(methods)]
    head = "  ".join([f"{'model':<{width}}"] + [f"{m:>{w}}" for m, w in zip(methods, cells)])
    title = "top-1 / top-5 error (%)"
    if report.get("partial"):
        title += f" -- PARTIAL: interrupted after {report['images'] + report['failed']} of {report['planned']} images"
    lines = [title, head, "-" * len(head)]
    lines += ["  ".join([f"{name:<{width}}"] + [f"{c:>{w}}" for c, w in zip(cs, cells)]) for name, cs in rows]
    lines.append(f"{report['images']} images ({report['failed']} failed), scales {report['scales']}, "
                 f"{'mirrors' if report['flip'] else 'no mirrors'}, {report['images_per_second']:.3g} images/s")
    return "\n".join(lines) + "\n"
