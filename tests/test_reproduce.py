"""Tests of scripts/reproduce_*.sh without training: --dry-run lists the paper's runs, creates no run
directory, and writes a spec that scripts/report.py turns into a report whose every row says "not run";
a bad argument is one line on stderr and exit 2."""
import os
import subprocess
import sys

import pytest
import yaml

from scripts import report
from tests.conftest import REPO

# script -> (strings every QUICK dry run must list, strings the paper-scale dry run must list)
EXPECTED = {
    "reproduce_beit.sh": (
        ["finetune_beit.py", "--data breastmnist --size 28 --balance 0.4", "--data pneumoniamnist --size 224 --balance 0.5",
         "configs/medmnist_resnet50_224.yaml", "--resize 64"],
        ["configs/medmnist_resnet18_28.yaml --data pneumoniamnist --out", "--size 224 --balance 0.4 --seeds 3"]),
    "reproduce_byol.sh": (
        ["pretrain_byol.py", "--aug paper001", "--aug byol+", "--data pneumoniamnist --init random",
         "--init imagenet --data dermamnist --mode finetune", "--mode fewshot --shots 20", "--mode linear_probe"],
        ["--config configs/paper001_byol.yaml --aug byol+", "--probe sgd --seeds 3"]),
    "reproduce_barlow_chest.sh": (
        ["--in-chans 1", *(f"--lambd {v} " for v in ("1e-4", "1e-3", "1e-2", "1e-1")),
         *(f"--projector {p} " for p in ("1024", "2048", "512-512", "512-1024", "512-2048")),
         *(f"--label-fraction {f} " for f in ("0.01", "0.05", "0.1", "0.25", "0.5", "1")),
         "--freeze layer3", "--saliency 8", "--init imagenet", "/search-2\n"],
        ["--config configs/paper002_barlow.yaml", "--size 224", "/search-54\n"]),
    "reproduce_further_pretraining.sh": (
        ["--init barlowtwins --arch resnet50", "--trainable last-block", "--trainable all",
         "--data breastmnist,pneumoniamnist", "--freeze layer4", "--seeds 3"],
        ["--config configs/paper003_further.yaml", "--data dermamnist,chestmnist", "--seeds 35"]),
}


def run_script(name, *args, quick=True, tmp_path):
    env = {**os.environ, "QUICK": "1" if quick else "0", "PY": sys.executable,
           "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results"), "MEDSSL_NO_DOWNLOAD": "1"}
    return subprocess.run(["bash", os.path.join("scripts", name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "paper"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_lists_the_runs_trains_nothing_and_its_spec_reports_not_run(name, quick, tmp_path):
    result = run_script(name, "--dry-run", quick=quick, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in EXPECTED[name][0 if quick else 1]:
        assert text in result.stdout, (text, result.stdout)
    assert ("/search-3\n" if quick else "/search-55\n") not in result.stdout  # 3 / 55 search trials
    assert not (tmp_path / "runs").exists()  # nothing trained, not even an empty run directory
    assert "report  " in result.stdout.splitlines()[-1]
    # the same spec the real run hands to report.py, built without any run: every row says why it is missing
    with open(tmp_path / "results" / "spec.yaml") as f:
        spec = yaml.safe_load(f)
    text = open(report.build_report(spec, str(tmp_path / "report"))).read()
    assert ("QUICK" in text) == quick  # a QUICK report says what it substituted
    rows = [row["label"] for table in spec["tables"] for row in table["rows"]]
    assert len(rows) >= 8
    for label in rows:
        lines = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
        assert lines and all("not run: " in line for line in lines), (label, lines)


def test_dry_run_by_environment_variable(tmp_path):
    env_result = subprocess.run(["bash", "scripts/reproduce_byol.sh"], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "QUICK": "1", "DRY_RUN": "1", "PY": sys.executable,
                                     "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results")})
    assert env_result.returncode == 0, env_result.stderr
    assert "run     " in env_result.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_bad_argument_is_one_line_and_exit_2(name, tmp_path):
    result = run_script(name, "--dry-run", "--epochs=3", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown argument '--epochs=3'") and result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_a_bad_quick_value_is_refused(tmp_path):
    env = {**os.environ, "QUICK": "yes", "PY": sys.executable, "RUNS": str(tmp_path / "r")}
    result = subprocess.run(["bash", "scripts/reproduce_beit.sh", "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "error: QUICK must be 0 or 1, got 'yes'"
