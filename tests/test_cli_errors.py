"""Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback."""
import pytest

from conftest import run_cli
from common import models, rundir


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


EVAL = ("evaluate.py", "--data", "breastmnist", "--mode", "linear_probe")


@pytest.mark.parametrize("args, needles", [
    (("--data", "breastmnsit"), ["unknown dataset 'breastmnsit'", "pneumoniamnist"]),
    (("--size", "32"), ["unsupported --size 32"]),
    (("--epochs", "0"), ["--epochs must be positive"]),
    (("--lr", "-1"), ["--lr must be positive"]),
    (("--batch-size", "0"), ["--batch-size must be at least 2"]),
    (("--batch-size", "5000"), ["larger than the 4708 training images"]),
    (("--data", "dermamnist", "--data-root", "/nonexistent"), ["dermamnist.npz not found in /nonexistent"]),
])
def test_pretrain_bad_input(real_root, tmp_path, args, needles):
    base = ["pretrain_byol.py", "--data", "pneumoniamnist", "--data-root", real_root, "--out", str(tmp_path / "r")]
    _one_line_error(run_cli(*base, *args), *needles)


@pytest.mark.parametrize("args, needles", [
    (("--label-fraction", "1.5"), ["--label-fraction must be in (0, 1]"]),
    (("--mode", "fewshot", "--shots", "200"), ["more than class 0 has (147"]),
    (("--batch-size", "600", "--mode", "finetune"), ["larger than the 546 training images"]),
    (("--ckpt", "/nonexistent/checkpoint.pt"), ["does not exist"]),
    (("--ckpt", "x.pt", "--init", "random"), ["--ckpt or --init"]),
])
def test_evaluate_bad_input(real_root, tmp_path, args, needles):
    _one_line_error(run_cli(*EVAL, "--data-root", real_root, "--out", str(tmp_path / "e"), *args), *needles)


def test_checkpoint_of_other_stem_or_not_ours(real_root, tmp_path):
    path = str(tmp_path / "small.pt")
    rundir.save_checkpoint({"encoder": models.build_encoder("resnet18", "small", 3).state_dict(),
                           "meta": {"format": "medssl", "arch": "resnet18", "stem": "small", "in_chans": 3}}, path)
    r = run_cli(*EVAL, "--data-root", real_root, "--ckpt", path, "--stem", "imagenet", "--out", str(tmp_path / "a"))
    _one_line_error(r, "small stem", "--stem small")
    r = run_cli(*EVAL, "--data-root", real_root, "--ckpt", path, "--in-chans", "1", "--out", str(tmp_path / "b"))
    _one_line_error(r, "in_chans 1")
    foreign = str(tmp_path / "foreign.pt")
    rundir.save_checkpoint({"encoder": {}, "meta": {"format": "someone-else"}}, foreign)
    _one_line_error(run_cli(*EVAL, "--data-root", real_root, "--ckpt", foreign, "--out", str(tmp_path / "c")),
                    "not a MedSSL checkpoint")


def test_config_with_unknown_key(real_root, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 2\nlearning_rate: 0.1\n")
    r = run_cli("pretrain_byol.py", "--config", str(config), "--data-root", real_root, "--out", str(tmp_path / "r"))
    _one_line_error(r, "unknown keys ['learning_rate']")
