"""Training end to end on generated shapes: learning, resume after SIGKILL, DDP, checkpoint -> ONNX."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_train_data import make_dataset, run_cli

# a 4-class problem, VGG-A at width 1/16 with 32x32 crops: an epoch takes well under a second
SMALL = ["--config", "A", "--crop", "32", "--width-mult", "0.0625", "--batch-size", "16", "--init", "glorot",
         "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), train_per_class=24, val_per_class=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes) -> Path:
    """A run that learned the shapes (8 epochs, jittered scale)."""
    run = tmp_path_factory.mktemp("runs") / "learned"
    result = run_cli("train", *SMALL, "--data", shapes, "--out", run, "--scale", "36,48", "--epochs", "8",
                     "--lr", "0.01", "--dropout", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_learns_far_better_than_chance(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    best = min(r["val_top1_err"] for r in rows)
    assert best <= 0.25, rows  # chance is 0.75
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for name in ("last", "best"):
        for suffix in (".safetensors", ".json", ".optim.pt"):
            assert (trained / (name + suffix)).is_file()
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "stats.json").is_file()


def test_checkpoint_json_is_model_info(trained):
    """The contract with `vgg-onnx export --weights RUN_DIR/best.safetensors`."""
    import hashlib

    from vgg_onnx.metadata import ModelInfo
    from vgg_onnx.train.model import VGG

    doc = json.loads((trained / "best.json").read_text())
    info = ModelInfo.from_json_dict(doc, "best.json")
    stats = json.loads((trained / "stats.json").read_text())
    assert info.config == "A" and info.crop_size == 32 and info.width_mult == 0.0625
    assert info.train_scales == [36, 48] and info.test_scales == [36, 42, 48]
    assert [c.name for c in info.classes] == ["circle", "cross", "square", "triangle"]
    assert info.normalization.preset == "paper"
    np.testing.assert_allclose(info.normalization.mean_rgb, stats["mean_rgb"])
    assert info.weights_sha256 == hashlib.sha256((trained / "best.safetensors").read_bytes()).hexdigest()
    training = doc["training"]
    assert training["epoch"] == training["metrics"]["epoch"] and training["step"] > 0
    assert training["colour_stats"]["eigenvalues"] == stats["eigenvalues"]
    model = VGG("A", 4, 0.0625, 32)
    model.load_state_dict(load_weights(trained / "best.safetensors"))  # torchvision keys, strict
    assert info.param_count == sum(p.numel() for p in model.parameters())


def test_checkpoint_export_runtime_round_trip(trained, shapes):
    """best checkpoint -> ONNX (the project's compiler) -> onnxruntime: the same posteriors as the torch model
    on the validation view that training used, and the metadata carries the run's scales and mean."""
    import onnxruntime as ort
    import torch

    from vgg_onnx.export.compiler import compile_model, relative_error
    from vgg_onnx.metadata import ModelInfo
    from vgg_onnx.decoding import load_image
    from vgg_onnx.scales import rescale
    from vgg_onnx.train.augment import centre_crop
    from vgg_onnx.train.data import to_tensor
    from vgg_onnx.train.model import VGG

    info = ModelInfo.from_json_dict(json.loads((trained / "best.json").read_text()))
    model = VGG(info.config, info.num_classes, info.width_mult, info.crop_size, dropout=0.5).eval()
    model.load_state_dict(load_weights(trained / "best.safetensors"))
    proto, _ = compile_model(model, info)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    compiled = ModelInfo.from_metadata_props({p.key: p.value for p in proto.metadata_props})
    assert compiled.train_scales == [36, 48] and compiled.test_scales == [36, 42, 48]

    images = sorted((shapes / "val").glob("*/*.png"))[::5]
    crops = np.stack([centre_crop(load_image(p), 42, 32) for p in images])
    onnx_probs = session.run(["probs"], {"image": crops.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    with torch.no_grad():
        x = torch.stack([to_tensor(c, info.normalization) for c in crops])
        torch_probs = torch.softmax(model(x), dim=1).numpy()
    assert relative_error(onnx_probs, torch_probs) < 1e-4
    # dense evaluation of a whole rescaled image runs in the same graph
    whole = rescale(load_image(images[0]), 48).transpose(2, 0, 1)[None].astype(np.float32)
    probs = session.run(["probs"], {"image": whole})[0]
    assert probs.shape == (1, 4) and abs(probs.sum() - 1) < 1e-5

    # the export stage's own command takes the checkpoint as it is ...
    out = trained / "exported.onnx"
    result = run_cli("export", "--weights", trained / "best.safetensors", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = exported.run(["probs"], {"image": crops.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    assert relative_error(got, torch_probs) < 1e-4
    # ... and the runtime classifies with it as the trained torch model does: dense at Q = 42 on a
    # 48x48 image gives a 1x1 score map (crop 32), which is the FC form on the whole rescaled image
    result = run_cli("infer", images[0], "--model", out, "--scales", "42", "--no-flip", "--format", "json",
                     "--provider", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout)[0]
    runtime_probs = np.array([c["prob"] for c in sorted(record["top_k"], key=lambda c: c["index"])])
    scaled = rescale(load_image(images[0]), 42)
    with torch.no_grad():
        expected = torch.softmax(model(to_tensor(scaled, info.normalization)[None]), dim=1)[0].numpy()
    assert relative_error(runtime_probs, expected) < 1e-4


# --- resume after SIGKILL -------------------------------------------------------------------

# runs training with a pause in every step, so the test can kill it in the middle of an epoch
SLOW_DRIVER = """
import os, sys, time
from vgg_onnx.train import trainer
original = trainer.Trainer.train_step
def slow(self, *args):
    time.sleep(float(os.environ["STEP_DELAY"]))
    return original(self, *args)
trainer.Trainer.train_step = slow
from vgg_onnx.train.__main__ import main
main()
"""


def read_step(run: Path) -> int:
    try:
        return json.loads((run / "last.json").read_text())["training"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, shapes):
    args = [*SMALL, "--data", shapes, "--scale", "36,48", "--epochs", "2", "--lr", "0.01", "--checkpoint-every", "4"]
    # 96 images / 16 = 6 steps per epoch, 12 in all; `last` is saved at steps 4, 6 (epoch end), 8, 12
    reference = tmp_path / "reference"
    result = run_cli("train", *args, "--out", reference)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "killed"
    env = dict(os.environ, STEP_DELAY="0.25")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, *map(str, args), "--out", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while read_step(run) < 8 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # at step 8 or 9: in the middle of epoch 2
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    killed_at = read_step(run)
    assert killed_at == 8, f"expected the mid-epoch checkpoint of step 8, found {killed_at}"

    result = run_cli("train", *args[:-4], "--workers", "1", "--checkpoint-every", "4", "--out", run, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    expected, actual = load_weights(reference / "last.safetensors"), load_weights(run / "last.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert np.array_equal(expected[key].numpy(), actual[key].numpy()), key

    def curve(path):
        return [(r["epoch"], r["train_loss"], r["val_top1_err"], r["val_loss"])
                for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]
    assert curve(run) == curve(reference)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# --- many processes -------------------------------------------------------------------------

def test_ddp_two_processes_equal_one_process(tmp_path, shapes):
    """The paper's claim: 2 processes x batch 8 end with the weights of 1 process x batch 16 (dropout 0)."""
    common = ["--config", "A", "--crop", "32", "--width-mult", "0.0625", "--batch-size", "16", "--init", "glorot",
              "--workers", "0", "--no-progress", "--data", str(shapes), "--scale", "36,48", "--epochs", "1",
              "--lr", "0.01", "--dropout", "0", "--seed", "3"]
    single, double = tmp_path / "single", tmp_path / "double"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "vgg_onnx.train", *common, "--out", str(single)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vgg_onnx.train", *common, "--out", str(double)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    doc = json.loads((double / "last.json").read_text())
    assert doc["training"]["world_size"] == 2 and doc["training"]["step"] == 6
    expected, actual = load_weights(single / "last.safetensors"), load_weights(double / "last.safetensors")
    for key in expected:
        a, b = actual[key].double().numpy(), expected[key].double().numpy()
        assert np.abs(a - b).max() / np.abs(b).max() <= 1e-5, key
    # validation was sharded over the two processes and reduced: the same counts
    m1, m2 = (json.loads((d / "metrics.jsonl").read_text()) for d in (single, double))
    assert m1["val_images"] == m2["val_images"] == 32
    assert m1["val_top1_err"] == m2["val_top1_err"]
    assert abs(m1["train_loss"] - m2["train_loss"]) < 1e-5


# --- initialisation from a trained net ------------------------------------------------------

def test_init_from_A_into_D_and_same_config(trained, tmp_path):
    import torch

    from vgg_onnx.train.init import init_from_checkpoint
    from vgg_onnx.train.model import VGG

    source = load_weights(trained / "best.safetensors")
    deep = VGG("D", 4, 0.0625, 32)
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    note = init_from_checkpoint(deep, str(trained / "best.safetensors"))
    assert "conv1_1, conv2_1, conv3_1, conv3_2" in note
    d_keys = {conv.name: conv.state_key for conv in deep.config.conv_layers()}
    a_keys = {conv.name: conv.state_key for conv in VGG("A", 4, 0.0625, 32).config.conv_layers()}
    state = deep.state_dict()
    for name in ("conv1_1", "conv2_1", "conv3_1", "conv3_2"):
        assert torch.equal(state[d_keys[name] + ".weight"], source[a_keys[name] + ".weight"])
    for key in ("classifier.0.weight", "classifier.3.weight", "classifier.6.bias"):
        assert torch.equal(state[key], source[key])
    for name in ("conv1_2", "conv2_2", "conv3_3", "conv5_3"):  # kept random
        assert torch.equal(state[d_keys[name] + ".weight"], before[d_keys[name] + ".weight"])

    same = VGG("A", 4, 0.0625, 32)
    init_from_checkpoint(same, str(trained / "best.safetensors"))
    assert all(torch.equal(v, source[k]) for k, v in same.state_dict().items())

    from vgg_onnx.errors import UsageError
    with pytest.raises(UsageError, match="width, crop and classes must match"):
        init_from_checkpoint(VGG("D", 4, 0.125, 32), str(trained / "best.safetensors"))


def test_train_D_from_A_and_bf16(trained, shapes, tmp_path):
    run = tmp_path / "deep"
    result = run_cli("train", *SMALL, "--config", "D", "--data", shapes, "--out", run, "--scale", "40",
                     "--epochs", "1", "--init-from", trained / "best.safetensors", "--precision", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8" in result.stderr
    row = json.loads((run / "metrics.jsonl").read_text())
    assert np.isfinite(row["train_loss"])
    assert json.loads((run / "last.json").read_text())["config"] == "D"


# --- bad input: one line each, never a traceback --------------------------------------------

def one_line_error(result, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input(tmp_path, shapes, trained):
    base = [*SMALL, "--data", shapes, "--scale", "36", "--epochs", "1"]
    one_line_error(run_cli("train", *base, "--out", trained), 2, "already holds a run", "--resume")
    one_line_error(run_cli("train", *base, "--config", "B", "--out", trained, "--resume"), 2,
                   "--resume on a run with --config A, not B")
    one_line_error(run_cli("train", *base, "--out", tmp_path / "fresh", "--resume"), 2, "nothing to resume")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run_cli("train", *base, "--out", blocker / "run"), 2, "cannot write there")
    one_line_error(run_cli("train", *base, "--data", tmp_path / "nodata", "--out", tmp_path / "r"), 2, "not found")
    one_line_error(run_cli("train", *base, "--out", tmp_path / "r2", "--batch-size", "1000"), 2, "fewer than one batch")
    one_line_error(run_cli("train", *base, "--out", tmp_path / "r3", "--scale", "16"), 2, "smaller than the model's crop")
    one_line_error(run_cli("plot", tmp_path / "none"), 1, "metrics.jsonl: missing")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shapes):
    import torch

    from vgg_onnx.train import checkpoint

    run = tmp_path / "nan"
    result = run_cli("train", *SMALL, "--data", shapes, "--scale", "36", "--out", run, "--epochs", "1",
                     "--lr", "1e30", "--checkpoint-every", "1")
    one_line_error(result, 1, "loss is not finite", "the last good checkpoint", "is kept")
    state, document, _ = checkpoint.load_checkpoint(str(run), "last")
    step = document["training"]["step"]
    assert 1 <= step < 6 and f"(step {step})" in result.stderr
    assert all(torch.isfinite(t).all() for t in state.values())


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, shapes, monkeypatch):
    import errno

    from click.testing import CliRunner

    from vgg_onnx.cli import main
    from vgg_onnx.train import checkpoint

    run = tmp_path / "full"
    real_write, calls = checkpoint._write, []

    def write(path, data):
        calls.append(path)
        if len(calls) > 6:  # epoch 1 wrote best and last (3 files each); the disk is full from then on
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write", write)
    runner = CliRunner()
    result = runner.invoke(main, ["train", *map(str, SMALL), "--data", str(shapes), "--scale", "36",
                                  "--epochs", "3", "--lr", "0.01", "--out", str(run)])
    assert result.exit_code == 1, result.output
    assert "cannot save checkpoint (disk full); the previous" in result.output
    assert "Traceback" not in result.output
    doc = json.loads((run / "last.json").read_text())
    assert doc["training"]["epoch"] == 1
    monkeypatch.setattr(checkpoint, "_write", real_write)
    state, document, optim = checkpoint.load_checkpoint(str(run), "last")  # sha256 and step match: whole
    assert document["training"]["step"] == 6 and optim is not None
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_training_image_is_skipped_and_counted(tmp_path, shapes):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "circle" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    run = tmp_path / "run"
    result = run_cli("train", *SMALL, "--data", data, "--out", run, "--scale", "36", "--epochs", "1",
                     "--batch-size", "97")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "zz_bad.png" in result.stderr and "warning" in result.stderr
    row = json.loads((run / "metrics.jsonl").read_text())
    assert row["train_skipped"] == 1 and row["train_images"] == 96


def test_learning_rate_schedule():
    """Divide by 10 after --lr-patience epochs without a lower top-1 error; stop on the plateau after
    three divisions; or divide at fixed --milestones."""
    import torch

    from vgg_onnx.train.trainer import State, TrainArgs, Trainer

    def trainer(**kw):
        t = Trainer.__new__(Trainer)  # the schedule alone: no data, no model
        t.args = TrainArgs(config="A", data="", out="", lr=0.01, **kw)
        t.state = State(lr=0.01)
        t.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
        return t

    def run(t, errors):
        lrs = []
        for epoch, err in enumerate(errors, 1):
            t.state.epoch = epoch
            if err < t.state.best_top1:
                t.state.best_top1, t.state.bad_epochs = err, 0
            else:
                t.state.bad_epochs += 1
            t.update_lr()
            lrs.append(t.optimizer.param_groups[0]["lr"])
            if t.state.stopped:
                break
        return lrs

    t = trainer(lr_patience=2)
    lrs = run(t, [0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5])
    assert t.state.divisions == 3 and "divided 3 times" in t.state.stopped
    t = trainer(milestones=[2, 4])
    assert run(t, [0.9] * 5) == pytest.approx([1e-2, 1e-3, 1e-3, 1e-4, 1e-4])
    assert not t.state.stopped
