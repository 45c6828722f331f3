"""infer's output: one record per image (the schema the C++ and Node hosts copy), its formats,
and heatmaps.

A record is {"path", "top_k": [{"index", "synset", "name", "prob"}...], "method", "scales",
"models", "seconds"} or {"path", "error"}.
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from vgg_onnx.atomic import atomic_write_bytes

from .evaluate import ImageResult, top_k

FORMATS = ("table", "json", "jsonl", "csv")
CSV_COLUMNS = ["path", "rank", "index", "synset", "name", "prob", "method", "scales", "models", "seconds", "error"]


def printable(text: str) -> str:
    """A file name that is not valid UTF-8 (os gives it as surrogates) shown with U+FFFD, so
    writing it as UTF-8 cannot fail."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def make_record(result: ImageResult, method: str, classes, k: int, scales: list[int], models: list[str]) -> dict:
    if result.error is not None:
        return {"path": printable(result.path), "error": printable(result.error)}
    posterior = result.posteriors[method]
    return {
        "path": printable(result.path),
        "top_k": [{"index": classes[i].index, "synset": classes[i].synset, "name": classes[i].name,
                   "prob": float(posterior[i])} for i in top_k(posterior, k)],
        "method": method,
        "scales": list(scales),
        "models": [printable(m) for m in models],
        "seconds": round(result.seconds, 4),
    }


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
    if "error" in record:
        return f"{record['path']}\n  error: {record['error']}\n"
    lines = [f"{record['path']}  ({record['method']}, scales {','.join(map(str, record['scales']))}, "
             f"{record['seconds']:.2f} s)"]
    for rank, entry in enumerate(record["top_k"], 1):
        synset = f"{entry['synset']} " if entry["synset"] else ""
        lines.append(f"  {rank}. {entry['prob']:7.4f}  {entry['index']:>4}  {synset}{entry['name']}")
    return "\n".join(lines) + "\n"


class OutputFile:
    """--output FILE: a text stream in memory, written atomically on close (whole or not at all)."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = io.StringIO()

    def commit(self) -> None:
        atomic_write_bytes(self.path, self.buffer.getvalue().encode("utf-8"))


def heatmap_image(image: np.ndarray, score_maps: list[np.ndarray], class_index: int) -> np.ndarray:
    """BGR uint8 picture: the class's dense score map (mean over models, each stretched to the
    image) in OpenCV's JET colormap, blended half and half over the image."""
    import cv2

    height, width = image.shape[:2]
    maps = [cv2.resize(m[class_index].astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
            for m in score_maps if m is not None]
    heat = np.mean(maps, axis=0)
    span = float(heat.max() - heat.min())
    heat = ((heat - heat.min()) / span * 255 if span > 0 else np.zeros_like(heat)).astype(np.uint8)
    colored = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 0.5, colored, 0.5, 0)


class HeatmapWriter:
    """--heatmap DIR: DIR/<image name>.png, with -1, -2... when two images share a name."""

    def __init__(self, folder: str):
        self.folder = folder
        self.used: set[str] = set()
        os.makedirs(folder, exist_ok=True)

    def write(self, result: ImageResult, method: str) -> str:
        import cv2

        class_index = top_k(result.posteriors[method], 1)[0]
        picture = heatmap_image(result.image, result.score_maps, class_index)
        stem = os.path.splitext(os.path.basename(result.path))[0]
        name, n = stem + ".png", 0
        while name in self.used:
            n += 1
            name = f"{stem}-{n}.png"
        self.used.add(name)
        ok, data = cv2.imencode(".png", picture)
        if not ok:
            raise OSError("PNG encoding failed")
        path = os.path.join(self.folder, name)
        atomic_write_bytes(path, data.tobytes())
        return path
