import argparse
import os
import random

import numpy as np
import pytest
import torch

from common import utils
from common.utils import UserError


def _parser():
    parser = utils.add_common_flags(argparse.ArgumentParser())
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    return parser


def test_config_values_are_defaults_and_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nlr: 0.5\ndata: breastmnist\n")
    args = utils.parse_args(_parser(), ["--config", str(config), "--lr", "0.2"])
    assert args.epochs == 3 and args.lr == 0.2 and args.data == "breastmnist"
    config.write_text("epochs: 3\nepoch: 4\n")
    with pytest.raises(UserError, match=r"unknown keys \['epoch'\]"):
        utils.parse_args(_parser(), ["--config", str(config)])


def test_atomic_write_survives_a_crash_between_write_and_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    utils.save_checkpoint({"epoch": 1}, path)

    def crash(src, dst):
        raise KeyboardInterrupt("killed before rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.pt"]            # and no temporary file is left


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(5)
    utils.seed_everything(1)
    utils.save_checkpoint({"rng": utils.rng_state(gen)}, str(tmp_path / "c.pt"))
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    state = utils.load_checkpoint(str(tmp_path / "c.pt"))
    utils.seed_everything(99)
    gen2 = torch.Generator().manual_seed(0)
    utils.set_rng_state(state["rng"], gen2)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_run_dir_refuses_a_different_command_and_a_finished_run(tmp_path):
    out = str(tmp_path / "run")
    args = utils.parse_args(_parser(), ["--out", out])
    assert utils.prepare_run_dir(out, args, done_file="metrics.json") is False
    assert utils.prepare_run_dir(out, args, done_file="metrics.json") is True   # unfinished: resume
    other = utils.parse_args(_parser(), ["--out", out, "--lr", "0.3"])
    with pytest.raises(UserError, match="different command"):
        utils.prepare_run_dir(out, other, done_file="metrics.json")
    open(os.path.join(out, "metrics.json"), "w").close()
    with pytest.raises(UserError, match="finished run"):
        utils.prepare_run_dir(out, args, done_file="metrics.json")
    redo = utils.parse_args(_parser(), ["--out", out, "--lr", "0.3", "--overwrite"])
    assert utils.prepare_run_dir(out, redo, done_file="metrics.json") is False
