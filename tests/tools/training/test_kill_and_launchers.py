"""Training as launched for real: hard kills at any moment, torchrun across two "nodes", the deepspeed launcher's
--local_rank. Each test starts `align train` processes, so these are the slow ones."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.tools.runtime import child_environment, free_port
from conftest import tiny_recipe


@pytest.fixture
def workspace(train_workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    recipe, sets = tiny_recipe(train_workspace, tmp_path)
    sets += ["stages.caption.epochs=3", "stages.chat.epochs=2", "runtime.save_interval=1",
             f"runtime.render_cache={tmp_path / 'render-cache'}"]
    env = child_environment() | {"OMP_NUM_THREADS": "1", "ALIGN_HOME": str(train_workspace["home"])}
    return {"recipe": recipe, "sets": sets, "run": tmp_path, "env": env}


def align_train(ws, output: Path, *extra: str, prefix=(sys.executable,)) -> list[str]:
    args = [*prefix, "-m", "align", "train", str(ws["recipe"]), "--output", str(output), *extra]
    for s in ws["sets"]:
        args += ["--set", s]
    return args


def adapters(output: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(output / stage / "adapter" / "adapter.safetensors") for stage in ("caption", "chat")]


def metric_lines(output: Path) -> int:
    metrics = output / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def train_to_the_end(ws, output: Path, *extra: str) -> None:
    """`align train` in its own process, run to its end."""
    done = subprocess.run(align_train(ws, output, *extra), env=ws["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def assert_same_adapters(a: Path, b: Path) -> None:
    for want, got in zip(adapters(a), adapters(b)):
        for key in want:
            assert torch.equal(want[key], got[key]), key


@pytest.mark.slow
def test_kills_and_sigterms_at_random_moments_resume_to_the_uninterrupted_adapter(workspace):
    workspace["sets"] += ["stages.caption.epochs=12", "stages.chat.epochs=8"]  # 40 short steps to interrupt
    reference = workspace["run"] / "reference"
    train_to_the_end(workspace, reference)
    cut = workspace["run"] / "cut"
    seed = random.randrange(10**6)
    moments = random.Random(seed)
    stops = 0
    # SIGKILL and SIGTERM in turn, after 1-4 more steps and a random part of the next one (a step takes ~10 ms
    # here): kills land inside checkpoint writes as well as between them.
    for attempt in range(4):
        kind = (signal.SIGKILL, signal.SIGTERM)[attempt % 2]
        before, steps = metric_lines(cut), moments.randint(1, 4)
        process = subprocess.Popen(align_train(workspace, cut, "--resume"), env=workspace["env"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while process.poll() is None and metric_lines(cut) < before + steps and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(moments.uniform(0, 0.02))
        if process.poll() is None:
            process.send_signal(kind)
            stops += 1
        stderr = process.communicate(timeout=300)[1]
        # SIGTERM mid-run saves and exits 2; in the instants before the command starts or after it ended it ends the
        # process (-15), with nothing half-done either way.
        assert kind == signal.SIGKILL or process.returncode in (0, 2, -signal.SIGTERM), (seed, process.returncode)
        assert "Traceback" not in stderr, (seed, stderr[-2000:])
    assert stops >= 3, seed
    train_to_the_end(workspace, cut, "--resume")
    for want, got in zip(adapters(reference), adapters(cut)):
        for key in want:
            assert torch.equal(want[key], got[key]), (seed, key)
    # Every step once in metrics.jsonl, in order, with the uninterrupted run's losses (a kill repeated the steps
    # after the last checkpoint).
    steps = [[(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
             for run in (reference, cut)]
    assert steps[0] == steps[1], seed


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_like_ctrl_c_and_resumes_exactly(workspace):
    # A timeout, SLURM, Kubernetes or systemd stops a job with SIGTERM: before, training saved nothing.
    reference = workspace["run"] / "reference"
    train_to_the_end(workspace, reference)
    cut = workspace["run"] / "cut"
    process = subprocess.Popen(align_train(workspace, cut), env=workspace["env"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and metric_lines(cut) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 2 and "a checkpoint was saved" in stderr, stderr[-2000:]
    assert list((cut / "caption" / "checkpoints").glob("step*/state.json"))
    train_to_the_end(workspace, cut, "--resume")
    assert_same_adapters(reference, cut)


@pytest.mark.slow
def test_two_nodes_under_torchrun_train_as_one_process(workspace):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    one = workspace["run"] / "one"
    done = subprocess.run(align_train(workspace, one), env=workspace["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    two = workspace["run"] / "two"
    port = free_port()
    nodes = [subprocess.Popen(
        align_train(workspace, two, prefix=(torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
                                            "1", "--master-addr", "127.0.0.1", "--master-port", str(port))),
        env=workspace["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    for a, b in zip(adapters(one), adapters(two)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_deepspeed_launcher_starts_training(workspace):
    deepspeed = shutil.which("deepspeed") or pytest.skip("the deepspeed launcher is not installed")
    # It runs `python -u -m align --local_rank=N train …` per process, with LOCAL_RANK set as well.
    one, two = workspace["run"] / "one", workspace["run"] / "ds"
    done = subprocess.run(align_train(workspace, one), env=workspace["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    prefix = (deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module")
    args = align_train(workspace, two, prefix=prefix)
    args.remove("-m")
    done = subprocess.run(args, env=workspace["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for a, b in zip(adapters(one), adapters(two)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zero3_partitions_the_frozen_llm_across_two_processes(workspace):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    zero0 = workspace["run"] / "zero0"
    done = subprocess.run(align_train(workspace, zero0, "--set", "runtime.zero_stage=0"), env=workspace["env"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    zero3 = workspace["run"] / "zero3"
    prefix = (torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()))
    done = subprocess.run(align_train(workspace, zero3, "--set", "runtime.zero_stage=3", prefix=prefix),
                          env=workspace["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    share = json.loads((zero3 / "caption" / "stage_done.json").read_text())["frozen_parameters"]
    assert len(share["held_per_rank"]) == 2
    for held in share["held_per_rank"]:
        assert 0.45 < held / share["total"] < 0.55  # each rank holds about half of the frozen LLM
    for a, b in zip(adapters(zero0), adapters(zero3)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
