"""common/rundir.py: atomic files, RNG state, run directories."""
import os
import random

import numpy as np
import pytest
import torch

from common import cli, rundir
from common.cli import UserError
from test_cli import _parser


def test_atomic_write_survives_a_crash_between_write_and_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    rundir.save_checkpoint({"epoch": 1}, path)

    def crash(src, dst):
        raise KeyboardInterrupt("killed before rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.pt"]            # and no temporary file is left


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(5)
    cli.seed_everything(1)
    rundir.save_checkpoint({"rng": rundir.rng_state(gen)}, str(tmp_path / "c.pt"))
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    state = rundir.load_checkpoint(str(tmp_path / "c.pt"))
    cli.seed_everything(99)
    gen2 = torch.Generator().manual_seed(0)
    rundir.set_rng_state(state["rng"], gen2)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_run_dir_refuses_a_different_command_and_a_finished_run(tmp_path):
    out = str(tmp_path / "run")
    args = cli.parse_args(_parser(), ["--out", out])
    assert rundir.prepare_run_dir(out, vars(args), done_file="metrics.json") is False
    assert rundir.prepare_run_dir(out, vars(args), done_file="metrics.json") is True   # unfinished: resume
    other = cli.parse_args(_parser(), ["--out", out, "--lr", "0.3"])
    with pytest.raises(UserError, match="different command"):
        rundir.prepare_run_dir(out, vars(other), done_file="metrics.json")
    open(os.path.join(out, "metrics.json"), "w").close()
    with pytest.raises(UserError, match="finished run"):
        rundir.prepare_run_dir(out, vars(args), done_file="metrics.json")
    redo = cli.parse_args(_parser(), ["--out", out, "--lr", "0.3", "--overwrite"])
    assert rundir.prepare_run_dir(out, vars(redo), done_file="metrics.json") is False
