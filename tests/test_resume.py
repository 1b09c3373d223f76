"""Mid-epoch resume: a pretraining run killed with SIGKILL inside an epoch and started again with the
same command ends bit-identical (torch.equal) to an uninterrupted run of the same seed, on the CPU:
weights, target network, optimiser state, position, RNG states and the log.

The interrupted run is a CLI process. Meanwhile the uninterrupted one runs in this process (main(),
with one thread like the CLI processes: bit-identical to a CLI process, and a process start-up
cheaper). Both read the real BreastMNIST file (the synthetic fixtures pass the MD5 check only inside
the test process), at 28 px, batch 8, 2 epochs of 3 steps."""
import concurrent.futures
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, cli_env

ENV = cli_env()  # the CPU: bit-exact comparisons, and several processes on any machine
SMALL = ["--data", "breastmnist", "--epochs", "2", "--max-steps", "3", "--batch-size", "8"]
COMMANDS = {
    "byol": ["pretrain_byol.py", *SMALL, "--projector-hidden", "32", "--predictor-hidden", "32", "--aug", "byol",
             "--lr", "1e-3", "--lr-schedule", "cosine", "--warmup-epochs", "1", "--ema-schedule", "cosine"],
    "barlow": ["pretrain_barlow.py", *SMALL, "--projector", "32-32", "--aug", "base+vflip+noise",
               "--lr-schedule", "1cycle", "--freeze-encoder-epochs", "1", "--trainable", "layer4"],
    "simclr": ["pretrain_simclr.py", *SMALL, "--projector-hidden", "32", "--projector-out", "16", "--aug", "simclr",
               "--lr", "1e-3", "--warmup-epochs", "1", "--optimizer", "lars"],
}


def start(command, out, *extra, output=subprocess.PIPE):
    return subprocess.Popen([sys.executable, *command, "--out", str(out), *extra], cwd=REPO, env=ENV,
                            stdout=output, stderr=output, text=True)


def position(checkpoint):
    """(epoch, step_in_epoch) of a checkpoint file (writes are atomic: it is whole or absent)."""
    state = torch.load(checkpoint, weights_only=True, mmap=True)
    return state["epoch"], state["step_in_epoch"]


def kill_inside(process, checkpoint, epoch, timeout=600):
    """SIGKILL `process` as soon as it has checkpointed inside `epoch` (not at its start)."""
    deadline, seen = time.time() + timeout, None
    while True:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no mid-epoch checkpoint appeared"
        stamp = os.stat(checkpoint).st_mtime_ns if os.path.exists(checkpoint) else None
        if stamp != seen and stamp is not None:  # a new checkpoint: read its position
            seen = stamp
            if position(checkpoint) >= (epoch, 1):
                break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_same(a, b, where="checkpoint"):
    """Every tensor torch.equal (same dtype too), every other value ==, through nested containers."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def log(run):
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_sec"} for line in open(run / "log.jsonl")]


def run_in_process(command, out, monkeypatch):
    """The CLI's main() in this process (in a thread, while this one watches the CLI process)."""
    script = importlib.import_module(command[0].removesuffix(".py"))
    monkeypatch.setattr("sys.argv", [*command, "--out", str(out)])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    return concurrent.futures.ThreadPoolExecutor(1).submit(script.main)


@pytest.mark.parametrize("method", ["byol", "barlow", "simclr"])
def test_run_killed_mid_epoch_and_rerun_equals_an_uninterrupted_run(method, real_root, tmp_path, monkeypatch):
    command = [*COMMANDS[method], "--data-root", real_root]
    checkpoint = tmp_path / "resumed" / "checkpoint.pt"
    killed = start(command, tmp_path / "resumed", "--save-every", "2", output=subprocess.DEVNULL)
    straight = run_in_process(command, tmp_path / "straight", monkeypatch)  # no mid-epoch checkpoints
    kill_inside(killed, checkpoint, epoch=1)
    assert killed.returncode == -signal.SIGKILL
    epoch, step_in_epoch = position(checkpoint)
    assert epoch == 1 and step_in_epoch == 1                       # it resumes mid-epoch, not at a boundary

    again = start(command, tmp_path / "resumed", "--save-every", "2")
    out, err = again.communicate()
    assert again.returncode == 0, err
    assert "resuming" in out and "at epoch 1, step 1 of it" in out
    straight.result()

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    assert a["epoch"] == 2 and a["step"] == 6 and a["step_in_epoch"] == 0
    del a["meta"], b["meta"]                                       # --out and --save-every differ
    assert_same(a, b)
    assert log(tmp_path / "straight") == log(tmp_path / "resumed")
    assert [entry["epoch"] for entry in log(tmp_path / "resumed")] == [0, 1]
    assert not [name for name in os.listdir(tmp_path / "resumed") if name.startswith(".tmp-")]


