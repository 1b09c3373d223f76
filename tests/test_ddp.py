"""torchrun / DistributedDataParallel on the CPU (gloo): a 2-process run of each pretraining script keeps
its ranks identical and matches a 1-process run of the same global batch.

What makes the two comparable: --sync-bn (BatchNorm statistics of the global batch; torch 2.14's
SyncBatchNorm refuses CPU tensors, so common.dist.CPUSyncBatchNorm stands in for it there); every
rank augmenting the whole global batch from the shared seed and keeping its own rows (the same views
whatever the number of processes); DDP's mean of the ranks' gradients; and, for Barlow Twins, the loss
computed on the global batch's gathered embeddings, and for SimCLR the negatives gathered from every rank.

Tolerances after 2 epochs of 1 step at batch 32, with the values measured on this project's CPU
machine in brackets (BYOL / Barlow Twins): losses, relative difference < 1e-5 [1e-6 / 2e-6];
BatchNorm running statistics, relative L2 < 1e-4 [2e-6 / 8e-7]; gradients, through Adam's first
moment (a running mean of them), relative L2 < 0.05 [0.014 / 0.012]. Float32 gradients are no more
accurate than that here: on one BYOL batch they are 1% off float64 ones, and one process with 1 or
with 2 threads differs by 0.9% / 0.6%. A 2-process run without --sync-bn is off by 120% / 130%
(gradients) and 3% (statistics).
The lr is 1e-6 because Adam moves every weight by about ±lr in its first step whatever the size of its
gradient; where a gradient is rounding noise (the bias of a Linear layer followed by BatchNorm) the sign
is a coin toss, and a tiny lr keeps such differences from changing the second step's gradients.
The 1-process run is the script's main() in this process, with one thread like the CLI processes."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from common import dist
from conftest import REPO, cli_env

ENV = cli_env()  # the CPU: bit-exact comparisons, and several processes on any machine
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
SMALL = ["--data", "breastmnist", "--epochs", "2", "--max-steps", "1", "--batch-size", "32", "--sync-bn"]
COMMANDS = {
    "byol": ["pretrain_byol.py", *SMALL, "--projector-hidden", "256", "--predictor-hidden", "256", "--aug", "byol",
             "--lr", "1e-6"],
    # --lr auto: the LR range test runs on both ranks too; its sweep stays as tiny as the lr above
    "barlow": ["pretrain_barlow.py", *SMALL, "--projector", "256-256", "--aug", "base+vflip+noise",
               "--lr", "auto", "--lr-range", "1e-6", "2e-6", "3"],
    # the negatives come from both ranks: the loss matches only if the all-gather carries gradients back
    "simclr": ["pretrain_simclr.py", *SMALL, "--projector-hidden", "256", "--projector-out", "64", "--aug", "simclr",
               "--lr", "1e-6", "--warmup-epochs", "0"],
}
MODULES = {"byol": ["encoder", "projector", "predictor", "target_encoder", "target_projector"],
           "barlow": ["encoder", "projector"], "simclr": ["encoder", "projector"]}


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def first_moments(state):
    adam = state["optimizer"]["state"]
    return torch.cat([adam[i]["exp_avg"].flatten() for i in sorted(adam)])


def running_stats(state, names):
    return torch.cat([v.flatten() for name in names for k, v in state[name].items() if "running_" in k])


def losses(run):
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "log.jsonl"))]


@pytest.mark.parametrize("method", ["byol", "barlow", "simclr"])
def test_two_processes_agree_with_each_other_and_with_one(method, real_root, tmp_path, monkeypatch):
    command = [*COMMANDS[method], "--data-root", real_root]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    launch = subprocess.Popen([*TORCHRUN, *command, "--out", two], cwd=REPO, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    monkeypatch.setattr("sys.argv", [*command, "--out", one])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    importlib.import_module(command[0].removesuffix(".py")).main()      # meanwhile, one process
    out, err = launch.communicate()
    assert launch.returncode == 0, err[-3000:]
    assert out.count("done:") == 1 and "2 processes" in out          # rank 0 alone prints

    a, b = torch.load(f"{two}/checkpoint.pt", weights_only=True), torch.load(f"{one}/checkpoint.pt", weights_only=True)
    # the ranks ended with the same modules (target network included): rank 0's checkpoint stands for both
    digests = a["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0] == dist.state_digest([a[name] for name in MODULES[method]])
    assert b["rank_digests"] is None

    # and they match one process given the same global batch
    assert a["step"] == b["step"] == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert relative(running_stats(a, MODULES[method]), running_stats(b, MODULES[method])) < 1e-4
    assert relative(first_moments(a), first_moments(b)) < 0.05
    if method == "barlow":
        assert 1e-6 <= a["lr"] <= 2e-6 and 1e-6 <= b["lr"] <= 2e-6
        assert os.path.exists(f"{two}/lr_range.png")


