"""torchrun / DistributedDataParallel on the CPU (gloo), for every pretraining method of common/methods.py:
a 2-process run keeps its ranks identical and matches a 1-process run of the same global batch.

What makes the two comparable: --sync-bn (BatchNorm statistics of the global batch; torch 2.14's
SyncBatchNorm refuses CPU tensors, so common.dist.CPUSyncBatchNorm stands in for it there); every
rank augmenting the whole global batch from the shared seed and keeping its own rows (the same views
whatever the number of processes); DDP's mean of the ranks' gradients; and a loss over the global batch
(the embeddings, negatives or keys gathered from every rank).

Tolerances after 2 epochs of 1 step at batch 16 with the methods' smoke flags, worst measured on this
project's CPU machine in brackets: losses, relative difference < 1e-5 [3e-6]; BatchNorm running
statistics, relative L2 < 1e-4 [5e-7]; every tensor of the optimiser's state (Adam's moments, SGD's and
LARS's momentum: running sums of gradients; step counts), relative L2 < 0.05 [0.007]; a method's own
float tensors (MoCo's queue of keys), relative L2 < 1e-4 [5e-6], its other tensors equal. Float32 gradients are
no more accurate than that here: on one BYOL batch they are 1% off float64 ones, and one process with 1 or
with 2 threads differs by 0.9% / 0.6%. A 2-process run without --sync-bn is off by 120% / 130%
(gradients) and 3% (statistics).
The lr is 1e-6 because Adam moves every weight by about ±lr in its first step whatever the size of its
gradient; where a gradient is rounding noise (the bias of a Linear layer followed by BatchNorm) the sign
is a coin toss, and a tiny lr keeps such differences from changing the second step's gradients. A method
with an LR range test (--lr-range) finds its lr on both ranks, over a sweep as tiny.

One torchrun launch runs every method, one after another, on one process group (this file is its entry:
run_in_turn), while the 1-process runs go in this process (the script's main(), one thread like the
ranks): each rank pays Python's and torch's start-up once, not once per method. A module-scoped fixture
makes every run once."""
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from common import dist, methods, rundir
from conftest import REPO, cli_env, real_file_root, run_main, script_main

ENV = cli_env()  # the CPU: bit-exact comparisons, and several processes on any machine
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
# float32: the tolerances below are float32's (bf16's rounding differs between a 16-image batch and two of 8)
SMALL = ["--data", "breastmnist", "--epochs", "2", "--max-steps", "1", "--batch-size", "16", "--sync-bn",
         "--device", "cpu", "--precision", "fp32"]
METHODS = methods.all_methods()


def command(method, root):
    parser = importlib.import_module(method.script.removesuffix(".py")).get_args_parser()
    lr = ["--lr", "auto", "--lr-range", "1e-6", "2e-6", "3"] if "--lr-range" in parser._option_string_actions \
        else ["--lr", "1e-6"]
    return [*SMALL, "--data-root", root, *method.smoke_flags, *lr]


MARK = "=== medssl test_ddp:"  # rank 0's lines around each method's output


def run_in_turn(runs):
    """A torchrun rank's work (this file's __main__): each of `runs` ([name, script, args]) as
    `python <script> args` would run it, one after another on the process group the first one starts (a
    script's init and destroy of the group are skipped after that, and a stuck collective fails after 2
    minutes rather than 30), rank 0 printing MARK lines around each."""
    import datetime
    group = torch.distributed
    init, destroy = group.init_process_group, group.destroy_process_group
    group.init_process_group = lambda *a, **k: None if group.is_initialized() else init(
        *a, **{**k, "timeout": datetime.timedelta(minutes=2)})
    group.destroy_process_group = lambda *a, **k: None
    main = os.environ["RANK"] == "0"
    for name, script, args in runs:
        if main:
            print(f"{MARK} {name} start", flush=True)
        sys.argv = [script, *args]
        try:
            script_main(script)()
            code = 0
        except SystemExit as e:
            code = e.code
        if main:
            print(f"{MARK} {name} exit {code}", flush=True)
    if group.is_initialized():
        destroy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{method name: (2-process run folder, 1-process run folder, rank 0's output for it, its exit code)}."""
    root = real_file_root()
    folder = tmp_path_factory.mktemp("ddp")
    todo = [[m.name, m.script, [*map(str, command(m, root)), "--out", str(folder / m.name / "two")]] for m in METHODS]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    launch = subprocess.Popen([*TORCHRUN, os.path.join(REPO, "tests", "test_ddp.py"), json.dumps(todo)],
                              cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)  # its ranks in its process group, to stop them all
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            for m in METHODS:                                            # meanwhile, one process each
                run_main(monkeypatch, m.script, *command(m, root), "--out", folder / m.name / "one")
        out, err = launch.communicate(timeout=900)
    finally:
        torch.set_num_threads(threads)
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    assert launch.returncode == 0, err[-3000:]
    found = {}
    for m in METHODS:
        said = out.split(f"{MARK} {m.name} start\n", 1)[-1].split(f"{MARK} {m.name} exit ", 1)
        code = int(said[1].split()[0]) if len(said) == 2 else None
        found[m.name] = (folder / m.name / "two", folder / m.name / "one", said[0], code, err[-3000:])
    return found


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def optimizer_tensors(state):
    """{name: every parameter's tensor of that name in the optimiser's state, flattened and joined}:
    Adam's exp_avg and exp_avg_sq, SGD's and LARS's momentum_buffer, any optimiser's step counts."""
    per_parameter = state["optimizer"]["state"]
    names = {name for entry in per_parameter.values() for name, value in entry.items() if torch.is_tensor(value)}
    return {name: torch.cat([per_parameter[i][name].flatten().double() for i in sorted(per_parameter)
                             if name in per_parameter[i]]) for name in names}


def running_stats(state, names):
    return torch.cat([torch.zeros(0), *(v.flatten() for name in names for k, v in state[name].items()
                                        if "running_" in k)])


def losses(run):
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "log.jsonl"))]


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_two_processes_agree_with_each_other_and_with_one(method, runs):
    two, one, said, code, err = runs[method.name]
    assert code == 0, err
    assert said.count("done:") == 1 and "2 processes" in said  # rank 0 alone prints

    a = torch.load(two / "checkpoint.pt", weights_only=True)
    b = torch.load(one / "checkpoint.pt", weights_only=True)
    modules = a["meta"]["modules"]
    assert modules == b["meta"]["modules"] and "encoder" in modules
    # the ranks ended with the same modules (a momentum encoder included): rank 0's checkpoint stands for both
    digests = a["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0] == dist.state_digest([a[name] for name in modules])
    assert b["rank_digests"] is None

    # and they match one process given the same global batch
    assert a["step"] == b["step"] == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    if len(running_stats(a, modules)):  # a ViT has no BatchNorm
        assert relative(running_stats(a, modules), running_stats(b, modules)) < 1e-4
    moments, single = optimizer_tensors(a), optimizer_tensors(b)
    assert moments.keys() == single.keys() and moments
    for name in moments:
        assert relative(moments[name], single[name]) < 0.05, name
    # the method's own tensors (a queue of keys from every rank and its position)
    own = [k for k in a if torch.is_tensor(a[k]) and k not in rundir.run_state_keys()]
    for name in own:
        if a[name].is_floating_point():
            assert relative(a[name].double(), b[name].double()) < 1e-4, name
        else:
            assert torch.equal(a[name], b[name]), name
    if "auto" in command(method, ""):  # the LR range test ran on both ranks
        assert 1e-6 <= a["lr"] <= 2e-6 and 1e-6 <= b["lr"] <= 2e-6
        assert os.path.exists(two / "lr_range.png")


if __name__ == "__main__":
    run_in_turn(json.loads(sys.argv[1]))
