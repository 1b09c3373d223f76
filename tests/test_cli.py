"""common/cli.py: flags, YAML configs, one-line errors."""
import argparse

import pytest

from common import cli
from common.errors import UserError


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


def test_a_config_sets_an_on_off_flag_of_either_kind(tmp_path):
    """`--x / --no-x` (BooleanOptionalAction) and a lone `--no-x` (store_false) both take true / false."""
    import argparse
    parser = _parser()
    parser.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false")
    config = tmp_path / "c.yaml"
    config.write_text("norm_last_layer: false\nnorm_pix_loss: false\n")
    args = cli.parse_args(parser, ["--config", str(config)])
    assert args.norm_last_layer is False and args.norm_pix_loss is False
    assert cli.parse_args(parser, ["--config", str(config), "--norm-last-layer"]).norm_last_layer is True
    config.write_text("norm_last_layer: 0.5\n")
    with pytest.raises(UserError, match="expected true or false"):
        cli.parse_args(parser, ["--config", str(config)])


def test_every_script_gets_the_data_flags_and_tuples_come_back_as_lists():
    args = cli.parse_args(_parser(), ["--split-ratio", "70/15/15", "--label-columns", "A,B"])
    # lists, as args.yaml reads them back: a resumed run compares its flags with those
    assert args.split_ratio == pytest.approx([0.7, 0.15, 0.15]) and args.label_columns == ["A", "B"]
    assert type(args.split_ratio) is list and cli.parse_args(_parser(), []).label_columns == []
    from common import data
    assert data.options_from(vars(args)).label_columns == ("A", "B")


def test_help_shows_each_default_once():
    parser = _parser()
    parser.add_argument("--ratio", type=float, nargs=2, default=[1e-7, 10.0], help="a range")
    parser.add_argument("--named", default="x", help="already says its default x")
    parser.add_argument("--pct", type=float, default=0.5, help="50%% of it")
    parser.add_argument("--flag", action="store_true", help="a switch")
    text = " ".join(parser.format_help().split())
    assert "a range (default: 1e-07 10)" in text and "(default: 28)" in text
    assert "50% of it (default: 0.5)" in text
    assert "already says its default x" in text and "default x (default" not in text
    assert "a switch" in text and "a switch (default" not in text  # off: nothing to show
    assert "cap on steps per epoch, for smoke runs" in text and "smoke runs (default" not in text  # None
    assert "(default: pneumoniamnist)" in text and "--label-columns A,B,..." in text
    assert "CheXpert-style)" in text and "CheXpert-style) (default" not in text  # an empty list


def test_evaluation_flags_are_one_definition():
    parser = cli.add_evaluation_flags(_parser())
    args = cli.parse_args(parser, ["--positive-class", "malignant", "--tensorboard"])
    assert args.positive_class == "malignant" and args.tensorboard
    assert cli.parse_args(parser, []).positive_class == "1"


def test_set_defaults_notes_the_papers_value_beside_the_default():
    parser = _parser()
    cli.set_defaults(parser, notes={"lr": "Chen et al.: 0.3"}, lr=0.5, epochs=7)
    text = " ".join(parser.format_help().split())
    assert "Chen et al.: 0.3 (default: 0.5)" in text and cli.parse_args(parser, []).epochs == 7
    with pytest.raises(ValueError, match="momentum"):
        cli.set_defaults(_parser(), notes={"momentum": "0.9"})
