"""common/cli.py: flags, YAML configs, one-line errors."""
import argparse

import pytest

from common import cli
from common.cli import UserError


def _parser():
    parser = cli.add_common_flags(argparse.ArgumentParser())
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    return parser


def test_config_values_are_defaults_and_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nlr: 0.5\ndata: breastmnist\n")
    args = cli.parse_args(_parser(), ["--config", str(config), "--lr", "0.2"])
    assert args.epochs == 3 and args.lr == 0.2 and args.data == "breastmnist"
    config.write_text("epochs: 3\nepoch: 4\n")
    with pytest.raises(UserError, match=r"unknown keys \['epoch'\]"):
        cli.parse_args(_parser(), ["--config", str(config)])
