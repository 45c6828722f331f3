"""train and stats on bad checkpoints and bad runs: one clear line each; quick-trial options; the init default."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from test_train import SMALL, one_line_error
from test_train_data import make_dataset, run_cli


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), train_per_class=8, val_per_class=4)


# SMALL without its --init: these runs take the default
DEFAULT_INIT = [w for w in SMALL if w not in ("--init", "glorot")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes) -> Path:
    """One epoch of one step."""
    folder = tmp_path_factory.mktemp("runs") / "one"
    result = run_cli("train", *DEFAULT_INIT, "--data", shapes, "--out", folder, "--scale", "36", "--epochs", "1",
                     "--batch-size", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def edited_copy(run: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(run, copy)
    document = json.loads((copy / "last.json").read_text())
    edit(document)
    (copy / "last.json").write_text(json.dumps(document))
    for prev in copy.glob(".*.prev"):  # no earlier generation to fall back to
        prev.unlink()
    return copy


def resume(shapes: Path, run: Path):
    return run_cli("train", *DEFAULT_INIT, "--data", shapes, "--out", run, "--scale", "36", "--epochs", "2",
                   "--batch-size", "32", "--resume")


def test_default_init_is_glorot_as_in_export(run):
    assert json.loads((run / "last.json").read_text())["training"]["args"]["init"] == "glorot"
    for command in ("train", "export"):
        help_text = run_cli(command, "--help").stdout
        assert "[default: glorot]" in " ".join(help_text.split()), help_text


def test_resume_checkpoint_without_training_state(run, shapes, tmp_path):
    edited = edited_copy(run, tmp_path, lambda d: d["training"].pop("state"))
    one_line_error(resume(shapes, edited), 1, "last.json: not a training checkpoint", "training.state")


def test_resume_checkpoint_with_a_bad_state_field(run, shapes, tmp_path):
    edited = edited_copy(run, tmp_path, lambda d: d["training"]["state"].update(epoch="one"))
    one_line_error(resume(shapes, edited), 1, "training.state.epoch is 'one', not an integer")


def test_resume_checkpoint_without_training(run, shapes, tmp_path):
    edited = edited_copy(run, tmp_path, lambda d: d.pop("training"))
    result = resume(shapes, edited)
    one_line_error(result, 1, "not a training checkpoint")
    assert "None" not in result.stderr


def test_empty_weights_sha256_is_refused(run, shapes, tmp_path):
    edited = edited_copy(run, tmp_path, lambda d: d.update(weights_sha256=""))
    one_line_error(resume(shapes, edited), 1, "last.json: no weights_sha256")
    one_line_error(run_cli("train", *SMALL, "--data", shapes, "--out", tmp_path / "from", "--scale", "36",
                           "--epochs", "1", "--init-from", edited / "last.safetensors"), 1, "no weights_sha256")
    # that failure came after the colour statistics were saved: the folder it made is gone again
    assert not (tmp_path / "from").exists()


def test_init_from_missing_file_names_it_and_leaves_no_run_folder(shapes, tmp_path):
    missing = tmp_path / "nope.safetensors"
    result = run_cli("train", *SMALL, "--data", shapes, "--out", tmp_path / "run", "--scale", "36", "--epochs", "1",
                     "--init-from", missing)
    one_line_error(result, 2, f"--init-from {missing}: no such file")
    assert "nope.json" not in result.stderr
    assert not (tmp_path / "run").exists()  # the run failed before its first step: no folder left behind


def test_failure_keeps_a_folder_that_was_there(shapes, tmp_path):
    """A failure before the first step removes what the run wrote (stats.json), not the user's files."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    result = run_cli("train", *SMALL, "--data", shapes, "--out", folder, "--scale", "36", "--epochs", "1",
                     "--init-from", garbage)
    one_line_error(result, 1, "bad.json: missing")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_limit_per_class_and_chance_warning(shapes, tmp_path):
    """4 images of each class (16 in all, one step per epoch); Gaussian std 0.01 at this width leaves the
    logits near 0, so the loss stays at ln 4 and the run says so after three epochs."""
    run = tmp_path / "chance"
    result = run_cli("train", *SMALL, "--data", shapes, "--out", run, "--scale", "36", "--epochs", "3",
                     "--limit-per-class", "4", "--init", "gaussian")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_images"], r["val_images"], r["step"]) for r in rows] == [(16, 16, 1), (16, 16, 2), (16, 16, 3)]
    assert all(abs(r["train_loss"] - math.log(4)) < 0.05 for r in rows), rows
    warnings = [line for line in result.stderr.splitlines() if "chance level" in line]
    assert len(warnings) == 1 and "ln 4 = 1.386" in warnings[0] and "--init glorot" in warnings[0], result.stderr
    one_line_error(run_cli("train", *SMALL, "--data", shapes, "--out", tmp_path / "r", "--limit-per-class", "0"),
                   2, "--limit-per-class must be at least 1")


def test_stats_json_stdout_is_only_json(shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "circle" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = run_cli("stats", data, "--json", "--workers", "0")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["images"] == 32 and stats["skipped"] == 1
    assert "bad.png" in result.stderr and "warning" in result.stderr
