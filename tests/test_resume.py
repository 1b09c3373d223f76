"""Resume after SIGKILL, for every pretraining method (common/methods.py): a run killed while it writes the
checkpoint after a mid-epoch one, and started again with the same command, ends bit-identical (torch.equal)
to an uninterrupted run of the same seed on the CPU: every module, the optimiser's state, the method's own
state (MoCo's queue, Barlow Twins' lr), the position, the RNG states and the log.

The killed run is a fork of this process running the script's main() (a new process would add only
Python's and torch's start-up, ~4 s of CPU), and it SIGKILLs itself half-way through writing its end-of-run
checkpoint: its last whole checkpoint is then the one inside epoch 1, its log is a line ahead of that
checkpoint and a torn temporary file lies beside it. Meanwhile the uninterrupted run, and then the resumed
one, run in this process with one thread like the fork. They read the real BreastMNIST file at 28 px:
batch 8, 2 epochs of 2 steps, a warm-up then cosine lr (the schedule moves every step), the method's smoke
flags (small heads, cheap views) and its default optimiser."""
import importlib
import json
import os
import signal
import time
import traceback

import pytest
import torch

from common import methods, rundir
from conftest import run_main, script_main

METHODS = methods.all_methods()
SMALL = ["--data", "breastmnist", "--epochs", "2", "--max-steps", "2", "--batch-size", "8",
         "--lr-schedule", "cosine", "--warmup-epochs", "1", "--device", "cpu"]
# the one mid-epoch checkpoint: step 3 of 4, the first of epoch 1; a run without it draws the same
MID_EPOCH = ["--save-every", "3"]
# a method's flags that put more of its state through the resume, where it has them (any method)
WHERE_PRESENT = {
    "--ema-schedule": ["--ema-schedule", "cosine"],                       # the momentum moves every step too
    "--freeze-encoder-epochs": ["--freeze-encoder-epochs", "1", "--trainable", "layer4"],  # a new phase at epoch 1
}


def flags_of(method):
    parser = importlib.import_module(method.script.removesuffix(".py")).get_args_parser()
    return [flag for option, extra in WHERE_PRESENT.items() if option in parser._option_string_actions
            for flag in extra]


def position(checkpoint):
    state = torch.load(checkpoint, weights_only=True, mmap=True)
    return state["epoch"], state["step_in_epoch"]


def fork_killed(monkeypatch, script, args, epoch):
    """A fork of this process running `python <script> args` that SIGKILLs itself in the middle of writing
    the checkpoint of `epoch` (some bytes of it written); returns its PID. The parent goes on at once."""
    monkeypatch.setattr("sys.argv", [script, *map(str, args)])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    main = script_main(script)
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns into pytest
        real_save = rundir._torch_save

        def torn_save(state, f):
            if state["epoch"] == epoch:
                f.write(b"\x00" * 4096)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(state, f)
        rundir._torch_save = torn_save
        main()
    except BaseException:
        traceback.print_exc()
    os._exit(1)


def wait_killed(pid, timeout=120):
    """The fork's exit status, once it is gone (SIGKILLed by the test after `timeout` seconds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked run did not end within {timeout} s")


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


# a timm ViT of each size under one method (ViT-Base: 86 M parameters, a 1 GB checkpoint with Adam's moments:
# tests/test_backbones.py builds it and takes a training step instead)
VITS = [("simclr", ["--arch", "vit_tiny_patch16_224"]), ("simclr", ["--arch", "vit_small_patch16_224"])]


@pytest.mark.parametrize("method, extra", [(m, []) for m in METHODS] + [(methods.get(n), f) for n, f in VITS],
                         ids=[m.name for m in METHODS] + [f"{n}-{f[1].split('_')[1]}" for n, f in VITS])
def test_run_killed_after_a_mid_epoch_checkpoint_and_rerun_equals_an_uninterrupted_run(
        method, extra, real_root, tmp_path, monkeypatch, capsys):
    command = [*SMALL, "--data-root", real_root, *method.smoke_flags, *flags_of(method), *extra]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    killed = fork_killed(monkeypatch, method.script, [*command, *MID_EPOCH, "--out", resumed], epoch=2)
    run_main(monkeypatch, method.script, *command, "--out", straight)  # meanwhile; no mid-epoch checkpoint
    status = wait_killed(killed)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the fork ended with status {status}"
    assert position(resumed / "checkpoint.pt") == (1, 1)           # it resumes mid-epoch, not at a boundary
    assert [n for n in os.listdir(resumed) if n.startswith(".tmp-checkpoint.pt")]  # the torn write
    assert [entry["epoch"] for entry in log(resumed)] == [0, 1]    # epoch 1's line, ahead of its checkpoint

    capsys.readouterr()
    run_main(monkeypatch, method.script, *command, *MID_EPOCH, "--out", resumed)
    out = capsys.readouterr().out
    assert "resuming" in out and "at epoch 1, step 1 of it" in out

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == 2 and a["step"] == 4 and a["step_in_epoch"] == 0 and a["meta"]["method"] == method.name
    assert set(a["meta"]["modules"]) <= set(a) and "encoder" in a["meta"]["modules"]
    del a["meta"], b["meta"]                                       # --out and --save-every differ
    assert_same(a, b)
    assert log(straight) == log(resumed)
    assert [entry["epoch"] for entry in log(resumed)] == [0, 1]
    assert not [name for name in os.listdir(resumed) if name.startswith(".tmp-")]
