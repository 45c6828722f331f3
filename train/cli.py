"""`vgg-onnx train`, `vgg-onnx stats` and `vgg-onnx plot` (loaded lazily by vgg_onnx.cli)."""

from __future__ import annotations

import json
import os

import click

from vgg_onnx.errors import UsageError
from vgg_onnx.params import CONFIG, CROP, INIT_METHODS, TRAIN_SCALES


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} {text!r}: expected positive integers")
    return values


@click.command("train", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", required=True, type=CONFIG, help="Network configuration: A, A-LRN, B, C, D, E (or X-BN).")
@click.option("--data", "data", required=True, metavar="DIR", help="Folder with train/<class>/... and val/<class>/...")
@click.option("--out", required=True, metavar="RUN_DIR", help="Run folder: checkpoints, stats.json, metrics.jsonl, curves.png.")
@click.option("--scale", type=TRAIN_SCALES, default="256", show_default=True, metavar="S|SMIN,SMAX",
              help="Training scale: fixed S, or jittered uniformly in [SMIN, SMAX] per image.")
@click.option("--crop", type=CROP, default=224, show_default=True, help="Training crop size (a multiple of 32).")
@click.option("--width-mult", default=1.0, show_default=True, help="Channel width multiplier (small nets for tests).")
@click.option("--batch-size", default=256, show_default=True, help="Global batch, split evenly over the processes.")
@click.option("--epochs", default=74, show_default=True, help="Stop after this many epochs at the latest.")
@click.option("--lr", default=0.01, show_default=True, help="Initial learning rate.")
@click.option("--momentum", default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", default=5e-4, show_default=True, help="L2 weight decay (SGD's weight_decay).")
@click.option("--dropout", default=0.5, show_default=True, help="Dropout on the fc6 and fc7 outputs.")
@click.option("--init", type=click.Choice(INIT_METHODS), default="glorot", show_default=True,
              help="Random initialisation: Glorot (trains at every width), or the paper's Gaussian std 0.01 "
                   "(which leaves small nets nothing to learn).")
@click.option("--init-from", metavar="CKPT", help="Copy layers from a trained checkpoint (RUN_DIR/best.safetensors).")
@click.option("--lr-patience", default=3, show_default=True,
              help="Divide the rate by 10 after this many epochs without a better validation top-1 error.")
@click.option("--milestones", metavar="E1,E2,...", help="Divide the rate by 10 after these epochs instead.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast on CPU and GPU (weights stay fp32).")
@click.option("--workers", default=4, show_default=True, help="Data-loading processes per training process.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initialisation, data order and augmentation.")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from its last checkpoint.")
@click.option("--checkpoint-every", default=0, show_default=True, metavar="STEPS",
              help="Also save RUN_DIR/last every STEPS steps within an epoch (0: at the end of each epoch).")
@click.option("--stats", "stats_file", metavar="FILE", help="Colour statistics from `vgg-onnx stats --out FILE` "
              "(default: RUN_DIR/stats.json, computed when missing).")
@click.option("--limit-per-class", type=int, metavar="N",
              help="Train and validate on the first N images of each class (quick trials).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
def train_command(config, data, out, scale, crop, width_mult, batch_size, epochs, lr, momentum, weight_decay,
                  dropout, init, init_from, lr_patience, milestones, precision, workers, seed, resume,
                  checkpoint_every, stats_file, limit_per_class, progress):
    """Train a VGG net with the paper's recipe, on one process or under torchrun (DDP).

    \b
    One process:   vgg-onnx train --config A --data DIR --out runs/A
    Several GPUs:  torchrun --nproc-per-node 8 -m vgg_onnx.train --config A --data DIR --out runs/A
    Several nodes: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \\
                   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
                     --rdzv-endpoint HOST:29500 --rdzv-id vgg-D --max-restarts 3 \\
                     -m vgg_onnx.train ... --out RUN_DIR --checkpoint-every 500
                   (the same command on every node, RUN_DIR on shared storage; after a
                   fault torchrun restarts the workers and they resume from RUN_DIR/last;
                   the variable: docs/training.md)
    """
    from .trainer import TrainArgs, train

    args = TrainArgs(config=config, data=data, out=out, scale=scale, crop=crop, width_mult=width_mult,
                     batch_size=batch_size, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     dropout=dropout, init=init, init_from=init_from, lr_patience=lr_patience,
                     milestones=_int_list(milestones, "--milestones"), precision=precision, workers=workers,
                     seed=seed, resume=resume, checkpoint_every=checkpoint_every, stats=stats_file,
                     limit_per_class=limit_per_class, progress=progress)
    summary = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        last = summary["last"]
        best = summary["best_val_top1_err"]
        click.echo(f"{summary['run_dir']}: {summary['epochs']} epochs, {summary['steps']} steps ({summary['stopped']})")
        if last:
            click.echo(f"  last epoch: val top-1 error {last['val_top1_err']:.2%}, top-5 error {last['val_top5_err']:.2%}")
        if best is not None:
            click.echo(f"  best: val top-1 error {best:.2%} at epoch {summary['best_epoch']} -> "
                       f"{os.path.join(summary['run_dir'], 'best.safetensors')}")


@click.command("stats", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data_dir", metavar="DIR")
@click.option("--out", metavar="FILE", help="Write the statistics as JSON (for `vgg-onnx train --stats FILE`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--workers", default=2, show_default=True, help="Data-loading processes.")
def stats_command(data_dir, out, as_json, workers):
    """Mean RGB and PCA (eigenvalues, eigenvectors) of the RGB pixel covariance of DIR/train."""
    from vgg_onnx.atomic import check_writable

    from .data import compute_stats, save_stats, scan_split

    if out:
        check_writable(out)
    stats = compute_stats(scan_split(data_dir, "train"), workers)  # warnings go to stderr
    if out:
        save_stats(out, stats)
    if as_json:
        click.echo(json.dumps(stats.to_dict(), indent=2))
        return
    click.echo(f"{stats.images} images, {stats.pixels} pixels" + (f", {stats.skipped} unreadable skipped" if stats.skipped else ""))
    click.echo("mean RGB (0..255):   " + "  ".join(f"{v:8.3f}" for v in stats.mean_rgb))
    click.echo("PCA of pixel covariance ([0,1] units):")
    click.echo("  eigenvalue   eigenvector (R, G, B)")
    for i, value in enumerate(stats.pca.eigenvalues):
        vector = [row[i] for row in stats.pca.eigenvectors]
        click.echo(f"  {value:10.6f}   " + "  ".join(f"{v:+.4f}" for v in vector))
    if out:
        click.echo(f"wrote {out}")


@click.command("plot", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--out", metavar="FILE", help="Image path (default RUN_DIR/curves.png).")
def plot_command(run_dir, out):
    """Draw a run's loss and validation-error curves from RUN_DIR/metrics.jsonl."""
    from .plot import plot_run

    click.echo(plot_run(run_dir, out))
