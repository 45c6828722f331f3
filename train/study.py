"""The paper's findings in miniature: train the nets, export and evaluate them, write the report.

    python -m vgg_onnx.train.study --budget full --data path/to/imagenette --work runs/study
    python -m vgg_onnx.train.study --budget quick --data DATA --work /tmp/study-quick   # minutes
    python -m vgg_onnx.train.study --report-only ...        # tables and plots from what exists

Every step is a command of the project itself (`python -m vgg_onnx.train`, `vgg-onnx export`,
`vgg-onnx eval --format json`) run in a subprocess, so a failed step is reported and the
study goes on with the steps that do not depend on it. Each step's output stays in WORK: a
second invocation resumes interrupted trainings (`--resume`) and skips finished steps, so
the study survives interruptions. The report (Tables 3-6 of docs/protocol.md §4 in
miniature, plots, a verdict per finding) is written from whatever results exist, with the
missing ones marked pending.

Beside the report the study keeps its records (REPORT.json: every run's per-epoch metrics and
every evaluation report, with DATA and WORK in place of the folders). The report is written
from WORK and, for what WORK no longer holds (a deleted or lost work folder), from the records,
so a study spread over machines or sessions keeps its finished results.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import click

from vgg_onnx.atomic import atomic_path, atomic_write_text
from vgg_onnx.errors import UsageError, VggOnnxError

__all__ = ["Budget", "BUDGETS", "RunSpec", "RUNS", "EvalSpec", "PAPER", "paper_scales", "eval_plan",
           "train_command", "run_status", "collect", "findings", "write_report", "read_records", "records",
           "main"]

SOURCE = "Simonyan & Zisserman, ICLR 2015, arXiv:1409.1556"
PAPER_CROP = 224


@dataclass(frozen=True)
class Budget:
    """How big the miniature is: net width, crop, data and the limits of the schedule."""

    name: str
    width_mult: float
    crop: int
    batch_size: int
    epochs: int  # the cap; the plateau rule normally ends a run first
    lr_patience: int
    train_per_class: int | None  # None: every training image
    val_per_class: int | None
    multicrop_limit: int  # images for the multi-crop tables (150 crops per image cost ~100x dense)
    workers: int = 1
    checkpoint_every: int = 40


BUDGETS = {
    "full": Budget("full", width_mult=0.125, crop=128, batch_size=128, epochs=60, lr_patience=3,
                   train_per_class=None, val_per_class=None, multicrop_limit=1000),
    "quick": Budget("quick", width_mult=0.0625, crop=32, batch_size=8, epochs=1, lr_patience=1,
                    train_per_class=8, val_per_class=4, multicrop_limit=20, checkpoint_every=0),
}


def paper_scales(crop: int) -> tuple[int, tuple[int, int]]:
    """The paper's S = 256 and [256, 512] for a 224 crop, scaled to `crop` (146, [146, 292] for 128)."""
    return crop * 256 // PAPER_CROP, (crop * 256 // PAPER_CROP, crop * 512 // PAPER_CROP)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    name: str
    config: str
    jitter: bool = False  # S uniform in [Smin, Smax] instead of fixed S
    init_from: str | None = None  # name of the run whose best checkpoint initialises this one
    paper_row: str = ""  # the paper's Table 3 cell it mirrors: "<config> <S>"
    why: str = ""


# In training order: every run comes after the run it is initialised from.
RUNS = (
    RunSpec("A", "A", paper_row="A 256", why="the shallow net, from random (Glorot) weights"),
    RunSpec("D", "D", init_from="A", paper_row="D 256", why="deeper (16 layers), initialised from A"),
    RunSpec("D-jitter", "D", jitter=True, init_from="A", paper_row="D [256,512]",
            why="scale jittering; initialised from A like D, so the two differ only in S"),
    RunSpec("C", "C", init_from="A", paper_row="C 256", why="1x1 convs in blocks 3-5, initialised from A"),
    RunSpec("A-LRN", "A-LRN", paper_row="A-LRN 256", why="A plus local response normalisation"),
    RunSpec("D-glorot", "D", paper_row="D 256", why="D from Glorot weights, without A (the paper's remark)"),
)

# Simonyan & Zisserman, ICLR 2015, Tables 3-6 (ILSVRC-2012 validation, top-1 / top-5 error %)
PAPER = {
    "table3": {"A 256": (29.6, 10.4), "A-LRN 256": (29.7, 10.5), "B 256": (28.7, 9.9), "C 256": (28.1, 9.4),
               "C 384": (28.1, 9.3), "C [256,512]": (27.3, 8.8), "D 256": (27.0, 8.8), "D 384": (26.8, 8.7),
               "D [256,512]": (25.6, 8.1), "E 256": (27.3, 9.0), "E 384": (26.9, 8.7), "E [256,512]": (25.5, 8.0)},
    "table4": {"D [256,512]": (24.8, 7.5), "E [256,512]": (24.8, 7.5), "D 256": (26.6, 8.6),
               "C [256,512]": (26.3, 8.2)},
    "table5": {"dense": (24.8, 7.5), "multi-crop": (24.6, 7.5), "both": (24.4, 7.2)},  # D, S in [256,512]
    "table6": {"dense": (24.0, 7.1), "both": (23.7, 6.8)},  # D + E
}
DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
METHODS = ("dense", "multi-crop", "both")
RECORDS_FORMAT = 1
NEAR_CHANCE = 85.0  # top-1 error (%) above which a net has barely learned (chance: 90 % for 10 classes)


@dataclass(frozen=True)
class EvalSpec:
    """One `vgg-onnx eval` invocation; its JSON report goes to WORK/eval/<key>.json."""

    key: str
    models: tuple[str, ...]  # run names
    scales: tuple[int, ...] = ()  # () = each model's own default scales
    methods: tuple[str, ...] = ("dense",)
    limit: int | None = None


def run_scale(spec: RunSpec, crop: int) -> list[int]:
    fixed, jittered = paper_scales(crop)
    return list(jittered) if spec.jitter else [fixed]


def single_test_scale(spec: RunSpec, crop: int) -> int:
    """docs/protocol.md §3: Q = S for fixed S, Q = (Smin + Smax) / 2 for jittered S."""
    scale = run_scale(spec, crop)
    return sum(scale) // len(scale)


def sweep_scales(crop: int) -> list[int]:
    """Test scales of the error-by-scale plot: the crop, S, S+32, the middle and the top of [Smin, Smax]."""
    fixed, (low, high) = paper_scales(crop)
    return sorted({crop, fixed, fixed + 32, (low + high) // 2, high})


def eval_plan(budget: Budget, runs=RUNS, best_two: tuple[str, str] | None = None) -> list[EvalSpec]:
    """Evaluations behind Tables 3-6 and the scale plot; fusion only once the two best nets are known."""
    plan = []
    for spec in runs:
        plan += [EvalSpec(f"{spec.name}_Q{q}", (spec.name,), (q,)) for q in sweep_scales(budget.crop)]
        plan.append(EvalSpec(f"{spec.name}_multiscale", (spec.name,)))
    plan += [EvalSpec(f"{name}_methods", (name,), methods=METHODS, limit=budget.multicrop_limit)
             for name in ("D-jitter", "D")]
    if best_two:
        plan.append(EvalSpec("fusion", best_two, methods=METHODS, limit=budget.multicrop_limit))
    return plan


def train_command(spec: RunSpec, budget: Budget, data: str, work: str, resume: bool) -> list[str]:
    """The `python -m vgg_onnx.train` command line of one run (the paper's recipe, scaled down)."""
    cmd = [sys.executable, "-m", "vgg_onnx.train", "--config", spec.config, "--data", data,
           "--out", os.path.join(work, spec.name), "--width-mult", f"{budget.width_mult:g}",
           "--crop", str(budget.crop), "--scale", ",".join(map(str, run_scale(spec, budget.crop))),
           "--batch-size", str(budget.batch_size), "--epochs", str(budget.epochs), "--lr", "0.01",
           "--init", "glorot", "--lr-patience", str(budget.lr_patience), "--workers", str(budget.workers),
           "--checkpoint-every", str(budget.checkpoint_every), "--no-progress"]
    if spec.init_from:
        source = os.path.join(work, spec.init_from)
        cmd += ["--init-from", os.path.join(source, "best.safetensors"),
                "--stats", os.path.join(source, "stats.json")]
    return cmd + (["--resume"] if resume else [])


def eval_command(spec: EvalSpec, data: str, work: str) -> list[str]:
    cmd = [sys.executable, "-m", "vgg_onnx", "eval", os.path.join(data, "val")]
    for name in spec.models:
        cmd += ["--model", model_path(work, name)]
    if spec.scales:
        cmd += ["--scales", ",".join(map(str, spec.scales))]
    cmd += ["--methods", ",".join(spec.methods), "--provider", "cpu", "--format", "json",
            "--output", os.path.join(work, "eval", spec.key + ".json")]
    return cmd + (["--limit", str(spec.limit)] if spec.limit else [])


def model_path(work: str, name: str) -> str:
    return os.path.join(work, "models", name + ".onnx")


def shell_line(cmd: list[str]) -> str:
    """A command as the report shows it: `python` for the interpreter, paths as given."""
    return " ".join(["python"] + [c if c and " " not in c else json.dumps(c) for c in cmd[1:]])


# ---------------------------------------------------------------- state of the runs


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(run_dir: str) -> list[dict]:
    rows = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash while appending: the epochs before it still count
    except OSError:
        pass
    return rows


def run_status(work: str, spec: RunSpec, budget: Budget) -> dict:
    """not started / in progress (or interrupted) / finished, with the epochs done and why it stopped."""
    last = read_json(os.path.join(work, spec.name, "last.json")) or {}
    state = last.get("training", {}).get("state", {})
    epochs = last.get("training", {}).get("epoch", state.get("epoch", 0))
    stopped = state.get("stopped", "")
    if not last:
        status = "not started"
    elif stopped and not (stopped.startswith("reached --epochs") and epochs < budget.epochs):
        status = "finished"
    else:
        status = "in progress or interrupted"
    return {"status": status, "epochs": epochs, "stopped": stopped}


# ---------------------------------------------------------------- running the steps


def run_logged(cmd: list[str], log_path: str) -> int:
    """Run a step with its output appended to log_path; the exit status."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shell_line(cmd)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def quick_subset(data: str, work: str, budget: Budget) -> str:
    """A folder of symlinks to the first N images per class of each split (the images stay where they are)."""
    if budget.train_per_class is None:
        return data
    subset = os.path.join(work, "data")
    if os.path.isdir(subset):
        return subset
    staging = subset + ".partial"
    for split, count in (("train", budget.train_per_class), ("val", budget.val_per_class)):
        split_dir = os.path.join(data, split)
        if not os.path.isdir(split_dir):
            raise UsageError(f"{split_dir}: missing (DATA needs train/<class>/ and val/<class>/)")
        for cls in sorted(os.listdir(split_dir)):
            if not os.path.isdir(os.path.join(split_dir, cls)):
                continue
            os.makedirs(os.path.join(staging, split, cls), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(split_dir, cls)))[:count]:
                link = os.path.join(staging, split, cls, name)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(split_dir, cls, name)), link)
    os.replace(staging, subset)
    return subset


@dataclass
class Runner:
    """Runs the study's steps in order, skipping finished ones and those whose inputs failed."""

    budget: Budget
    data: str
    work: str
    failed: list[str] = field(default_factory=list)

    def train(self, spec: RunSpec) -> bool:
        state = run_status(self.work, spec, self.budget)
        if state["status"] == "finished":
            return True
        source = next((r for r in RUNS if r.name == spec.init_from), None)
        if source and run_status(self.work, source, self.budget)["status"] != "finished":
            self.failed.append(f"train {spec.name}: {spec.init_from} has not finished training, nothing to start from")
            return False
        cmd = train_command(spec, self.budget, self.data, self.work, resume=state["status"] != "not started")
        code = run_logged(cmd, os.path.join(self.work, spec.name, "train.log"))
        if code:
            self.failed.append(f"train {spec.name}: exit status {code}, see {spec.name}/train.log")
        return code == 0

    def export(self, spec: RunSpec) -> bool:
        weights = os.path.join(self.work, spec.name, "best.safetensors")
        out = model_path(self.work, spec.name)
        if not os.path.exists(weights):
            return False
        if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(weights):
            return True
        cmd = [sys.executable, "-m", "vgg_onnx", "export", "--weights", weights, "--out", out]
        code = run_logged(cmd, os.path.join(self.work, "logs", f"export_{spec.name}.log"))
        if code:
            self.failed.append(f"export {spec.name}: exit status {code}, see logs/export_{spec.name}.log")
        return code == 0

    def evaluate(self, spec: EvalSpec) -> None:
        out = os.path.join(self.work, "eval", spec.key + ".json")
        models = [model_path(self.work, name) for name in spec.models]
        if not all(os.path.exists(m) for m in models):
            return
        if (os.path.exists(out) and os.path.getmtime(out) >= max(map(os.path.getmtime, models))
                and report_models(read_json(out)) == spec.models):  # fusion: the same pair as now
            return
        code = run_logged(eval_command(spec, self.data, self.work), os.path.join(self.work, "logs", "eval.log"))
        if code:
            self.failed.append(f"eval {spec.key}: exit status {code}, see logs/eval.log")


def run_study(budget: Budget, data: str, work: str, runs=RUNS) -> list[str]:
    """Train, export and evaluate every net in turn (resumably); the steps that failed."""
    from tqdm import tqdm

    runner = Runner(budget, quick_subset(data, work, budget), work)
    with tqdm(total=2 * len(runs) + 1, desc="study", unit="step", file=sys.stderr) as bar:
        for spec in runs:
            bar.set_postfix_str(f"train {spec.name}")
            trained = runner.train(spec)
            bar.update(1)
            bar.set_postfix_str(f"export + eval {spec.name}")
            if trained and runner.export(spec):
                for item in eval_plan(budget, [spec]):
                    if item.models == (spec.name,) and item.limit is None:
                        runner.evaluate(item)
            bar.update(1)
        bar.set_postfix_str("multi-crop and fusion")
        study = collect(budget, work, runs)
        for item in eval_plan(budget, runs, best_two(study)):
            if item.limit is not None:
                runner.evaluate(item)
        bar.update(1)
    return runner.failed


# ---------------------------------------------------------------- collecting results


def eval_row(report: dict | None, model: str | None = None) -> dict | None:
    """{method: (top-1, top-5, images)} of one row of a `vgg-onnx eval --format json` report."""
    if not report or not report.get("rows"):
        return None
    rows = report["rows"]
    row = rows[-1] if model is None else next((r for r in rows if os.path.basename(r["model"]) == model), None)
    if row is None:
        return None
    return {m: (row[m]["top1_error"], row[m]["top5_error"], row[m]["images"]) for m in report["methods"]}


def collect(budget: Budget, work: str, runs=RUNS, kept: dict | None = None) -> dict:
    """Everything the report needs: run states, metrics, eval reports and their commands.

    Read from WORK; a run that WORK has not started and an eval report that WORK lacks come from
    `kept` (read_records) when it has them. Commands are shown with DATA and WORK for the folders."""
    kept = kept or {}
    study = {"budget": asdict(budget), "work": work, "runs": {}, "evals": {}, "from_records": {"runs": [], "evals": []}}
    for spec in runs:
        state, metrics = run_status(work, spec, budget), read_metrics(os.path.join(work, spec.name))
        old = kept.get("runs", {}).get(spec.name)
        if state["status"] == "not started" and not metrics and old:
            state = {k: old[k] for k in ("status", "epochs", "stopped")}
            metrics = old.get("metrics", [])
            study["from_records"]["runs"].append(spec.name)
        study["runs"][spec.name] = {
            **asdict(spec), **state, "metrics": metrics, "summary": (old or {}).get("summary") if not metrics else None,
            "scale": run_scale(spec, budget.crop), "test_scale": single_test_scale(spec, budget.crop),
            "command": shell_line(train_command(spec, budget, "DATA", "WORK", resume=False))}

    def report(key: str) -> dict | None:
        found = read_json(os.path.join(work, "eval", key + ".json"))
        if found is None and kept.get("evals", {}).get(key):
            study["from_records"]["evals"].append(key)
            return kept["evals"][key]
        return found

    for item in eval_plan(budget, runs):
        study["evals"][item.key] = report(item.key)
    pair = best_two(study)
    if pair:
        study["evals"]["fusion"] = report("fusion")
    # Table 6 shows the pair its report fused, which may be an earlier best two than Table 4's now
    fused = report_models(study["evals"].get("fusion")) or pair
    study["commands"] = {item.key: shell_line(eval_command(item, "DATA", "WORK"))
                         for item in eval_plan(budget, runs, fused)}
    study["fusion_pair"] = list(fused) if fused else None
    study["best_two"] = list(pair) if pair else None
    return study


def report_models(report: dict | None) -> tuple[str, ...] | None:
    """The run names of the models an eval report evaluated (WORK/models/<run>.onnx)."""
    if not report or not report.get("models"):
        return None
    return tuple(os.path.splitext(os.path.basename(m))[0] for m in report["models"])


def read_records(path: str) -> dict:
    """The records a previous report kept (see `records`); {} when there are none yet."""
    if not os.path.exists(path):
        return {}
    kept = read_json(path)
    if (not isinstance(kept, dict) or kept.get("format") != RECORDS_FORMAT or not isinstance(kept.get("budget"), dict)
            or not all(isinstance(kept.get(k), dict) for k in ("runs", "evals"))):
        raise UsageError(f"{path}: not a study records file of format {RECORDS_FORMAT} (move it aside to start anew)")
    return kept


def records(study: dict, data: str) -> dict:
    """What the report was made from, machine-readable and free of this machine's folders: per run its
    state and per-epoch metrics, every eval report, and the verdicts."""
    folders = [(os.path.abspath(study["work"]), "WORK"), (study["work"], "WORK"),
               (os.path.abspath(data), "DATA"), (data, "DATA")]

    def portable(value):
        if isinstance(value, str):
            for folder, name in folders:
                if value == folder or value.startswith(folder.rstrip(os.sep) + os.sep):
                    return name + value[len(folder.rstrip(os.sep)):]
            return value
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        return [portable(v) for v in value] if isinstance(value, list) else value

    runs = {name: {k: run[k] for k in ("status", "epochs", "stopped", "metrics")} | (
        {"summary": run["summary"]} if run.get("summary") else {}) for name, run in study["runs"].items()
        if run["status"] != "not started"}
    return {"format": RECORDS_FORMAT, "budget": study["budget"], "runs": runs,
            "evals": {key: portable(report) for key, report in study["evals"].items() if report},
            "findings": findings(study)}


def best_two(study: dict) -> tuple[str, str] | None:
    """The two nets with the lowest multi-scale dense top-1 error (docs/protocol.md §4, Table 6)."""
    scored = []
    for name in study["runs"]:
        row = eval_row(study["evals"].get(f"{name}_multiscale"))
        if row:
            scored.append((row["dense"][0], name))
    scored.sort()
    return (scored[0][1], scored[1][1]) if len(scored) >= 2 else None


def cell(study: dict, key: str, method: str = "dense", model: str | None = None) -> tuple | None:
    """(top-1, top-5, images) of one method in one eval report, or None while it does not exist."""
    row = eval_row(study["evals"].get(key), model)
    return row.get(method) if row else None


# ---------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    """One claim of the paper, tested by comparing the top-1 error of `ours` against `baseline`."""

    claim: str
    ours: str  # what is measured, in words
    expect: str  # "lower": ours must be significantly lower; "no-gain": ours must not be; "no-loss": ours must not be higher


def two_se(a: tuple, b: tuple) -> float:
    """Twice the standard error of a difference of two error rates (points), from binomial variances."""
    pa, pb = a[0] / 100, b[0] / 100
    return 200 * math.sqrt(pa * (1 - pa) / max(a[2], 1) + pb * (1 - pb) / max(b[2], 1))


def finding_pairs(study: dict) -> list[tuple[Finding, tuple | None, tuple | None]]:
    """Each finding with its two measurements (top-1, top-5, images), None where not yet measured."""
    q = {name: run["test_scale"] for name, run in study["runs"].items()}
    single = {name: cell(study, f"{name}_Q{scale}") for name, scale in q.items()}
    # Tables 4 and 5 on the jittered D as the paper, or on D while D-jitter is not measured yet
    # (the paper's multi-scale and multi-crop gains hold for its fixed-S nets too)
    scaled = "D-jitter" if cell(study, "D-jitter_multiscale") and single.get("D-jitter") else "D"
    cropped = "D-jitter" if cell(study, "D-jitter_methods") else "D"
    methods = {m: cell(study, f"{cropped}_methods", m) for m in METHODS}
    split = [v for v in (methods["dense"], methods["multi-crop"]) if v]
    fused, members = cell(study, "fusion"), None
    if study.get("fusion_pair") and fused:
        members = [cell(study, "fusion", "dense", os.path.basename(m) + ".onnx") for m in study["fusion_pair"]]
        members = min(members, key=lambda v: v[0]) if all(members) else None
    return [
        (Finding("LRN does not improve A", "A-LRN vs A (Table 3)", "no-gain"), single.get("A-LRN"), single.get("A")),
        (Finding("Deeper is better", "D vs A (Table 3, fixed S)", "lower"), single.get("D"), single.get("A")),
        (Finding("3x3 convs beat 1x1 convs at the same depth", "D vs C (Table 3)", "lower"),
         single.get("D"), single.get("C")),
        (Finding("Scale jittering in training beats a fixed S", "D-jitter vs D (Table 3, one test scale)", "lower"),
         single.get("D-jitter"), single.get("D")),
        (Finding("Multi-scale testing beats one test scale", f"{scaled}, 3 scales vs 1 (Table 4 vs 3)", "lower"),
         cell(study, f"{scaled}_multiscale"), single.get(scaled)),
        (Finding("Dense and multi-crop are complementary",
                 f"{cropped}: both vs the better of dense and multi-crop (Table 5)", "lower"),
         methods["both"] if len(split) == 2 else None, min(split) if len(split) == 2 else None),
        (Finding("Fusing two nets helps", "fusion vs its better member, dense (Table 6)", "lower"), fused, members),
        (Finding("Glorot initialisation works without pre-training A", "D-glorot vs D from A (Table 3)", "no-loss"),
         single.get("D-glorot"), single.get("D")),
    ]


def verdict(finding: Finding, ours: tuple | None, base: tuple | None, limits: str) -> tuple[str, str]:
    """(reproduced | not reproduced | inconclusive | pending, the reason in one sentence)."""
    if ours is None or base is None:
        return "pending", "not measured yet (the runs or evaluations it needs have not finished)"
    if max(ours[0], base[0]) >= NEAR_CHANCE:
        return "inconclusive", (f"{ours[0]:.1f} vs {base[0]:.1f} % top-1: a net near chance (90 %) has not "
                                f"learned enough to compare ({limits})")
    diff, margin = ours[0] - base[0], two_se(ours, base)
    figures = (f"{ours[0]:.1f} vs {base[0]:.1f} % top-1 ({diff:+.1f} points; twice the standard error is "
               f"{margin:.1f}; {ours[2]} / {base[2]} images)")
    if finding.expect == "lower":
        if diff < -margin:
            return "reproduced", figures
        if diff > margin:
            return "not reproduced", f"{figures}: the opposite holds here ({limits})"
        return "inconclusive", f"{figures}: the difference is within noise ({limits})"
    worse = diff > margin if finding.expect == "no-loss" else diff < -margin
    if worse:
        return "not reproduced", f"{figures}: a significant difference ({limits})"
    if abs(diff) > margin:  # significant, in the direction the claim allows
        return "reproduced", f"{figures}: significantly {'lower' if diff < 0 else 'higher'}, which the claim allows"
    return "reproduced", f"{figures}: no significant difference, as the paper says"


def findings(study: dict) -> list[dict]:
    """The verdict on every finding, machine-readable."""
    b = study["budget"]
    limits = (f"width {b['width_mult']:g}, 10 classes, crop {b['crop']}, "
              f"{'all' if b['train_per_class'] is None else b['train_per_class']} training images per class")
    out = []
    for finding, ours, base in finding_pairs(study):
        result, reason = verdict(finding, ours, base, limits)
        out.append({"claim": finding.claim, "compared": finding.ours, "verdict": result, "reason": reason})
    return out


# ---------------------------------------------------------------- plots


def plot_figure(path: str, draw) -> str:
    """Draw with draw(plt) and save a PNG atomically (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_depth(study: dict):
    """Table 3 top-1 error against the number of weight layers, ours beside the paper's."""
    def draw(plt):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for name, run in study["runs"].items():
            ours = cell(study, f"{name}_Q{run['test_scale']}")
            paper = PAPER["table3"].get(run["paper_row"])
            x = DEPTH[run["config"]] + (0.3 if run["jitter"] else 0) + (0.15 if "glorot" in name else 0)
            if ours:
                left.scatter(x, ours[0]), left.annotate(name, (x, ours[0]), fontsize=8)
            if paper and "glorot" not in name:
                right.scatter(x, paper[0]), right.annotate(run["paper_row"], (x, paper[0]), fontsize=8)
        left.set_title(f"ours: Imagenette val, width {study['budget']['width_mult']:g}")
        right.set_title("paper: ILSVRC-2012 val (Table 3)")
        for ax in (left, right):
            ax.set_xlabel("weight layers"), ax.set_ylabel("top-1 error (%), one test scale")
            ax.grid(alpha=0.3)
        return fig
    return draw


def draw_scales(study: dict):
    """Dense top-1 error of every net against the test scale Q."""
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in study["runs"]:
            points = [(int(key.rsplit("_Q", 1)[1]), cell(study, key)) for key in study["evals"]
                      if key.startswith(name + "_Q")]
            points = sorted((q, v[0]) for q, v in points if v)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("test scale Q (shorter side, px)"), ax.set_ylabel("top-1 error (%), dense")
        ax.set_title("error by test scale"), ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        return fig
    return draw


def draw_curves(study: dict):
    """Validation top-1 error (centre crop) and training loss of every run, by epoch."""
    def draw(plt):
        fig, (err, loss) = plt.subplots(1, 2, figsize=(10, 4))
        for name, run in study["runs"].items():
            rows = run["metrics"]
            if rows:
                epochs = [r["epoch"] for r in rows]
                err.plot(epochs, [100 * r["val_top1_err"] for r in rows], label=name)
                loss.plot(epochs, [r["train_loss"] for r in rows], label=name)
        err.set_ylabel("val top-1 error (%), centre crop"), loss.set_ylabel("training loss")
        for ax in (err, loss):
            ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        return fig
    return draw


PLOTS = {"error_by_depth": draw_depth, "error_by_scale": draw_scales, "training_curves": draw_curves}


# ---------------------------------------------------------------- the report


def pct(value: tuple | None) -> str:
    return "pending" if value is None else f"{value[0]:.1f} / {value[1]:.1f}"


def run_figures(run: dict) -> dict:
    """Epochs, best centre-crop validation error, minutes and images/s from a run's metrics.jsonl."""
    rows, summary = run["metrics"], run.get("summary")
    if not rows and summary:  # a run recorded only by its figures
        return {"epochs": summary["epochs"], "best": f"{summary['best_top1']:.1f} / {summary['best_top5']:.1f} "
                f"(epoch {summary['best_epoch']})", "minutes": f"{summary['minutes']:.1f}",
                "ips": f"{summary['images_per_second']:.0f}"}
    if not rows:
        return {"epochs": 0, "best": "-", "minutes": "-", "ips": "-"}
    best = min(rows, key=lambda r: r["val_top1_err"])
    seconds = sum(r.get("train_seconds", 0) + r.get("val_seconds", 0) for r in rows)
    images = sum(r.get("train_images", 0) for r in rows)
    return {"epochs": len(rows), "best": f"{100 * best['val_top1_err']:.1f} / {100 * best['val_top5_err']:.1f} "
            f"(epoch {best['epoch']})", "minutes": f"{seconds / 60:.1f}",
            "ips": f"{images / max(sum(r.get('train_seconds', 0) for r in rows), 1e-9):.0f}"}


def runs_section(study: dict) -> list[str]:
    lines = ["| run | config | S | initialised from | status | epochs | best val top-1 / top-5 % (centre crop) "
             "| minutes | train img/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, run in study["runs"].items():
        fig = run_figures(run)
        status = run["status"] + (f" ({run['stopped']})" if run["stopped"] else "")
        lines.append(f"| {name} | {run['config']} | {','.join(map(str, run['scale']))} | "
                     f"{run['init_from'] or 'Glorot'} | {status} | {fig['epochs']} | {fig['best']} | "
                     f"{fig['minutes']} | {fig['ips']} |")
    lines += ["", "Training commands (`--resume` is added when a run folder already holds a checkpoint):", "",
              "```sh"] + [run["command"] for run in study["runs"].values()] + ["```"]
    return lines


def table3(study: dict) -> list[str]:
    lines = ["| run | config | train S | test Q | ours top-1 / top-5 % | paper (row) top-1 / top-5 % | eval |",
             "|---|---|---|---|---|---|---|"]
    for name, run in study["runs"].items():
        key = f"{name}_Q{run['test_scale']}"
        paper = PAPER["table3"].get(run["paper_row"])
        lines.append(f"| {name} | {run['config']} | {','.join(map(str, run['scale']))} | {run['test_scale']} | "
                     f"{pct(cell(study, key))} | {pct(paper)} ({run['paper_row']}) | `{key}` |")
    return lines


def table4(study: dict) -> list[str]:
    lines = ["| run | train S | test Q (the model's defaults) | ours top-1 / top-5 % | paper top-1 / top-5 % | eval |",
             "|---|---|---|---|---|---|"]
    for name, run in study["runs"].items():
        report = study["evals"].get(f"{name}_multiscale")
        scales = report.get("scales") if report else None
        paper = PAPER["table4"].get(run["paper_row"]) if "glorot" not in name else None
        lines.append(f"| {name} | {','.join(map(str, run['scale']))} | {scales or 'pending'} | "
                     f"{pct(cell(study, f'{name}_multiscale'))} | {pct(paper) if paper else '-'} | "
                     f"`{name}_multiscale` |")
    return lines


def table5(study: dict) -> list[str]:
    lines = ["| run | images | dense | multi-crop | both | eval |", "|---|---|---|---|---|---|"]
    for name in ("D-jitter", "D"):
        values = [cell(study, f"{name}_methods", m) for m in METHODS]
        images = next((v[2] for v in values if v), "pending")
        lines.append(f"| {name} | {images} | " + " | ".join(pct(v) for v in values) + f" | `{name}_methods` |")
    lines.append("| paper: D, S in [256,512] | 50,000 | " + " | ".join(pct(PAPER["table5"][m]) for m in METHODS)
                 + " | |")
    return lines


def table6(study: dict) -> list[str]:
    pair = study.get("fusion_pair")
    lines = ["| nets | images | dense | multi-crop | both |", "|---|---|---|---|---|"]
    if pair:
        for model in list(pair) + [None]:
            values = [cell(study, "fusion", m, None if model is None else model + ".onnx") for m in METHODS]
            label = " + ".join(pair) + " (fused)" if model is None else model + " alone"
            images = next((v[2] for v in values if v), "pending")
            lines.append(f"| {label} | {images} | " + " | ".join(pct(v) for v in values) + " |")
    else:
        lines.append("| the two best nets of Table 4 | pending | pending | pending | pending |")
    lines.append(f"| paper: D + E | 50,000 | {pct(PAPER['table6']['dense'])} | - | {pct(PAPER['table6']['both'])} |")
    best = study.get("best_two")
    if pair and best and set(best) != set(pair):
        lines += ["", f"The two best nets of Table 4 are now {' and '.join(best)}; the fusion above is of the two "
                  "that were best when it was measured. The study fuses the new pair when both models exist in WORK."]
    return lines


def recipe_section(study: dict) -> list[str]:
    b = study["budget"]
    fixed, (low, high) = paper_scales(b["crop"])
    data = "all" if b["train_per_class"] is None else f"{b['train_per_class']} per class (symlinks)"
    return [
        f"Budget `{b['name']}`: crop {b['crop']}, width multiplier {b['width_mult']:g}, training images: {data}.",
        "",
        "| setting | paper (docs/protocol.md §2) | here | why |", "|---|---|---|---|",
        f"| crop | 224 | {b['crop']} | compute; fc6 becomes a {b['crop'] // 32}x{b['crop'] // 32} conv |",
        f"| training scale | S = 256; S in [256, 512] | S = {fixed}; S in [{low}, {high}] "
        f"| the paper's scales times {b['crop']}/224 |",
        f"| width | 1 | {b['width_mult']:g} (fc6/fc7 {int(4096 * b['width_mult'])}) "
        "| two shared CPU cores; a shipped checkpoint under 5 MiB |",
        f"| batch, learning rate | 256, 0.01 | {b['batch_size']}, 0.01 | a 9,469-image training set gives "
        f"37 steps an epoch at batch 256; the smaller batch keeps the paper's rate and gives "
        f"{256 // b['batch_size']}x the updates (batch 64 was unstable at this rate: Runs) |",
        "| momentum, weight decay, dropout | 0.9, 5e-4, 0.5 | the same | |",
        f"| rate schedule | /10 when validation stops improving, 3 times | /10 after {b['lr_patience']} epochs "
        f"without a lower val top-1 error, 3 times, then stop after another {b['lr_patience']} (cap "
        f"{b['epochs']} epochs) | the paper's rule; the patience is not stated there |",
        "| initialisation | A: N(0, 0.01); deeper nets: 4 conv + 3 FC layers from A | A and the other layers: "
        "Glorot; deeper nets from A as the paper | N(0, 0.01) leaves logits of std 2e-8 at this width "
        "(docs/training.md); Glorot is the paper's own alternative |",
        "| jittered net | fine-tuned from S = 384 | from A, like D | D and D-jitter then differ only in S |",
        "| augmentation, mean subtraction | crop, flip, PCA colour shift, mean RGB | the same | |",
        "", "Evaluation: the exported ONNX models, `vgg-onnx eval --format json` on the validation images "
        f"(dense evaluation with mirrors; multi-crop on the first {b['multicrop_limit']} images taken class by "
        "class, because 150 crops per image cost about 100 dense passes).",
    ]


def findings_section(study: dict) -> list[str]:
    lines = ["| finding (docs/protocol.md §4) | compared | verdict | why |", "|---|---|---|---|"]
    lines += [f"| {f['claim']} | {f['compared']} | **{f['verdict']}** | {f['reason']} |" for f in findings(study)]
    lines += ["", "A difference counts when it exceeds twice the standard error of the difference of two "
              "binomial error rates; the comparisons are on the same images, so this is conservative."]
    return lines


def commands_section(study: dict) -> list[str]:
    return ["Each table row's `eval` key is the JSON report WORK/eval/KEY.json, made by:", "", "```sh"] + \
        [f"# {key}\n{cmd}" for key, cmd in study["commands"].items()] + ["```"]


def report_text(study: dict, images: dict[str, str], header: list[str]) -> str:
    """The whole Markdown report; images maps plot names to paths relative to the report."""
    b = study["budget"]
    parts = [
        ["# The paper's findings in miniature (Imagenette)", ""] + header,
        ["## Recipe", ""] + recipe_section(study),
        ["## Runs", ""] + runs_section(study),
        ["## Table 3: one test scale (dense, Q = S, or the middle of [Smin, Smax])", ""] + table3(study),
        ["## Table 4: three test scales (dense, {S-32, S, S+32} or {Smin, middle, Smax})", "",
         "A default scale below the crop is raised to the crop (docs/training.md).", ""] + table4(study),
        ["## Table 5: dense, multi-crop and both (the model's three test scales)", ""] + table5(study),
        ["## Table 6: fusion of the two best nets of Table 4 (same images as Table 5)", ""] + table6(study),
        ["## Plots", ""] + [f"![{name.replace('_', ' ')}]({path})" for name, path in images.items()],
        ["## Findings", ""] + findings_section(study),
        ["## Commands", "", f"All paths are under WORK = `{study['work']}`; DATA is the Imagenette folder "
         f"(budget `{b['name']}`).", ""] + commands_section(study),
        [f"The paper's numbers: {SOURCE}, Tables 3-6 (ILSVRC-2012 validation, 1000 classes; "
         "restated in docs/protocol.md §4)."],
    ]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def write_report(study: dict, report: str, header: list[str] | None = None) -> list[str]:
    """Write the Markdown report and its PNG plots (REPORT_DIR/img/study_*.png); the files written."""
    img_dir = os.path.join(os.path.dirname(os.path.abspath(report)), "img")
    written = [plot_figure(os.path.join(img_dir, f"study_{name}.png"), draw(study)) for name, draw in PLOTS.items()]
    images = {name: os.path.relpath(path, os.path.dirname(os.path.abspath(report)))
              for name, path in zip(PLOTS, written)}
    atomic_write_text(report, report_text(study, images, header or []))
    return written + [report]


def status_header(study: dict) -> list[str]:
    runs = study["runs"].values()
    kept_runs, kept_evals = study["from_records"]["runs"], study["from_records"]["evals"]
    done = [r["name"] for r in runs if r["status"] == "finished"]
    going = [r["name"] for r in runs if r["status"] == "in progress or interrupted"]
    minutes = sum(r.get("train_seconds", 0) + r.get("val_seconds", 0) for run in runs for r in run["metrics"]) / 60
    minutes += sum(run["summary"]["minutes"] for run in runs if run.get("summary"))
    return [f"Generated by `python -m vgg_onnx.train.study --budget {study['budget']['name']}` "
            f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Finished runs: {', '.join(done) or 'none'}; "
            f"in progress or interrupted: {', '.join(going) or 'none'}; training time so far {minutes:.0f} min "
            "(2-core CPU shared with other jobs: time and images/s vary with the load). "
            "Cells marked pending have no measurement yet.",
            "",
            f"Files: WORK = `{study['work']}`; checkpoints in WORK/<run>/ (`best.safetensors`, `last.safetensors` "
            "with their JSON; `metrics.jsonl`, `train.log`), compiled models in WORK/models/<run>.onnx, evaluation "
            "reports in WORK/eval/. A run continues from its checkpoint when the study is run again."] + (
            ["", f"From the records kept beside this report ({os.path.basename(study['records'])}), because WORK no "
             f"longer holds them: runs {', '.join(kept_runs) or 'none'}; {len(kept_evals)} evaluation report(s)."]
            if kept_runs or kept_evals else [])


# ---------------------------------------------------------------- command line


@click.command("study", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--budget", type=click.Choice(sorted(BUDGETS)), default="quick", show_default=True,
              help="quick: tiny nets, a few images per class, 1 epoch (minutes); full: the study (CPU hours).")
@click.option("--data", required=True, metavar="DIR", help="Folder with train/<class>/ and val/<class>/.")
@click.option("--work", required=True, metavar="DIR", help="Run folders, models, eval reports (resumable).")
@click.option("--report", metavar="FILE.md", help="Report path (default: WORK/reproduction.md); plots go "
              "to img/ beside it, the records (metrics and eval reports, read back next time) to FILE.json.")
@click.option("--report-only", is_flag=True, help="Only write the report from the results in WORK (and the "
              "records, for what WORK lacks).")
@click.option("--note", "notes", multiple=True, metavar="TEXT",
              help="A paragraph for the report's status section (repeatable), e.g. what is running where.")
def study_command(budget, data, work, report, report_only, notes):
    """Train, export and evaluate the study's nets, then write Tables 3-6, plots and verdicts."""
    chosen = BUDGETS[budget]
    if not os.path.isdir(data):
        raise UsageError(f"{data}: not a folder (need train/<class>/ and val/<class>/)")
    report = report or os.path.join(work, "reproduction.md")
    records_file = os.path.splitext(report)[0] + ".json"
    if os.path.abspath(records_file) == os.path.abspath(report):
        raise UsageError(f"{report}: the report is Markdown (FILE.md); FILE.json holds its records")
    kept = read_records(records_file)
    if kept and kept["budget"]["name"] != chosen.name:
        raise UsageError(f"{records_file}: records of the {kept['budget']['name']!r} budget, not {chosen.name!r} "
                         "(write this study's report elsewhere with --report)")
    failed = [] if report_only else run_study(chosen, data, work)
    study = collect(chosen, work, kept=kept) | {"records": records_file}
    header = status_header(study) + [line for note in notes for line in ("", note)]
    written = write_report(study, report, header)
    atomic_write_text(records_file, json.dumps(records(study, data), indent=1) + "\n")
    written.append(records_file)
    summary = {"budget": budget, "work": work, "files": written, "failed": failed,
               "runs": {name: {k: run[k] for k in ("status", "epochs", "stopped")}
                        for name, run in study["runs"].items()}, "findings": findings(study)}
    click.echo(json.dumps(summary, indent=2))
    for line in failed:
        click.echo(f"vgg-onnx: study: {line}", err=True)
    if failed:
        sys.exit(1)


def main() -> None:
    try:
        study_command.main(args=sys.argv[1:], prog_name="python -m vgg_onnx.train.study", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    except VggOnnxError as e:
        click.echo(f"vgg-onnx: error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
