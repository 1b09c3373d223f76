"""Preemption (common/preemption.py): SIGUSR1 in a real pretraining process stops it at the end of the step,
with the checkpoint of that step (mid-epoch position included), one line and exit code 75; under SLURM it
requeues the job (a fake scontrol records its arguments); the same command then resumes bit-identically
to an uninterrupted run. SIGTERM under SLURM waits for the step's end too, without a requeue; evaluate.py
stops at once, its finished seeds kept."""
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import cli, errors, preemption
from conftest import REPO, cli_env
from test_resume import assert_same, log

pytestmark = pytest.mark.usefixtures("fresh_state")

SCRIPT = "pretrain_simclr.py"
SMOKE = ["--projector-hidden", "32", "--projector-out", "16", "--aug", "simclr"]
JOB = "4242"
TQDM = re.compile(r"\s*epoch \d+:")  # the progress bar on stderr


@pytest.fixture(autouse=True)
def handlers(monkeypatch):
    """Not under SLURM unless a test says so; the handlers cli.run_main installs in this process put back."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def scontrol(tmp_path):
    """A fake `scontrol` first on PATH that writes its arguments to a file; returns (bin folder, that file)."""
    folder, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    folder.mkdir()
    (folder / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (folder / "scontrol").chmod(0o755)
    return str(folder), calls


def run_main(monkeypatch, script, *args):
    """`python <script> args` in this process: its main() under cli.run_main, as the script's end does."""
    monkeypatch.setattr("sys.argv", [script, *map(str, args)])
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    cli.run_main(importlib.import_module(script.removesuffix(".py")).main)


def test_sigusr1_mid_epoch_checkpoints_the_step_requeues_and_the_same_command_resumes_bit_exactly(
        real_root, tmp_path, monkeypatch, capsys, scontrol):
    command = [SCRIPT, "--data", "breastmnist", "--data-root", real_root, "--epochs", "2", "--max-steps", "6",
               "--batch-size", "8", "--lr-schedule", "cosine", "--warmup-epochs", "1", "--device", "cpu", *SMOKE]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    # a checkpoint at step 2 shows that the loop runs; the signal comes after it, inside epoch 0's 6 steps
    env = cli_env(SLURM_JOB_ID=JOB, PATH=f"{scontrol[0]}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen([sys.executable, *command, "--save-every", "2", "--out", str(stopped)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "checkpoint.pt").exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGUSR1)
    run_main(monkeypatch, *command, "--out", straight)  # meanwhile, the uninterrupted run
    _, err = process.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip() and not TQDM.match(line)]
    assert process.returncode == preemption.EXIT_PREEMPTED == 75 and len(lines) == 1, err[-2000:]

    state = torch.load(stopped / "checkpoint.pt", weights_only=True)
    epoch, step, in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
    assert 2 < step and 0 < in_epoch < 6 and step == 6 * epoch + in_epoch  # the step it stopped at, mid-epoch
    assert lines[0] == (f"stopped by SIGUSR1 at epoch {epoch}, step {step}; the checkpoint in {stopped} is kept; "
                        f"run the same command again to resume; SLURM job {JOB} is requeued to run it again")
    assert scontrol[1].read_text() == f"requeue {JOB}\n"  # once, with the job's id

    capsys.readouterr()
    run_main(monkeypatch, *command, "--save-every", "2", "--out", stopped)  # what the requeued job runs
    assert f"at epoch {epoch}, step {in_epoch} of it" in capsys.readouterr().out
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (straight, stopped))
    assert a["step"] == b["step"] == 12
    del a["meta"], b["meta"]  # --out and --save-every differ
    assert_same(a, b)
    assert log(straight) == log(stopped)


def one_line(capsys, main, code):
    with pytest.raises(SystemExit) as e:
        cli.run_main(main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(lines) == 1, lines
    return lines[0]


def test_sigterm_under_slurm_waits_for_the_step_and_does_not_requeue(tmp_path, monkeypatch, capsys, scontrol):
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    monkeypatch.setenv("PATH", f"{scontrol[0]}{os.pathsep}{os.environ['PATH']}")
    seen = []

    def training():
        errors.progress.update(out=str(tmp_path), epoch=0, step=5)
        preemption.defer()  # what pretrain.train does before its loop
        os.kill(os.getpid(), signal.SIGTERM)
        seen.append(preemption.requested())  # the step goes on
        preemption.stop()
    line = one_line(capsys, training, code=143)
    assert seen == [signal.SIGTERM] and line.startswith("interrupted at epoch 0, step 5;")
    assert not scontrol[1].exists()  # scancel sends SIGTERM too: no requeue

    def twice():  # a second signal while the first waits for the step's end stops at once
        preemption.defer()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        seen.append("not reached")
    assert one_line(capsys, twice, code=75).startswith("stopped by SIGUSR1")
    assert seen == [signal.SIGTERM] and scontrol[1].read_text() == f"requeue {JOB}\n"

    monkeypatch.delenv("SLURM_JOB_ID")  # elsewhere SIGTERM stops at once, as before
    errors.progress.reset()
    assert one_line(capsys, lambda: (preemption.defer(), os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)),
                    code=143).startswith("interrupted before")


def test_sigusr1_stops_evaluate_with_its_finished_seeds_kept(real_root, tmp_path, monkeypatch, capsys):
    import evaluate
    out = tmp_path / "knn"
    command = ["evaluate.py", "--init", "random", "--data", "breastmnist", "--data-root", real_root, "--mode", "knn",
               "--seeds", "2", "--device", "cpu", "--out", out]
    run_seed = evaluate.run_seed

    def signalled_at_seed_1(args, seed, *rest):
        if seed == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return run_seed(args, seed, *rest)
    monkeypatch.setattr(evaluate, "run_seed", signalled_at_seed_1)
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, *command)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 75 and line == (f"stopped by SIGUSR1 at seed 1; the checkpoint in {out} is kept; run the "
                                           f"same command again to resume")
    assert (out / "seed_0.json").exists() and not (out / "seed_1.json").exists()
    monkeypatch.setattr(evaluate, "run_seed", run_seed)
    run_main(monkeypatch, *command)
    assert "seed 0 finished" in capsys.readouterr().out
    assert [r["seed"] for r in json.loads((out / "metrics.json").read_text())["per_seed"]] == [0, 1]
