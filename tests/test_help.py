"""Every script and helper answers --help: exit 0, usage on stdout, and nothing written, neither in
the repository nor in the directory it is run from."""
import glob
import os

import pytest

from helptext import REPO, run_help

PYTHON_SCRIPTS = sorted(os.path.relpath(p, REPO) for pattern in ("*.py", "scripts/*.py", "benchmarks/*.py")
                        for p in glob.glob(os.path.join(REPO, pattern)))
# reproduce_lib.sh is sourced by the reproduce scripts, not run: it has no command line of its own
SHELL_SCRIPTS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "scripts", "*.sh"))
                       if not p.endswith("reproduce_lib.sh"))


def test_the_lists_hold_every_kind_of_script():
    assert {"evaluate.py", "pretrain_byol.py", "scripts/report.py", "scripts/compare.py"} <= set(PYTHON_SCRIPTS)
    assert "scripts/demo.sh" in SHELL_SCRIPTS and "scripts/reproduce_byol.sh" in SHELL_SCRIPTS


@pytest.mark.parametrize("script", PYTHON_SCRIPTS + SHELL_SCRIPTS)
def test_help_exits_0_prints_usage_and_writes_nothing(script):
    h = run_help(script)
    assert h.returncode == 0, h.stderr
    assert len(h.stdout.strip().splitlines()) >= 3, h.stdout
    if script.endswith(".py"):
        assert h.stdout.lower().startswith("usage:") and "--help" in h.stdout
    assert h.new_in_cwd == [], "wrote into the working directory"
    assert h.new_in_repo == [], "created files in the repository"
    assert h.changed_in_repo == [], "changed files in the repository"


@pytest.mark.parametrize("script", ["pretrain_byol.py", "pretrain_barlow.py", "pretrain_simclr.py", "evaluate.py",
                                    "finetune_beit.py"])
def test_every_script_shows_its_defaults_and_the_data_flags(script):
    text = " ".join(run_help(script).stdout.split())
    assert "(default: 0)" in text  # --seed, through the shared formatter
    for flag in ("--split-ratio", "--label-columns", "--crop", "--cache-dir", "--host-memory"):
        assert flag in text
    assert "own images: any side" in text


@pytest.mark.parametrize("script", ["evaluate.py", "finetune_beit.py"])
def test_every_lr_schedule_is_described(script):
    """The choices come from optim.LR_SCHEDULES: each must be explained, not only listed."""
    text = " ".join(run_help(script).stdout.split())
    for described in ("cosine = cosine decay to 0", "1cycle = fastai's one-cycle", "step = x0.1 at 50% and 75%",
                      "linear decay to 0", "constant"):
        assert described in text, (script, described)
    assert "--positive-class" in text and "0 = malignant" in text and "--tensorboard" in text
