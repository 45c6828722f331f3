"""The miniature study (vgg_onnx.train.study): report, plots and verdicts from results on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vgg_onnx.train import study as st

BUDGET = st.BUDGETS["full"]
IMAGES = 3925
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(work: Path, name: str, errors: list[float], stopped: str = "") -> None:
    """A run folder as training leaves it: metrics.jsonl and last.json."""
    run = work / name
    run.mkdir(parents=True)
    rows = [{"epoch": i + 1, "train_loss": 2.0 - 0.1 * i, "val_top1_err": e, "val_top5_err": e / 3,
             "train_images": 9469, "train_seconds": 60.0, "val_seconds": 6.0} for i, e in enumerate(errors)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = {"epoch": len(rows), "stopped": stopped}
    (run / "last.json").write_text(json.dumps({"training": {"epoch": len(rows), "state": state}}))


def write_eval(work: Path, key: str, rows: list[tuple[str, dict]], images: int = IMAGES) -> None:
    """An eval report in the shape of `vgg-onnx eval --format json`: rows of (model, {method: top-1})."""
    methods = list(rows[0][1])
    report = {"models": [m for m, _ in rows if " + " not in m], "methods": methods,  # not the fused row "scales": [146], "images": images,
              "rows": [{"model": model, **{m: {"top1_error": v, "top5_error": v / 3, "images": images}
                                           for m, v in values.items()}} for model, values in rows]}
    (work / "eval").mkdir(exist_ok=True)
    (work / "eval" / f"{key}.json").write_text(json.dumps(report))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Finished A, A-LRN, C, D and D-jitter with their evaluations; D-glorot never started."""
    work = tmp_path / "work"
    finished = "validation top-1 error stopped improving after the learning rate was divided 3 times"
    single = {"A": 40.0, "A-LRN": 40.2, "C": 33.0, "D": 32.5, "D-jitter": 28.0}
    for name, top1 in single.items():
        write_run(work, name, [0.8, 0.5, top1 / 100], stopped=finished)
        q = 219 if name == "D-jitter" else 146
        write_eval(work, f"{name}_Q{q}", [(f"{name}.onnx", {"dense": top1})])
        write_eval(work, f"{name}_Q128", [(f"{name}.onnx", {"dense": top1 + 3})])
        write_eval(work, f"{name}_multiscale", [(f"{name}.onnx", {"dense": top1 - 4})])
    write_eval(work, "D-jitter_methods", [("D-jitter.onnx", {"dense": 26.0, "multi-crop": 25.0, "both": 21.0})],
               images=1000)
    write_eval(work, "fusion", [("WORK/models/D-jitter.onnx", {"dense": 26.0, "multi-crop": 25.0, "both": 21.0}),
                                ("WORK/models/D.onnx", {"dense": 30.0, "multi-crop": 29.0, "both": 28.0}),
                                ("D-jitter.onnx + D.onnx", {"dense": 25.5, "multi-crop": 24.5, "both": 20.0})],
               images=1000)
    return work


def test_report_has_the_tables_plots_and_verdicts(work: Path, tmp_path: Path):
    report = tmp_path / "docs" / "reproduction.md"
    written = st.write_report(st.collect(BUDGET, str(work)), str(report))
    text = report.read_text()
    for title in ("Table 3", "Table 4", "Table 5", "Table 6", "## Findings", "## Runs"):
        assert title in text
    assert "| A | A | 146 | 146 | 40.0 / 13.3 | 29.6 / 10.4 (A 256) | `A_Q146` |" in text
    assert "| D-glorot | D | 146 | Glorot | not started |" in text
    assert "D-jitter + D (fused) | 1000 | 25.5 / 8.5 | 24.5 / 8.2 | 20.0 / 6.7 |" in text
    assert st.SOURCE in text
    plots = [Path(p) for p in written if p.endswith(".png")]
    assert len(plots) == 3
    for plot in plots:
        assert plot.parent == report.parent / "img" and plot.read_bytes()[:8] == PNG_MAGIC
        assert f"](img/{plot.name})" in text


def test_verdicts_follow_the_measurements(work: Path):
    verdicts = {f["claim"]: f["verdict"] for f in st.findings(st.collect(BUDGET, str(work)))}
    assert verdicts["LRN does not improve A"] == "reproduced"  # 40.2 vs 40.0: no gain
    assert verdicts["Deeper is better"] == "reproduced"  # 32.5 vs 40.0 on 3925 images
    assert verdicts["3x3 convs beat 1x1 convs at the same depth"] == "inconclusive"  # 32.5 vs 33.0
    assert verdicts["Scale jittering in training beats a fixed S"] == "reproduced"
    assert verdicts["Multi-scale testing beats one test scale"] == "reproduced"
    assert verdicts["Dense and multi-crop are complementary"] == "reproduced"  # 21 vs 25 on 1000
    assert verdicts["Fusing two nets helps"] == "inconclusive"  # 25.5 vs 26.0 on 1000
    assert verdicts["Glorot initialisation works without pre-training A"] == "pending"


def test_test_time_findings_use_d_while_d_jitter_is_not_measured(work: Path):
    """Multi-scale and multi-crop gains are judged on D until D-jitter's evaluations exist."""
    for key in ("D-jitter_Q219", "D-jitter_multiscale", "D-jitter_methods"):
        (work / "eval" / f"{key}.json").unlink()
    write_eval(work, "D_methods", [("D.onnx", {"dense": 30.0, "multi-crop": 29.0, "both": 31.5})], images=1000)
    rows = {f["claim"]: f for f in st.findings(st.collect(BUDGET, str(work)))}
    multi_scale = rows["Multi-scale testing beats one test scale"]
    complementary = rows["Dense and multi-crop are complementary"]
    assert multi_scale["compared"].startswith("D, 3 scales") and multi_scale["verdict"] == "reproduced"  # 28.5 vs 32.5
    assert complementary["compared"].startswith("D: both") and complementary["verdict"] == "inconclusive"  # 31.5 vs 29
    assert rows["Scale jittering in training beats a fixed S"]["verdict"] == "pending"


def test_opposite_result_is_not_reproduced():
    deeper = st.Finding("Deeper is better", "D vs A", "lower")
    verdict, reason = st.verdict(deeper, (45.0, 15.0, IMAGES), (40.0, 13.0, IMAGES), "width 0.125")
    assert verdict == "not reproduced" and "width 0.125" in reason


def test_fusion_pair_is_the_two_best_multiscale_nets(work: Path):
    assert st.collect(BUDGET, str(work))["fusion_pair"] == ["D-jitter", "D"]


def test_scales_follow_the_paper_ratio():
    assert st.paper_scales(128) == (146, (146, 292))
    assert st.paper_scales(224) == (256, (256, 512))
    assert st.sweep_scales(128) == [128, 146, 178, 219, 292]


def test_resume_flag_only_for_started_runs(tmp_path: Path):
    spec = st.RUNS[1]  # D, from A
    cmd = st.train_command(spec, BUDGET, "DATA", "WORK", resume=True)
    assert cmd[-1] == "--resume" and "WORK/A/best.safetensors" in cmd
    assert st.run_status(str(tmp_path), spec, BUDGET)["status"] == "not started"


def test_cli_report_only_prints_json_and_exit_status(work: Path, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    report = tmp_path / "out" / "report.md"
    done = subprocess.run([sys.executable, "-m", "vgg_onnx.train.study", "--budget", "full", "--data", str(data),
                           "--work", str(work), "--report", str(report), "--report-only"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["runs"]["D-glorot"]["status"] == "not started" and report.exists()
    missing = subprocess.run([sys.executable, "-m", "vgg_onnx.train.study", "--data", str(tmp_path / "nope"),
                              "--work", str(work), "--report-only"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope" in missing.stderr


def test_pipeline_trains_exports_evaluates_and_resumes(tmp_path: Path):
    """The quick budget's steps on generated shapes, for A alone: a second call finds everything done."""
    from dataclasses import replace

    from test_train_data import make_dataset

    data = make_dataset(tmp_path / "shapes", train_per_class=8, val_per_class=4)
    budget = replace(st.BUDGETS["quick"], train_per_class=None, workers=0, multicrop_limit=4)
    work = tmp_path / "work"
    assert st.run_study(budget, str(data), str(work), runs=st.RUNS[:1]) == []
    reports = sorted(p.name for p in (work / "eval").iterdir())
    assert reports == ["A_Q32.json", "A_Q36.json", "A_Q54.json", "A_Q68.json", "A_Q73.json", "A_multiscale.json"]
    assert json.loads((work / "eval" / "A_Q36.json").read_text())["images"] == 16
    stamps = {p: p.stat().st_mtime_ns for p in (work / "eval").iterdir()}
    assert st.run_study(budget, str(data), str(work), runs=st.RUNS[:1]) == []
    assert stamps == {p: p.stat().st_mtime_ns for p in (work / "eval").iterdir()}
    study = st.collect(budget, str(work), st.RUNS[:1])
    assert study["runs"]["A"]["status"] == "finished" and st.cell(study, "A_Q36")[2] == 16


def test_nets_near_chance_are_not_compared():
    deeper = st.Finding("Deeper is better", "D vs A", "lower")
    assert st.verdict(deeper, (89.0, 50.0, IMAGES), (60.0, 20.0, IMAGES), "width 0.125")[0] == "inconclusive"


def test_a_net_waits_for_the_run_it_starts_from(tmp_path: Path):
    write_run(tmp_path, "A", [0.8, 0.6])  # interrupted: no stop reason, fewer epochs than the cap
    runner = st.Runner(BUDGET, "DATA", str(tmp_path))
    assert runner.train(st.RUNS[1]) is False
    assert runner.failed == ["train D: A has not finished training, nothing to start from"]


def report_only(data: Path, work: Path, report: Path, budget: str = "full") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgg_onnx.train.study", "--budget", budget, "--data", str(data),
                           "--work", str(work), "--report", str(report), "--report-only"],
                          capture_output=True, text=True)


def test_records_keep_the_results_when_the_work_folder_is_gone(work: Path, tmp_path: Path):
    """The report's records (REPORT.json) stand in for a lost WORK; a run started again in WORK wins."""
    import shutil

    data, report = tmp_path / "data", tmp_path / "docs" / "reproduction.md"
    data.mkdir()
    a_q146 = work / "eval" / "A_Q146.json"
    a_q146.write_text(json.dumps(json.loads(a_q146.read_text()) | {
        "data": str(data / "val"), "models": [str(work / "models" / "A.onnx")]}))
    assert report_only(data, work, report).returncode == 0
    kept = json.loads(report.with_suffix(".json").read_text())
    assert kept["runs"]["A"]["metrics"][-1]["val_top1_err"] == 0.4 and "D-glorot" not in kept["runs"]
    assert kept["evals"]["A_Q146"]["models"] == ["WORK/models/A.onnx"] and kept["evals"]["A_Q146"]["data"] == "DATA/val"
    tables = report.read_text().split("## Recipe")[1]

    shutil.rmtree(work)
    write_run(work, "D-glorot", [0.7, 0.45])  # a new session's WORK holds only the run still training
    done = report_only(data, work, report)
    assert done.returncode == 0, done.stderr
    text = report.read_text()
    assert "runs A, D, D-jitter, C, A-LRN; 17 evaluation report(s)" in text
    assert "| D-glorot | D | 146 | Glorot | in progress or interrupted | 2 | 45.0 / 15.0 (epoch 2) |" in text
    assert text.split("## Recipe")[1].replace("| D-glorot | D | 146 | Glorot | in progress or interrupted | 2 | "
                                              "45.0 / 15.0 (epoch 2) | 2.2 | 158 |",
                                              "| D-glorot | D | 146 | Glorot | not started | 0 | - | - | - |") == tables
    assert json.loads(report.with_suffix(".json").read_text())["runs"]["D-glorot"]["epochs"] == 2


def test_records_of_another_budget_or_format_are_refused(work: Path, tmp_path: Path):
    data, report = tmp_path / "data", tmp_path / "reproduction.md"
    data.mkdir()
    assert report_only(data, work, report).returncode == 0
    other = report_only(data, work, report, budget="quick")
    assert other.returncode == 2 and "records of the 'full' budget, not 'quick'" in other.stderr
    for bad in ("[]", '{"format": 1}', "{"):
        report.with_suffix(".json").write_text(bad)
        broken = report_only(data, work, report)
        assert broken.returncode == 2 and broken.stderr.count("\n") == 1 and "reproduction.json" in broken.stderr
    clash = report_only(data, work, report.with_suffix(".json"))
    assert clash.returncode == 2 and "the report is Markdown" in clash.stderr


def test_table6_names_the_pair_its_report_fused(work: Path, tmp_path: Path):
    """A net that becomes one of the two best after the fusion was measured does not relabel the old fusion."""
    write_eval(work, "C_multiscale", [("C.onnx", {"dense": 20.0})])  # C now beats D-jitter and D
    study = st.collect(BUDGET, str(work))
    assert study["best_two"] == ["C", "D-jitter"] and study["fusion_pair"] == ["D-jitter", "D"]
    text = "\n".join(st.table6(study))
    assert "| D-jitter + D (fused) | 1000 | 25.5 / 8.5 |" in text and "are now C and D-jitter" in text
    assert "--model WORK/models/D-jitter.onnx --model WORK/models/D.onnx" in study["commands"]["fusion"]


def test_no_loss_claim_holds_when_ours_is_significantly_better():
    glorot = st.Finding("Glorot initialisation works without pre-training A", "D-glorot vs D", "no-loss")
    verdict, reason = st.verdict(glorot, (23.3, 3.4, IMAGES), (28.3, 3.9, IMAGES), "width 0.125")
    assert verdict == "reproduced" and "significantly lower, which the claim allows" in reason
    same = st.verdict(glorot, (28.0, 3.4, IMAGES), (28.3, 3.9, IMAGES), "width 0.125")
    assert same == ("reproduced", same[1]) and "no significant difference" in same[1]
