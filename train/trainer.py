"""The paper's training recipe (docs/protocol.md §2) on one process or many, with exact resume.

Determinism: the data order of an epoch follows from (seed, epoch), every sample's
augmentation from (seed, epoch, index), the dropout masks of a step from (seed, step, rank),
and the initial weights from the seed. A checkpoint therefore needs no RNG state: resuming at
step k of an epoch replays the rest of the epoch exactly as the interrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vgg_onnx.atomic import atomic_write_text, check_writable
from vgg_onnx.configs import check_crop, parse_config
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.metadata import ModelInfo
from vgg_onnx.normalization import normalization_preset
from vgg_onnx.params import INIT_METHODS
from vgg_onnx.scales import check_train_scales

from . import checkpoint
from .augment import INIT_STREAM, STEP_STREAM, derived_seed
from .data import (STATS_FILE, ColourStats, EpochBatches, TrainDataset, ValDataset, collate, compute_stats, load_stats,
                   save_stats, scan_data, shard)
from .distributed import (Process, all_reduce_sum, barrier, broadcast_object, cleanup, elastic_agents,
                          elastic_restart_count, elastic_run_id, setup)
from .init import init_from_checkpoint
from .model import VGG, count_parameters, init_weights

__all__ = ["State", "TrainArgs", "Trainer", "check_args", "train"]

METRICS_FILE = "metrics.jsonl"
MAX_DIVISIONS = 3  # the paper divided the learning rate by 10 three times
# arguments a resumed run must share with the run it continues
RESUME_KEYS = ("config", "scale", "crop", "width_mult", "batch_size", "seed", "dropout", "momentum",
               "weight_decay", "init", "milestones", "lr_patience", "limit_per_class")
TRAINING_KEYS = ("state", "args", "colour_stats")  # what --resume needs in a checkpoint's "training"
CHANCE_EPOCHS = 3  # epochs with the training loss at chance level before the run says so
CHANCE_FRACTION = 0.97  # "at chance": a training loss of at least this fraction of ln(classes)


@dataclass
class TrainArgs:
    config: str
    data: str
    out: str
    scale: list[int] = field(default_factory=lambda: [256])
    crop: int = 224
    width_mult: float = 1.0
    batch_size: int = 256
    epochs: int = 74
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    init: str = "glorot"  # the paper's Gaussian std 0.01 leaves nothing to learn at small widths
    init_from: str | None = None
    lr_patience: int = 3
    milestones: list[int] | None = None  # fixed epochs at which the rate is divided by 10, instead of plateaus
    precision: str = "fp32"
    workers: int = 4
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 0  # also save `last` every N steps within an epoch (0: at epoch ends only)
    stats: str | None = None  # colour statistics from `vgg-onnx stats --out FILE`
    limit_per_class: int | None = None  # train and validate on the first N images of each class
    progress: bool = True
    plot: bool = True


@dataclass
class State:
    """Everything about a run's progress that is not weights or optimizer state."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # completed steps of the current epoch (mid-epoch checkpoints)
    step: int = 0  # completed steps in all
    lr: float = 0.01
    best_top1: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since validation top-1 error last improved
    divisions: int = 0
    stopped: str = ""  # why training ended, once it has
    partial: dict = field(default_factory=dict)  # the current epoch's loss sum, images, skipped, seconds
    history: list = field(default_factory=list)  # one metrics row per epoch


JSON_KINDS = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}


def state_from_dict(saved: dict, source: str) -> State:
    """A checkpoint's training.state, each field of the type State gives it (one line naming a bad one)."""
    state = State()
    for f in dataclasses.fields(State):
        if f.name not in saved:
            continue
        value, default = saved[f.name], getattr(state, f.name)
        number = isinstance(default, float) and type(value) in (int, float)
        if not (number or type(value) is type(default) or (f.name == "best_top1" and value is None)):
            raise VggOnnxError(f"{source}: training.state.{f.name} is {value!r}, not {JSON_KINDS[type(default)]}")
        setattr(state, f.name, value)
    state.best_top1 = math.inf if state.best_top1 is None else state.best_top1  # JSON has no infinity
    return state


def check_args(args: TrainArgs, world: int) -> None:
    parse_config(args.config)
    check_crop(args.crop)
    check_train_scales(args.scale, args.crop)
    if args.batch_size < 1 or args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be a positive multiple of the process count {world}")
    for name in ("epochs", "lr_patience"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.weight_decay < 0 or not 0 <= args.momentum < 1 or not 0 <= args.dropout < 1:
        raise UsageError("need --lr > 0, --weight-decay >= 0, 0 <= --momentum < 1 and 0 <= --dropout < 1")
    if args.init not in INIT_METHODS:
        raise UsageError(f"--init {args.init!r}: {' or '.join(INIT_METHODS)}")
    if args.precision not in ("fp32", "bf16"):
        raise UsageError(f"--precision {args.precision!r}: fp32 or bf16")
    if args.width_mult <= 0:
        raise UsageError("--width-mult must be positive")
    if args.init_from and not args.resume and not os.path.isfile(args.init_from):  # before slow work
        raise UsageError(f"--init-from {args.init_from}: no such file")
    if args.limit_per_class is not None and args.limit_per_class < 1:
        raise UsageError("--limit-per-class must be at least 1")
    if args.workers < 0 or args.checkpoint_every < 0:
        raise UsageError("--workers and --checkpoint-every must be >= 0")


def validation_scale(scales: list[int]) -> int:
    """Q = S for fixed S, the middle of [Smin, Smax] for jittered S (docs/protocol.md §3)."""
    return scales[0] if len(scales) == 1 else (scales[0] + scales[1]) // 2


def warn(message: str) -> None:
    tqdm.write(f"vgg-onnx: warning: {message}", file=sys.stderr)


def elastic_identity(agents: list[str]) -> dict | None:
    """What a checkpoint records of the torchrun job that wrote it (None outside torchrun)."""
    run_id = elastic_run_id()
    return {"run_id": run_id, "agents": agents} if run_id else None


def same_elastic_run(json_path: str, agents: list[str]) -> bool:
    """Whether the checkpoint was written by this torchrun job: the same run id (--rdzv-id) and at least
    one of the same agent processes (a new launch that reuses the id has new agents)."""
    training = checkpoint.read_json(json_path).get("training")
    saved = training.get("elastic") if isinstance(training, dict) else None
    mine = elastic_identity(agents)
    return (mine is not None and isinstance(saved, dict) and saved.get("run_id") == mine["run_id"]
            and bool(set(saved.get("agents") or []) & set(agents)))


class Trainer:
    def __init__(self, args: TrainArgs, proc: Process):
        self.args, self.proc = args, proc
        check_args(args, proc.world)
        self.config = parse_config(args.config)
        self.run_dir = args.out
        self.last_json = checkpoint.paths(self.run_dir, "last")[1]
        # a failure before the first step removes the files and the folder this run made
        self.created_run_dir, self.new_files = False, []
        self.saved_step = None  # the step of the newest `last` checkpoint
        self.train_split, self.val_split, self.classes = scan_data(args.data, args.limit_per_class)
        if len(self.train_split) < args.batch_size:
            raise UsageError(f"{self.train_split.root}: {len(self.train_split)} images, fewer than one batch of {args.batch_size}")
        self.restart = elastic_restart_count(proc.device)
        self.agents = elastic_agents() if elastic_run_id() else []
        resume = self.checked_on_main(self.prepare_run_dir, broadcast=True)
        if resume and not args.resume:  # the same run, restarted by torchrun's agent after a fault
            self.args = args = dataclasses.replace(args, resume=True)
        try:
            self.build()
        except BaseException:
            self.remove_new_run_dir()
            raise

    def build(self) -> None:
        """Statistics, model, optimizer (restored when resuming), DDP wrapper and loaders."""
        args, proc = self.args, self.proc
        self.state = State(lr=args.lr)
        self.resume_doc = None
        if args.resume:
            self.resume_doc = self.checked_on_main(self.check_resumable, broadcast=True)
        self.stats = self.checked_on_main(self.colour_stats, broadcast=True)
        self.norm = normalization_preset("paper", mean_rgb=self.stats.mean_rgb)

        self.model = VGG(self.config, len(self.classes), args.width_mult, args.crop, args.dropout)
        generator = torch.Generator().manual_seed(derived_seed(INIT_STREAM, args.seed, 0))
        init_weights(self.model, args.init, generator)
        self.init_note = ""
        if args.init_from and not args.resume:
            self.init_note = init_from_checkpoint(self.model, args.init_from)
        self.model.to(proc.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        if args.resume:
            self.load_resume()
        self.ddp = self.model
        if proc.distributed:
            device_ids = [proc.device] if proc.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

        self.local_batch = args.batch_size // proc.world
        self.batches = EpochBatches(len(self.train_split), args.batch_size, proc.rank, proc.world, args.seed)
        pca = self.stats.pca
        self.train_loader = torch.utils.data.DataLoader(
            TrainDataset(self.train_split, args.scale, args.crop, self.norm, pca, args.seed),
            batch_sampler=self.batches, collate_fn=collate, num_workers=args.workers,
            persistent_workers=args.workers > 0, pin_memory=proc.device.type == "cuda")
        self.val_loader = torch.utils.data.DataLoader(
            ValDataset(self.val_split, validation_scale(args.scale), args.crop, self.norm),
            batch_sampler=shard(len(self.val_split), proc.rank, proc.world, self.local_batch),
            collate_fn=collate, num_workers=args.workers, pin_memory=proc.device.type == "cuda")
        self.autocast = args.precision == "bf16"
        self.saved_step = self.state.step if args.resume else None

    # --- set-up on rank 0, errors shared with every rank ------------------------------------

    def checked_on_main(self, fn, broadcast: bool = False):
        """Run fn on rank 0; its error (or result) reaches every rank, so all stop with the same line."""
        result, error = None, None
        if self.proc.is_main:
            try:
                result = fn()
            except VggOnnxError as e:
                error = e
        if self.proc.distributed:
            error = broadcast_object(error)
            if broadcast and error is None:
                result = broadcast_object(result)
        if error is not None:
            raise error
        return result

    def prepare_run_dir(self) -> bool:
        """Create or check RUN_DIR; returns whether to resume (--resume, or torchrun restarted this run)."""
        weights, json_path, _ = checkpoint.paths(self.run_dir, "last")
        check_writable(weights)
        try:
            self.created_run_dir = not os.path.isdir(self.run_dir)
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"{self.run_dir}: cannot create the run folder: {e.strerror or e}") from None
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise UsageError(f"{self.run_dir}: run folder is not writable")
        resume = self.args.resume
        if os.path.exists(json_path) and not resume:
            if not (self.restart and same_elastic_run(json_path, self.agents)):
                raise UsageError(f"{self.run_dir}: already holds a run (last.json); pass --resume to continue it "
                                 f"or choose another --out")
            resume = True
        if resume and not os.path.exists(json_path):
            raise UsageError(f"{self.run_dir}: nothing to resume (no last.json)")
        for entry in os.scandir(self.run_dir):  # temporary files of a save that a crash interrupted
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                os.unlink(entry.path)
        return resume

    def remove_new_run_dir(self) -> None:
        """A run that fails before its first step removes what it wrote and the folder, if it made it.

        Later failures keep stats.json (a pass over the whole training set) for the next attempt.
        """
        state = getattr(self, "state", None)
        if not (self.proc.is_main and self.saved_step is None and (state is None or state.step == 0)):
            return
        for path in self.new_files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self.created_run_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir)  # only if empty: anything else there was not ours to delete

    def check_resumable(self) -> dict:
        document = checkpoint.read_json(self.last_json)
        training = document.get("training")
        if not (isinstance(training, dict) and all(isinstance(training.get(k), dict) for k in TRAINING_KEYS)):
            raise VggOnnxError(f"{self.last_json}: not a training checkpoint (needs training.{', training.'.join(TRAINING_KEYS)}; "
                               f"a JSON written by export, or edited?): cannot resume from it")
        saved = training["args"]
        if not isinstance(saved.get("config"), str):
            raise VggOnnxError(f"{self.last_json}: training.args names no config: cannot resume from it")
        for key in RESUME_KEYS:
            mine = getattr(self.args, key)
            theirs = saved.get(key)
            if key == "config":
                mine, theirs = parse_config(mine).name, theirs and parse_config(str(theirs)).name
            if mine != theirs:
                raise UsageError(f"{self.last_json}: --resume on a run with --{key.replace('_', '-')} {theirs}, "
                                 f"not {mine} (use another --out for a new run)")
        if [c.to_dict() for c in self.classes] != document.get("classes"):
            raise UsageError(f"{self.last_json}: --resume with other classes than the run was trained on")
        return document

    def colour_stats(self):
        """The run's stats.json; else --stats FILE; else computed now (and saved with the run)."""
        run_stats = os.path.join(self.run_dir, STATS_FILE)
        if self.resume_doc is not None:  # exactly the statistics the run began with
            return ColourStats.from_dict(self.resume_doc["training"]["colour_stats"], self.last_json)
        if os.path.exists(run_stats):
            return load_stats(run_stats)
        if self.args.stats:
            stats = load_stats(self.args.stats)
        else:
            stats = compute_stats(self.train_split, self.args.workers, self.args.progress)
        save_stats(run_stats, stats)
        self.new_files.append(run_stats)
        return stats

    # --- resume -----------------------------------------------------------------------------

    def load_resume(self) -> None:
        # rank 0 reads and every rank gets its copy: other nodes need no access to the run folder
        state_dict, document, optim_state, note = self.checked_on_main(
            lambda: checkpoint.load_newest_whole(self.run_dir, "last"), broadcast=True)
        if note and self.proc.is_main:
            warn(note)
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise VggOnnxError(f"{self.last_json}: weights do not fit this model ({str(e).splitlines()[0]})") from None
        self.optimizer.load_state_dict(optim_state)
        self.state = state_from_dict(document["training"]["state"], self.last_json)
        if self.state.stopped.startswith("reached --epochs"):  # a finished run may be extended with more --epochs
            self.state.stopped = ""
        self.set_lr(self.state.lr)
        if self.args.lr != document["training"]["args"].get("lr") and self.proc.is_main:
            warn(f"--lr {self.args.lr:g} ignored: a resumed run continues at its own learning rate {self.state.lr:g}")
        if self.restart and self.proc.is_main:
            steps = self.batches_per_epoch()
            tqdm.write(f"vgg-onnx: torchrun restart {self.restart}: resuming {self.run_dir} from its checkpoint of "
                       f"step {self.state.step} (epoch {self.state.epoch + 1}, step {self.state.step_in_epoch} of "
                       f"{steps})", file=sys.stderr)

    def batches_per_epoch(self) -> int:
        return len(self.train_split) // self.args.batch_size

    def set_lr(self, lr: float) -> None:
        self.state.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- checkpoints --------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.config.name, self.classes, self.norm, crop_size=self.args.crop,
                         width_mult=self.args.width_mult, train_scales=list(self.args.scale),
                         param_count=count_parameters(self.model))

    def save(self, name: str) -> None:
        """Rank 0 writes; a failure leaves the previous checkpoint of that name as it was."""
        if not self.proc.is_main:
            return
        state = dataclasses.asdict(self.state)
        state["best_top1"] = None if math.isinf(self.state.best_top1) else self.state.best_top1
        training = {
            "epoch": self.state.epoch, "step": self.state.step, "step_in_epoch": self.state.step_in_epoch,
            "lr": self.state.lr, "metrics": self.state.history[-1] if self.state.history else None,
            "state": state,
            "colour_stats": self.stats.to_dict(),
            "rng": {"seed": self.args.seed, "scheme": "numpy PCG64 / torch seeds derived from (stream, seed, epoch or step, "
                    "sample index or rank); nothing else is random, so no generator state is stored"},
            "args": dataclasses.asdict(self.args),
            "world_size": self.proc.world,
            "elastic": elastic_identity(self.agents),  # lets a torchrun restart recognise its own run
            "init_note": self.init_note,
        }
        try:
            checkpoint.save_checkpoint(self.run_dir, name, self.model.state_dict(), self.model_info(), training,
                                 self.optimizer.state_dict())
        except OSError as e:
            what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise VggOnnxError(f"{os.path.join(self.run_dir, name)}.safetensors: cannot save checkpoint ({what}); "
                               f"the previous {name} checkpoint is intact") from None
        if name == "last":
            self.saved_step = self.state.step

    def write_metrics(self) -> None:
        if self.proc.is_main:
            text = "".join(json.dumps(row) + "\n" for row in self.state.history)
            atomic_write_text(os.path.join(self.run_dir, METRICS_FILE), text)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> dict:
        args, state = self.args, self.state
        if self.proc.is_main and self.init_note:
            print(f"vgg-onnx: {self.init_note}", file=sys.stderr)
        try:
            while not state.stopped:
                if state.epoch >= args.epochs:
                    state.stopped = f"reached --epochs {args.epochs}"
                    break
                self.train_epoch()
                self.end_epoch()
        except BaseException:
            self.remove_new_run_dir()
            raise
        if self.proc.is_main and args.plot:
            from .plot import plot_run

            try:
                plot_run(self.run_dir)
            except VggOnnxError as e:
                warn(str(e))
        return self.summary()

    def train_epoch(self) -> None:
        args, state, proc = self.args, self.state, self.proc
        steps = self.batches.steps_per_epoch()
        self.batches.set_epoch(state.epoch, state.step_in_epoch)
        partial = state.partial or {"loss_sum": 0.0, "images": 0, "skipped": 0, "seconds": 0.0}
        self.ddp.train()
        bar = tqdm(total=steps, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{args.epochs}",
                   unit="step", file=sys.stderr, disable=not (proc.is_main and args.progress), dynamic_ncols=True)
        started = time.perf_counter()
        window_start, window_images = started, 0
        for images, labels, errors in self.train_loader:
            for message in errors:
                warn(f"{message} (skipped)")
            loss_sum, count = self.train_step(images, labels, len(errors))
            partial["loss_sum"] += loss_sum
            partial["images"] += count[0]
            partial["skipped"] += count[1]
            window_images += count[0]
            state.step += 1
            state.step_in_epoch += 1
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss_sum / max(count[0], 1):.4f}",
                            img_s=f"{window_images / max(now - window_start, 1e-9):.1f}", refresh=False)
            bar.update(1)
            if args.checkpoint_every and state.step % args.checkpoint_every == 0 and state.step_in_epoch < steps:
                partial_now = dict(partial, seconds=partial["seconds"] + now - started)
                state.partial = partial_now
                self.save("last")
        bar.close()
        partial["seconds"] += time.perf_counter() - started
        state.partial = partial

    def train_step(self, images, labels, skipped: int):
        """One SGD step on this process's part of the global batch. Returns the global loss sum and counts."""
        args, proc, state = self.args, self.proc, self.state
        torch.manual_seed(derived_seed(STEP_STREAM, args.seed, state.step, proc.rank))  # dropout masks
        if images is None:  # every image of this part was corrupt: an empty batch keeps the processes in step
            images = torch.zeros(0, 3, args.crop, args.crop)
        images = images.to(proc.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(proc.device, non_blocking=True)
        with torch.autocast(proc.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.ddp(images)
        loss_total = F.cross_entropy(logits.float(), labels, reduction="sum")
        loss = loss_total / max(len(labels), 1)
        loss_sum, count, nonfinite, skipped_all = all_reduce_sum(
            [float(loss_total.detach()), len(labels), float(not torch.isfinite(loss_total).item()), skipped], proc.device)
        if nonfinite:
            last = os.path.join(self.run_dir, "last.safetensors")
            kept = (f"the last good checkpoint {last} (step {self.saved_step}) is kept" if self.saved_step is not None
                    else "no checkpoint had been saved yet")
            raise VggOnnxError(f"loss is not finite at epoch {state.epoch + 1} step {state.step + 1} "
                               f"(learning rate {state.lr:g} too high?); training stopped, {kept}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss_sum, (int(count), int(skipped_all))

    @torch.no_grad()
    def validate(self) -> dict:
        model, proc = self.model, self.proc
        model.eval()
        loss_sum, top1, top5, count, skipped = 0.0, 0, 0, 0, 0
        k = min(5, len(self.classes))
        for images, labels, errors in self.val_loader:
            for message in errors:
                warn(f"{message} (skipped in validation)")
            skipped += len(errors)
            if images is None:
                continue
            images = images.to(proc.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            labels = labels.to(proc.device, non_blocking=True)
            with torch.autocast(proc.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            best = logits.topk(k, dim=1).indices
            hits = best == labels[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=1).sum())
            count += len(labels)
        loss_sum, top1, top5, count, skipped = all_reduce_sum([loss_sum, top1, top5, count, skipped], proc.device)
        if count == 0:
            raise VggOnnxError(f"{self.val_split.root}: no readable validation images")
        return {"val_loss": loss_sum / count, "val_top1_err": 1 - top1 / count, "val_top5_err": 1 - top5 / count,
                "val_images": int(count), "val_skipped": int(skipped)}

    def end_epoch(self) -> None:
        args, state = self.args, self.state
        partial = state.partial
        started = time.perf_counter()
        metrics = self.validate()
        state.epoch += 1
        row = {"epoch": state.epoch, "step": state.step,
               "train_loss": partial["loss_sum"] / max(partial["images"], 1),
               **metrics, "lr": state.lr, "train_images": partial["images"], "train_skipped": partial["skipped"],
               "train_seconds": round(partial["seconds"], 3),
               "images_per_second": round(partial["images"] / max(partial["seconds"], 1e-9), 2),
               "val_seconds": round(time.perf_counter() - started, 3)}
        state.history.append(row)
        state.step_in_epoch, state.partial = 0, {}
        self.warn_if_at_chance()
        improved = metrics["val_top1_err"] < state.best_top1
        if improved:
            state.best_top1, state.best_epoch, state.bad_epochs = metrics["val_top1_err"], state.epoch, 0
        else:
            state.bad_epochs += 1
        self.update_lr()
        if state.epoch >= args.epochs and not state.stopped:
            state.stopped = f"reached --epochs {args.epochs}"
        if self.proc.is_main:
            tqdm.write(f"epoch {state.epoch}: train loss {row['train_loss']:.4f}, val top-1 error "
                       f"{metrics['val_top1_err']:.2%}, top-5 error {metrics['val_top5_err']:.2%}, lr {row['lr']:g}, "
                       f"{row['images_per_second']:.1f} img/s" + (f", {partial['skipped']} corrupt images skipped"
                                                                  if partial["skipped"] else ""), file=sys.stderr)
        if improved:
            self.save("best")
        self.save("last")
        self.write_metrics()
        barrier()

    def warn_if_at_chance(self) -> None:
        """Say so, once per streak, when the training loss has stayed at chance level for several epochs."""
        chance = math.log(len(self.classes))
        streak = 0
        for row in reversed(self.state.history):
            if row["train_loss"] < CHANCE_FRACTION * chance:
                break
            streak += 1
        if streak == CHANCE_EPOCHS and self.proc.is_main:
            warn(f"the training loss has stayed at or above chance level (ln {len(self.classes)} = {chance:.3f}) for "
                 f"{CHANCE_EPOCHS} epochs: the net is not learning. Try --init glorot (if you chose gaussian), a 10x "
                 f"lower --lr, --init-from a trained net, or check that each class folder holds its class "
                 f"(--limit-per-class N makes quick trials)")

    def update_lr(self) -> None:
        args, state = self.args, self.state
        if args.milestones is not None:
            if state.epoch in args.milestones:
                state.divisions += 1
                self.set_lr(state.lr / 10)
            return
        if state.bad_epochs >= args.lr_patience:
            if state.divisions >= MAX_DIVISIONS:
                state.stopped = (f"validation top-1 error stopped improving after the learning rate was divided "
                                 f"{MAX_DIVISIONS} times")
            else:
                state.divisions += 1
                state.bad_epochs = 0
                self.set_lr(state.lr / 10)

    def summary(self) -> dict:
        last = self.state.history[-1] if self.state.history else {}
        return {"run_dir": self.run_dir, "epochs": self.state.epoch, "steps": self.state.step,
                "stopped": self.state.stopped, "best_epoch": self.state.best_epoch,
                "best_val_top1_err": None if math.isinf(self.state.best_top1) else self.state.best_top1,
                "last": last}


def train(args: TrainArgs) -> dict:
    """Train (this process's share, under torchrun); returns the run's summary."""
    proc = setup()
    try:
        summary = Trainer(args, proc).run()
        # rank 0 plots while the others wait here: no process leaves (rank 0's leaving ends the job's
        # key-value store) while another still talks to it
        barrier()
        return summary
    finally:
        cleanup()
