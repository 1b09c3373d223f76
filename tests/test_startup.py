"""Every script parses its flags before loading torch: --help, --version and a bad flag answer without
importing torch, timm, torchvision, sklearn, matplotlib or medmnist (seconds apiece), and give the same
one line main()'s own parse gives. common/flags.py restates values of the heavy modules for that: they
must agree."""
import argparse
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

import common
from common import cli, flags
from conftest import REPO

SCRIPTS = sorted(os.path.relpath(p, REPO) for pattern in ("*.py", "scripts/*.py")
                 for p in glob.glob(os.path.join(REPO, pattern)))
# the scripts whose parser is cli.add_common_flags' (--epochs, --seed, --config)
TRAINING = [s for s in SCRIPTS if s.startswith("pretrain_") or s in ("evaluate.py", "finetune_beit.py")]
HEAVY = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "medmnist", "scipy")

# runs the script as `python script args` would, then reports which heavy modules got imported
PROBE = """
import atexit, runpy, sys
script, heavy = sys.argv[1], sys.argv[2].split(",")
atexit.register(lambda: print("loaded:" + ",".join(m for m in heavy if m in sys.modules), file=sys.stderr))
sys.argv = sys.argv[3:]
sys.path[0] = __import__("os").path.dirname(script)
runpy.run_path(script, run_name="__main__")
"""


def probe(script, *args):
    """(exit code, stdout, stderr without the probe's line, heavy modules loaded)."""
    path = os.path.join(REPO, script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSSL_NO_DOWNLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, path, ",".join(HEAVY), path, *args], capture_output=True,
                       text=True, env=env, timeout=120)
    lines = r.stderr.splitlines()
    loaded = [line for line in lines if line.startswith("loaded:")]
    assert loaded, r.stderr[-2000:]
    return (r.returncode, r.stdout, "\n".join(line for line in lines if not line.startswith("loaded:")),
            [m for m in loaded[-1].removeprefix("loaded:").split(",") if m])


def test_the_list_holds_every_kind_of_script():
    assert {"evaluate.py", "finetune_beit.py", "pretrain_byol.py", "pretrain_mae.py", "scripts/report.py",
            "scripts/compare.py", "scripts/table.py", "scripts/select_recipe.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_version_and_a_bad_flag_load_no_torch(script):
    code, out, err, loaded = probe(script, "--help")
    assert code == 0 and out.startswith("usage:") and "--version" in out and loaded == [], (err, loaded)
    code, out, err, loaded = probe(script, "--version")
    assert (code, out, loaded) == (0, f"MedSSL {common.__version__}\n", []), (err, loaded)
    code, out, err, loaded = probe(script, "--no-such-flag")
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and loaded == [], (err, loaded)


@pytest.mark.parametrize("script", TRAINING)
def test_a_bad_value_a_range_and_a_config_are_refused_before_torch(script, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: ten\n")
    for args, needle in [(["--epochs", "ten"], "error: --epochs: invalid int value: 'ten'"),
                         (["--seed", "-1"], "error: --seed must be in [0, 2**32)"),
                         (["--config", str(config)], f"error: config {config}: epochs: invalid int value: 'ten'")]:
        code, out, err, loaded = probe(script, *args)
        assert code == 2 and err.startswith(needle) and len(err.splitlines()) == 1, (args, err)
        assert loaded == [], (args, loaded)


def test_a_bad_augmentation_is_refused_before_torch():
    code, _, err, loaded = probe("pretrain_simclr.py", "--aug", "base+blurr")
    assert code == 2 and "unknown augmentation 'blurr'" in err and loaded == [], (err, loaded)


@pytest.mark.parametrize("script", ["pretrain_byol.py", "evaluate.py", "scripts/compare.py"])
def test_the_early_parse_and_mains_parse_give_the_same_line(script, tmp_path, monkeypatch, capsys):
    """A config error (a pretraining script, evaluate.py) and a range error (compare.py's --seed): the
    line of the run before torch loads, and the line main()'s own parse gives under run_main."""
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 1\n")
    args = ["--a", "x", "--b", "y", "--seed", "-3"] if script.startswith("scripts/") else ["--config", str(config)]
    code, _, early, loaded = probe(script, *args)
    assert code == 2 and loaded == [], early

    monkeypatch.syspath_prepend(os.path.join(REPO, os.path.dirname(script)))
    module = importlib.import_module(os.path.basename(script).removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as stop:
        cli.run_main(module.main)
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == early.strip()


def test_importing_a_script_does_not_parse(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain_vicreg.py", "--version"])
    module = importlib.import_module("pretrain_vicreg")  # would exit 0 if it parsed sys.argv
    assert module.get_args_parser().parse_args([]).epochs > 0


def _parser_with_lr():
    parser = cli.add_common_flags(argparse.ArgumentParser("x"))
    parser.add_argument("--lr", type=float, default=0.1)
    return parser


def test_parse_early_prints_a_user_error_as_one_line_and_returns_on_good_flags(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: [1, 2]\n")
    with pytest.raises(SystemExit) as stop:
        cli.parse_early(_parser_with_lr, ["--config", str(config)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: config {config}: lr: expected one value, got [1, 2]\n"
    assert cli.parse_early(_parser_with_lr, ["--seed", "3", "--lr", "0.5"]) is None


# ---------------------------------------------------------------- flags.py agrees with the heavy modules
def test_the_light_values_are_the_heavy_modules_values():
    from common import augment, data, models, optim
    assert flags.OPTIMIZERS == tuple(optim.OPTIMIZERS) and flags.LR_SCHEDULES == tuple(optim.LR_SCHEDULES)
    assert flags.BARLOW_BIAS_LR_RATIO == optim.BARLOW_BIAS_LR_RATIO and flags.STAGES == tuple(models.STAGES)
    assert flags.AUG_PRESETS == augment.NAMES and flags.AUG_MENU == tuple(augment.MENU)
    assert flags.PAPER002_MENU == augment.PAPER002_MENU and set(flags.FINETUNE_AUG) == set(augment.FINETUNE_AUG)
    assert flags.GLOBAL_CROP_SCALE == augment.GLOBAL_CROP_SCALE and flags.LOCAL_CROP_SCALE == augment.LOCAL_CROP_SCALE
    assert flags.CROPS == data.CROPS and flags.POLICIES == data.POLICIES
    assert flags.SPLIT_RATIO == data.DataOptions.split_ratio


@pytest.mark.parametrize("spec", ["byol", "simclr", "base", "base+noise", "noise+base", " base + vflip ", "",
                                  "  ", "base+base", "blurr", "base+blurr", "BYOL", "byol+", "byol+noise"])
def test_aug_spec_takes_and_refuses_what_augment_does(spec):
    from common import augment

    def outcome(check):
        try:
            return "ok", check(spec)
        except argparse.ArgumentTypeError as e:
            return "refused", str(e)
    assert outcome(flags.aug_spec) == outcome(augment.checked_spec)


def test_the_data_flags_parse_and_refuse():
    parser = argparse.ArgumentParser()
    flags.add_data_flags(parser.add_argument_group("data"))
    args = parser.parse_args(["--split-ratio", "70/20/10", "--label-columns", "A, B", "--crop", "pad"])
    assert args.split_ratio == (0.7, 0.2, 0.1) and args.label_columns == ("A", "B") and args.crop == "pad"
    for bad in (["--split-ratio", "1/2"], ["--crop", "zoom"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_startup_benchmark_times_each_command_and_checks_its_exit_code(tmp_path):
    out = tmp_path / "startup.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_startup.py", "--scripts", "scripts/table.py", "--repeats",
                        "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    row = [line for line in r.stdout.splitlines() if line.startswith("| scripts/table.py |")]
    assert len(row) == 1 and "exit" not in row[0], r.stdout  # --help, --version 0 and the bad flag 2
    times = json.loads(out.read_text())["times"]["scripts/table.py"]
    assert set(times) == {"--help", "--version", "bad flag"}
    assert all(0 < t["seconds"] < 60 and 0 < t["cpu_seconds"] < 60 for t in times.values())
    assert [times[k]["exit_codes"] for k in ("--help", "--version", "bad flag")] == [[0], [0], [2]]
