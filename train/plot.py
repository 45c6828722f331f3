"""RUN_DIR/metrics.jsonl -> RUN_DIR/curves.png: training and validation loss, top-1 and top-5 error."""

from __future__ import annotations

import json
import os

from vgg_onnx.atomic import atomic_path
from vgg_onnx.errors import VggOnnxError

CURVES_FILE = "curves.png"


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise VggOnnxError(f"{path}:{number}: not a JSON line") from None
    except FileNotFoundError:
        raise VggOnnxError(f"{path}: missing (no finished epoch in {run_dir})") from None
    except OSError as e:
        raise VggOnnxError(f"{path}: cannot read: {e.strerror or e}") from None
    if not rows:
        raise VggOnnxError(f"{path}: no epochs recorded yet")
    return rows


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draw the curves (matplotlib, Agg backend: no display needed); returns the image's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = out or os.path.join(run_dir, CURVES_FILE)
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_err.plot(epochs, [100 * r["val_top1_err"] for r in rows], "o-", label="top-1")
    ax_err.plot(epochs, [100 * r["val_top5_err"] for r in rows], "s-", label="top-5")
    ax_err.set(xlabel="epoch", ylabel="validation error (%)", title="validation error")
    # mark the learning-rate divisions
    for prev, row in zip(rows, rows[1:]):
        if row["lr"] < prev["lr"]:
            for ax in (ax_loss, ax_err):
                ax.axvline(row["epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    except OSError as e:
        raise VggOnnxError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out
