"""Training on two nodes and through faults with torchrun, simulated on one machine.

Two torchrun agents, each in its own session (as two machines would run them), meet in a c10d
rendezvous on 127.0.0.1 and run the multi-node command of docs/training.md, with only its
host and port changed (and tiny-model options appended). Workers are SIGKILLed mid-epoch and
in the middle of a checkpoint save; torchrun's agents restart them and training resumes by
itself from the last whole checkpoint, ending with the uninterrupted run's weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_train_data import make_dataset

DOCS = Path(__file__).resolve().parent.parent / "docs" / "training.md"
DOC_MARKER = "<!-- the multi-node command: tests/test_train_elastic.py runs it -->"
# appended to the documented command: a 4-class problem, VGG-A at width 1/16 with 32x32 crops,
# 6 steps of 16 images per epoch, `last` saved at steps 4, 6 (epoch end), 8 and 12
TINY = ["--config", "A", "--crop", "32", "--width-mult", "0.0625", "--batch-size", "16", "--workers", "0",
        "--no-progress", "--scale", "36,48", "--epochs", "2", "--lr", "0.01", "--dropout", "0", "--seed", "3",
        "--checkpoint-every", "4"]
AGENT_TIMEOUT = 240
DOCUMENTED_ENV: dict[str, str] = {}  # the NAME=VALUE words before `torchrun` in the documented command

# Loaded by every Python process of a test run (PYTHONPATH); acts in the workers only (LOCAL_RANK is
# set by torchrun): records its pid and the start of every step, and slows or stalls them on request.
HOOK = r'''
import os, time
if os.environ.get("VGG_TEST_HOOK_DIR") and "LOCAL_RANK" in os.environ:
    from vgg_onnx.train import checkpoint, trainer
    folder, rank = os.environ["VGG_TEST_HOOK_DIR"], os.environ["RANK"]
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    with open(os.path.join(folder, f"pid-{restart}-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    # a node whose agent restarts its workers because another node failed keeps restart count 0,
    # so "before the fault" is told by the marker file the test writes just before it kills
    first_generation = not os.path.exists(os.path.join(folder, "killed"))
    delay = float(os.environ.get("STEP_DELAY", "0")) if first_generation else 0.0
    train_step = trainer.Trainer.train_step
    def slow_step(self, *args):
        with open(os.path.join(folder, f"steps-{rank}"), "a") as f:
            f.write(f"{int(first_generation)} {self.state.step + 1} {time.time()}\n")
        time.sleep(delay)
        return train_step(self, *args)
    trainer.Trainer.train_step = slow_step
    stall_at = int(os.environ.get("STALL_COMMIT_AT_STEP", "0"))
    if stall_at and first_generation:
        saving = {}
        save_checkpoint, commit = checkpoint.save_checkpoint, checkpoint._commit
        def save(run_dir, name, state_dict, info, training, optim_state):
            saving["step"] = training["step"]
            return save_checkpoint(run_dir, name, state_dict, info, training, optim_state)
        def stalled_commit(tmp, path):
            commit(tmp, path)
            if saving.get("step") == stall_at and path.endswith("last.safetensors"):
                open(os.path.join(folder, "stalled"), "w").close()
                time.sleep(600)  # new weights in place, old JSON still there: the test kills us now
        checkpoint.save_checkpoint, checkpoint._commit = save, stalled_commit
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documented_command() -> list[str]:
    """The multi-node torchrun command of docs/training.md, as words (NAME=VALUE ones first)."""
    text = DOCS.read_text()
    assert DOC_MARKER in text, f"{DOCS} lost its marked multi-node command"
    block = text.split(DOC_MARKER, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return shlex.split(" ".join(line.rstrip("\\").strip() for line in lines))


def node_command(data: Path, run: Path, port: int) -> list[str]:
    """The documented command with this machine's host and port, our data and run folder, tiny options."""
    words = documented_command()
    while "=" in words[0]:  # the documented environment goes to the agents' environment
        name, value = words.pop(0).split("=", 1)
        DOCUMENTED_ENV[name] = value
    assert words[0] == "torchrun" and "HOST:29500" in words and "DATA" in words and "RUN_DIR" in words, words
    assert words[words.index("--nnodes") + 1] == "2" and "--max-restarts" in words, words
    substitute = {"torchrun": None, "HOST:29500": f"127.0.0.1:{port}", "DATA": str(data), "RUN_DIR": str(run)}
    command = [sys.executable, "-m", "torch.distributed.run"]
    for word in words:
        if word == "torchrun":
            continue
        command.append(substitute.get(word, word))
    return command + TINY


class TwoNodes:
    """Two torchrun agents in their own sessions (two machines); their output goes to log files."""

    def __init__(self, tmp: Path, data: Path, run: Path, **env: str):
        self.hooks = tmp / f"hooks-{run.name}"
        self.hooks.mkdir()
        (self.hooks / "sitecustomize.py").write_text(HOOK)
        environment = dict(os.environ, OMP_NUM_THREADS="1", VGG_TEST_HOOK_DIR=str(self.hooks),
                           PYTHONPATH=os.pathsep.join([str(self.hooks), os.environ.get("PYTHONPATH", "")]), **env)
        command = node_command(data, run, free_port())
        environment.update(DOCUMENTED_ENV)
        self.logs = [tmp / f"{run.name}-node{i}.log" for i in range(2)]
        self.agents = []
        for log in self.logs:
            with open(log, "wb") as out:
                self.agents.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment,
                                                    start_new_session=True))

    def pid(self, restart: int, rank: int) -> int | None:
        try:
            return int((self.hooks / f"pid-{restart}-{rank}").read_text())
        except (OSError, ValueError):
            return None

    def kill(self, restart: int, rank: int) -> float:
        """SIGKILL one worker of the first generation; returns the time of the kill."""
        pid = self.pid(restart, rank)
        (self.hooks / "killed").touch()  # workers started from now on are the restarted ones
        os.kill(pid, signal.SIGKILL)
        return time.time()

    def steps(self) -> list[tuple[bool, int, float]]:
        """(began before the kill, step, start time) of every step any rank began, in time order."""
        rows = []
        for path in self.hooks.glob("steps-*"):
            for line in path.read_text().splitlines():
                first, step, started = line.split()
                rows.append((first == "1", int(step), float(started)))
        return sorted(rows, key=lambda row: row[2])

    def wait_until(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline or any(a.poll() is not None for a in self.agents):
                self.stop()
                pytest.fail(f"never saw {what}\n{self.output()[-4000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """End what is left: the agents stop their workers on SIGTERM (which run in sessions of
        their own); workers still there after that are killed by the pids they recorded."""
        for agent in self.agents:
            if agent.poll() is None:
                agent.terminate()
        for agent in self.agents:
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
        for pid_file in self.hooks.glob("pid-*"):
            pid = int(pid_file.read_text())
            try:
                if "vgg_onnx.train" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass  # gone already

    def finish(self) -> str:
        try:
            for agent in self.agents:
                agent.wait(timeout=AGENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
        output = self.output()
        assert [a.returncode for a in self.agents] == [0, 0], output[-6000:]
        return output

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)


def read_step(run: Path) -> int:
    try:
        return json.loads((run / "last.json").read_text())["training"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def fault_figures(nodes: TwoNodes, killed_at: float) -> tuple[int, int, float]:
    """(steps begun before the kill and done again, the first step after the restart, seconds from the
    kill to the start of that step)."""
    steps = nodes.steps()
    begun_before = max(step for first, step, _ in steps if first)
    started, first_after = min((started, step) for first, step, started in steps if not first)
    return begun_before - (first_after - 1), first_after, started - killed_at


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights and identical learning curves."""
    expected, actual = load_weights(reference / "last.safetensors"), load_weights(run / "last.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert np.array_equal(expected[key].numpy(), actual[key].numpy()), key

    def curve(folder: Path):
        return [(r["epoch"], r["train_loss"], r["val_top1_err"], r["val_loss"])
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]
    assert curve(run) == curve(reference)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), train_per_class=24, val_per_class=8)


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, shapes) -> Path:
    """The documented command on two simulated nodes, uninterrupted."""
    tmp = tmp_path_factory.mktemp("elastic")
    run = tmp / "reference"
    nodes = TwoNodes(tmp, shapes, run)
    output = nodes.finish()
    assert "torchrun restart" not in output
    return run


def test_two_nodes_equal_one_process_with_the_whole_batch(two_node_run, shapes, tmp_path):
    doc = json.loads((two_node_run / "last.json").read_text())
    assert doc["training"]["world_size"] == 2 and doc["training"]["step"] == 12
    single = tmp_path / "single"
    tiny = [w for w in TINY if w != "--checkpoint-every"]
    tiny.remove("4")
    one = subprocess.run([sys.executable, "-m", "vgg_onnx.train", *tiny, "--data", str(shapes), "--out", str(single)],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    expected, actual = load_weights(single / "last.safetensors"), load_weights(two_node_run / "last.safetensors")
    for key in expected:
        a, b = actual[key].double().numpy(), expected[key].double().numpy()
        assert np.abs(a - b).max() / np.abs(b).max() <= 1e-5, key
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, two_node_run)]
    assert [r["val_images"] for r in rows[0]] == [r["val_images"] for r in rows[1]] == [32, 32]


def test_worker_killed_mid_epoch_resumes_by_itself(two_node_run, shapes, tmp_path):
    run = tmp_path / "killed"
    nodes = TwoNodes(tmp_path, shapes, run, STEP_DELAY="0.3")
    nodes.wait_until(lambda: read_step(run) >= 8 and nodes.pid(0, 1), "the checkpoint of step 8")
    killed_at = nodes.kill(0, 1)  # rank 1, in the middle of epoch 2 (steps 7-12)
    output = nodes.finish()
    assert re.search(r"torchrun restart \d+: resuming .*killed from its checkpoint of step 8 \(epoch 2, step 2 of 6\)",
                     output), output[-4000:]
    assert_same_run(run, two_node_run)

    redone, first_step, seconds = fault_figures(nodes, killed_at)
    assert first_step == 9 and 1 <= redone <= 4, nodes.steps()
    print(f"\nkilled mid-epoch, --checkpoint-every 4: {redone} steps redone, {seconds:.1f} s from the kill to "
          f"training again")


def test_worker_killed_while_saving_uses_the_previous_checkpoint(two_node_run, shapes, tmp_path):
    run = tmp_path / "mid-save"
    nodes = TwoNodes(tmp_path, shapes, run, STALL_COMMIT_AT_STEP="8")
    nodes.wait_until(lambda: (nodes.hooks / "stalled").exists(), "the stalled save of step 8")
    # rank 0 is between the renames of the step-8 save: new weights beside the JSON of step 6
    assert read_step(run) == 6
    killed_at = nodes.kill(0, 0)
    output = nodes.finish()
    assert "restored the previous checkpoint (step 6)" in output, output[-4000:]
    assert re.search(r"torchrun restart \d+: resuming .* from its checkpoint of step 6 \(epoch 2, step 0 of 6\)",
                     output), output[-4000:]
    assert_same_run(run, two_node_run)
    redone, first_step, seconds = fault_figures(nodes, killed_at)
    assert first_step == 7, nodes.steps()
    print(f"\nkilled while saving step 8: {redone} steps redone, {seconds:.1f} s from the kill to training again")


def test_fresh_run_still_refuses_a_run_folder_of_another_job(two_node_run, shapes, tmp_path):
    """Only the agent's restart of the same job (its rendezvous id) resumes by itself."""
    env = dict(os.environ, TORCHELASTIC_RESTART_COUNT="1", TORCHELASTIC_RUN_ID="another-job")
    result = subprocess.run([sys.executable, "-m", "vgg_onnx.train", *TINY, "--data", str(shapes),
                             "--out", str(two_node_run)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "already holds a run" in result.stderr and "Traceback" not in result.stderr
    # the job's own id (--rdzv-id vgg-D), first attempt or restarted, but other agents: a new launch
    # reusing the id (its first attempt fails as above; the agent restarts it) still does not resume
    for count in ("0", "1"):
        env.update(TORCHELASTIC_RESTART_COUNT=count, TORCHELASTIC_RUN_ID="vgg-D")
        result = subprocess.run([sys.executable, "-m", "vgg_onnx.train", *TINY, "--data", str(shapes),
                                 "--out", str(two_node_run)], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 2 and "already holds a run" in result.stderr, result.stderr[-2000:]
    elastic = json.loads((two_node_run / "last.json").read_text())["training"]["elastic"]
    assert elastic["run_id"] == "vgg-D" and len(elastic["agents"]) == 2, elastic
