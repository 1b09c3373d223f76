"""Tests of scripts/reproduce_*.sh without training: --dry-run lists the paper's runs, creates no run
directory, and writes a spec that scripts/report.py turns into a report whose every row says "not run";
a bad argument is one line on stderr and exit 2."""
import json
import os
import re
import shutil
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
        ["pretrain_byol.py", "--aug paper001", "--aug byol+",
         "--init random --epochs 3 --max-steps 25 --data pneumoniamnist --aug paper001",
         "--init imagenet --data dermamnist --mode finetune", "--mode fewshot --shots 20", "--mode linear_probe"],
        ["--config configs/paper001_byol.yaml --aug byol+", "--probe sgd --seeds 3"]),
    "reproduce_barlow_chest.sh": (
        ["--in-chans 1", *(f"--lambd {v} " for v in ("1e-4", "1e-3", "1e-2", "1e-1")),
         *(f"--projector {p} " for p in ("1024", "2048", "512-512", "512-1024", "512-2048")),
         *(f"--label-fraction {f} " for f in ("0.01", "0.05", "0.1", "0.25", "0.5", "1")),
         "--freeze layer3", "--saliency 8", "--init imagenet", "/search-2\n"],
        ["--config configs/paper002_barlow.yaml", "--size 224", "/search-54\n"]),
    "reproduce_label_efficiency.sh": (
        ["pretrain_byol.py", "pretrain_barlow.py", "pretrain_simclr.py", "--crop-scale 0.08 1 --lr 3e-3",
         "--in-chans 1 --batch-size 64", "--max-steps 3", "--seeds 2", "--label-fraction 0.01 --epochs 2 --batch-size 32",
         "--data breastmnist --mode finetune"],
        ["--batch-size 256", "--epochs 150 --warmup-epochs 10", "--crop-scale <chosen> 1 --lr <chosen>",
         "--seeds 5", "--label-fraction 0.01 --epochs 100", "--label-fraction 0.1 --epochs 40 --batch-size 128",
         "--epochs 30 --batch-size 128 --out", "/transfer-probe-simclr\n"]),
    "reproduce_label_efficiency_round2.sh": (
        ["pretrain_moco.py", "pretrain_vicreg.py", "pretrain_dino.py", "pretrain_mae.py", "--crop-scale 0.14 1 --lr 3e-3",
         "--seeds 2 --seed 4", "--head-epochs 1 --head-lr 2e-3", "--layer-decay 0.65",
         "--init random --in-chans 1 --arch vit_tiny_patch16_224 --patch-size 4 --pool mean", "/transfer-ft-mae-s2\n"],
        ["--batch-size 256 --seed 2 --crop-scale 0.35 1 --lr 1e-3 --epochs 40 --warmup-epochs 2", "--seeds 5 --seed 10",
         "--crop-scale <chosen> 1 --lr <chosen>", "--epochs 100 --batch-size 32 --val-every 5 --head-epochs 50 --head-lr 2e-3",
         "--epochs 40 --batch-size 128 --val-every 2", "--epochs 10 --batch-size 128 --val-every 1 --layer-decay 0.65",
         "--epochs 30 --batch-size 128 --val-every 2", "/transfer-ft-random_vit-s2\n"]),
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


# ---------------------------------------------------------------- DATA=: the paper's own dataset
def _runs(stdout, script):
    """The listed commands of one Python script, as their argument lists after the script's name."""
    return [line.split(f" {script} ", 1)[1] for line in stdout.splitlines()
            if line.startswith("run ") and f" {script} " in line]


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "paper"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_replaces_the_stand_ins_of_each_paper(name, quick, tmp_path):
    own = tmp_path / "own data" / "covid.csv"  # a space in the path: every command must quote it
    own.parent.mkdir()
    own.write_text("path,label\n")
    extra = tmp_path / "unlabeled"
    extra.mkdir()
    env = {**os.environ, "DATA": str(own), "UNLABELED": str(extra),
           "DATA_FLAGS": '--label-columns "A,Pleural Effusion" --split-ratio 70/15/15'}
    result = subprocess.run(["bash", os.path.join("scripts", name), "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, env={**env, "QUICK": "1" if quick else "0", "PY": sys.executable,
                                            "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "results")})
    assert result.returncode == 0, result.stderr
    assert f"# DATA={own} " in result.stdout and " replaces " in result.stdout
    flags = f"--data {own} --label-columns A,Pleural Effusion --split-ratio 70/15/15"
    pretrain = [run for s in ("pretrain_byol.py", "pretrain_barlow.py", "pretrain_simclr.py") for run in _runs(result.stdout, s)]
    evaluate = _runs(result.stdout, "evaluate.py") + _runs(result.stdout, "finetune_beit.py")
    assert pretrain or name == "reproduce_beit.sh"
    if name == "reproduce_byol.sh":  # the corpus only: the evaluations stay on the paper's MedMNIST sets
        assert all(flags in run for run in pretrain)
        assert all(f"--data {own}" not in run for run in evaluate) and "--data breastmnist" in result.stdout
    elif name.startswith("reproduce_label_efficiency"):  # corpus and main task; the transfer task stays BreastMNIST
        transfer = [run for run in evaluate if "/transfer-" in run]
        assert transfer and all("--data breastmnist" in run for run in transfer)
        assert all(flags in run for run in pretrain + evaluate if run not in transfer)
    elif name == "reproduce_further_pretraining.sh":  # "I" everywhere, "I+U" = I + UNLABELED
        further = [run for run in pretrain if "base-sslq" not in run]  # QUICK's stand-in base
        assert further and all(f"--data {own}" in run for run in further)
        assert any(f"--data {own},{extra} " in run for run in further)
        assert all(flags in run for run in evaluate)
    else:  # paper 002: corpus and downstream task; BEiT: every row
        assert all(flags in run for run in pretrain + evaluate)
    medmnist = ("pneumoniamnist", "breastmnist", "dermamnist", "chestmnist")
    if name not in ("reproduce_byol.sh", "reproduce_label_efficiency.sh", "reproduce_label_efficiency_round2.sh"):
        replaced = [run for run in pretrain + evaluate if "base-sslq" not in run]
        assert not [run for run in replaced if any(f"--data {m}" in run or f",{m}" in run for m in medmnist)]
    with open(tmp_path / "results" / "spec.yaml") as f:
        spec = yaml.safe_load(f)
    assert str(own) in spec["intro"]
    if name == "reproduce_beit.sh":  # MedMNIST's published numbers do not apply to other data
        assert not [row for table in spec["tables"] for row in table["rows"] if row.get("published")]


def test_a_missing_data_path_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(["bash", "scripts/reproduce_barlow_chest.sh", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "QUICK": "1", "PY": sys.executable,
                                            "DATA": str(tmp_path / "nowhere.csv"), "RUNS": str(tmp_path / "runs"),
                                            "RESULTS": str(tmp_path / "results")})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: DATA={tmp_path / 'nowhere.csv'}: no such file or folder")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_report_specs_name_the_published_source_not_a_private_folder(tmp_path):
    for name in sorted(EXPECTED):
        for quick in (True, False):
            assert run_script(name, "--dry-run", quick=quick, tmp_path=tmp_path).returncode == 0
            text = (tmp_path / "results" / "spec.yaml").read_text()
            assert "shared" not in text and "REFERENCE.md" not in text, name
    for name in [*EXPECTED, "reproduce_lib.sh"]:
        assert "../shared" not in open(os.path.join(REPO, "scripts", name)).read(), name


# ---------------------------------------------------------------- the label-efficiency study's recipe choice
def _sweep_run(path, crop, lr, knn_aucs, torn=False, epochs=None):
    """A fake sweep run directory: args.yaml and a log.jsonl with one kNN monitor value per epoch."""
    path.mkdir(parents=True)
    (path / "args.yaml").write_text(yaml.safe_dump({"crop_scale": [crop, 1.0], "lr": lr, "batch_size": 256,
                                                    "epochs": epochs or len(knn_aucs)}))
    lines = [json.dumps({"epoch": e, "loss": 1.0, "knn_val_auc": v}) for e, v in enumerate(knn_aucs)]  # NaN as logged
    (path / "log.jsonl").write_text("\n".join(lines) + ("\n{\"epoch\": 9, \"knn" if torn else "\n"))


def test_select_recipe_takes_the_last_monitor_value_and_writes_what_was_tried(tmp_path):
    runs = tmp_path / "runs"
    # the best value along the way (0.9) does not count: the run's last one does
    _sweep_run(runs / "sweep-byol-crop0.08-lr1e-3", 0.08, 1e-3, [0.9, 0.70])
    _sweep_run(runs / "sweep-byol-crop0.35-lr1e-3", 0.35, 1e-3, [0.6, 0.80], torn=True)
    _sweep_run(runs / "sweep-byol-crop0.35-lr3e-3", 0.35, 3e-3, [0.5, 0.75])
    (runs / "sweep-byol-crop0.08-lr3e-3").mkdir()  # a candidate that failed: no log
    _sweep_run(runs / "sweep-byol-crop0.5-lr1e-3", 0.5, 1e-3, [0.99], epochs=5)  # stopped after 1 of 5 epochs
    _sweep_run(runs / "sweep-byol-crop0.6-lr1e-3", 0.6, 1e-3, [float("nan")])
    table = tmp_path / "sweep.md"
    result = subprocess.run([sys.executable, "scripts/select_recipe.py", *sorted(map(str, runs.iterdir())),
                             "--table", str(table)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sweep-byol-crop0.35-lr1e-3"
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| candidate | crop scale | batch size | lr | epochs | kNN val AUC (epoch) |")
    chosen = [line for line in lines if line.endswith("| yes |")]
    assert chosen == ["| sweep-byol-crop0.35-lr1e-3 | 0.35 1.0 | 256 | 0.001 | 2 | 0.8000 (2) | yes |"]
    for name in ("crop0.08-lr3e-3", "crop0.5-lr1e-3", "crop0.6-lr1e-3"):
        assert any(line.startswith(f"| sweep-byol-{name} |") and "not run" in line for line in lines), name
    flags = subprocess.run([sys.executable, "scripts/select_recipe.py", *sorted(map(str, runs.iterdir())),
                            "--print-flags"], cwd=REPO, capture_output=True, text=True)
    assert flags.stdout.strip() == "--crop-scale 0.35 1.0 --lr 0.001"


def test_select_recipe_without_any_monitor_value_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "a").mkdir()
    result = subprocess.run([sys.executable, "scripts/select_recipe.py", str(tmp_path / "a")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--eval-every" in result.stderr and "Traceback" not in result.stderr


def test_select_recipe_refuses_a_log_damaged_before_its_last_line(tmp_path):
    _sweep_run(tmp_path / "a", 0.35, 1e-3, [0.6, 0.8])
    log = tmp_path / "a" / "log.jsonl"
    log.write_text("garbage\n" + log.read_text())
    result = subprocess.run([sys.executable, "scripts/select_recipe.py", str(tmp_path / "a")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{log} line 1 is not JSON" in result.stderr


def test_the_study_pretrains_each_method_with_the_recipe_its_sweep_chose(tmp_path):
    runs = tmp_path / "runs"
    for m, best in (("byol", ("0.35", "3e-3")), ("barlow", ("0.08", "1e-3")), ("simclr", ("0.08", "3e-3"))):
        for crop in ("0.08", "0.35"):
            for lr in ("1e-3", "3e-3"):
                _sweep_run(runs / f"sweep-{m}-crop{crop}-lr{lr}", float(crop), float(lr),
                           [0.9 if (crop, lr) == best else 0.6])
    result = run_script("reproduce_label_efficiency.sh", "--dry-run", quick=False, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    pretrain = [line for line in result.stdout.splitlines() if "/pretrain-" in line.split()[-1]]
    assert len(pretrain) == 3
    for m, (crop, lr) in (("byol", ("0.35", "0.003")), ("barlow", ("0.08", "0.001")), ("simclr", ("0.08", "0.003"))):
        line, = [line for line in pretrain if line.endswith(f"/pretrain-{m}")]
        assert f"--crop-scale {crop} 1.0 --lr {lr} --epochs 150" in line, line
    assert not list(runs.glob("*.md"))  # a dry run writes no sweep table


def test_another_budget_or_dataset_gets_run_folders_of_its_own(tmp_path):
    # a finished run is skipped whatever its flags were, so EPOCHS= / DATA= / TRANSFER= must not share folders
    for env, folder in (({}, "runs/label_efficiency,"), ({"EPOCHS": "1000"}, "runs/label_efficiency-e1000,"),
                        ({"DATA": "chestmnist", "TRANSFER": "dermamnist"},
                         "runs/label_efficiency-chestmnist-to-dermamnist,")):
        result = subprocess.run(["bash", "scripts/reproduce_label_efficiency.sh", "--dry-run"], cwd=REPO,
                                capture_output=True, text=True,
                                env={**os.environ, "PY": sys.executable, "RESULTS": str(tmp_path / "res"), **env})
        assert result.returncode == 0, result.stderr
        assert f"runs in {folder}" in result.stdout.splitlines()[0], result.stdout.splitlines()[0]
        assert "--epochs 1000 " in result.stdout if env.get("EPOCHS") else "--epochs 150 " in result.stdout


def test_methods_runs_the_study_for_a_subset_with_the_same_commands(tmp_path):
    def dry_run(**env):
        result = subprocess.run(["bash", "scripts/reproduce_label_efficiency.sh", "--dry-run"], cwd=REPO,
                                capture_output=True, text=True,
                                env={**os.environ, "PY": sys.executable, "RUNS": str(tmp_path / "runs"),
                                     "RESULTS": str(tmp_path / "results"), **env})
        return result, [line for line in result.stdout.splitlines() if line.startswith("run ")]

    _, everything = dry_run()
    result, barlow = dry_run(METHODS="barlow")
    assert result.returncode == 0, result.stderr
    # the subset's commands are exactly the whole study's that concern random init and Barlow Twins
    assert barlow == [line for line in everything if "byol" not in line and "simclr" not in line]
    assert len(barlow) == 4 + 1 + 2 * 8  # 4 sweep runs, 1 pretraining, 8 evaluations of each init
    spec = yaml.safe_load((tmp_path / "results" / "spec.yaml").read_text())
    labels = {row["label"] for table in spec["tables"] for row in table["rows"]}
    assert labels == {"fine-tune, random init", "fine-tune, Barlow Twins", "probe, random init", "probe, Barlow Twins"}
    assert spec["intro"].startswith("Pretraining: Barlow Twins on PneumoniaMNIST")
    for bad, word in (("barlow dino", "'dino'"), (" ", "empty")):
        result, runs = dry_run(METHODS=bad)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and word in result.stderr
        assert not runs and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- round two: units shared by copies of the script
FAKE_PY = """#!{python}
# stands in for the training scripts: writes the files a finished run leaves, and logs the run
import json, os, sys, time
argv = sys.argv[1:]
if argv[0] == "-" or argv[0].startswith("scripts/"):  # select_recipe.py, report.py: the real ones
    os.execv({python!r}, [{python!r}, *argv])
flag = lambda name, default=None: argv[argv.index(name) + 1] if name in argv else default
out = flag("--out")
with open({log!r}, "a") as f:
    f.write(out + "\\n")
with open({log!r} + ".argv", "a") as f:
    f.write(" ".join(argv) + "\\n")
# long enough for two copies to meet on a run
time.sleep(float(os.environ.get("FAKE_PRETRAIN_SECONDS" if argv[0].startswith("pretrain_") else "FAKE_SECONDS", 0.1)))
os.makedirs(out, exist_ok=True)
ckpt = flag("--ckpt", "")
pretrain_seed = int(ckpt.split("-s")[-1].split("/")[0]) if ckpt else 0
seed, seeds = int(flag("--seed", 0)), int(flag("--seeds", 1))
args = {{"epochs": int(flag("--epochs", 1)), "mode": flag("--mode"), "label_fraction": float(flag("--label-fraction", 1)),
        "crop_scale": [float(flag("--crop-scale", 0.35)), 1.0], "lr": float(flag("--lr", 0.001)), "batch_size": 64}}
with open(os.path.join(out, "args.yaml"), "w") as f:
    json.dump(args, f)
if argv[0].startswith("pretrain_"):
    with open(os.path.join(out, "log.jsonl"), "w") as f:  # the sweep's best: crop floor 0.35, the higher lr
        f.write(json.dumps({{"epoch": 0, "loss": 1.0, "knn_val_auc": args["crop_scale"][0] + args["lr"]}}) + "\\n")
    import torch  # an encoder that FAKE_ENCODER changes, as a pretraining run that is not reproduced would
    weights = torch.full((2,), float(seed) + float(os.environ.get("FAKE_ENCODER", 0)))
    torch.save({{"encoder": {{"w": weights}}, "epoch": args["epochs"]}}, os.path.join(out, "checkpoint.pt"))
# pretraining run s: test AUC 0.80 + 0.02 s, + 0.002 for its second evaluation seed
per_seed = [{{"seed": k, "test": {{"auc": 0.80 + 0.02 * pretrain_seed + 0.002 * (k - seed), "acc": 0.7}}}}
            for k in range(seed, seed + seeds)]
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({{"per_seed": per_seed, "args": args}}, f)
"""


def _round2(tmp_path, copies=1, **env):
    log = tmp_path / "ran.log"
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PY.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    env = {**os.environ, "QUICK": "1", "PY": str(fake), "RUNS": str(tmp_path / "runs"), "METHODS": "byol mae",
           "PRETRAIN_SEEDS": "0 1", "RESULTS": str(tmp_path / "results"), **env}
    procs = [subprocess.Popen(["bash", "scripts/reproduce_label_efficiency_round2.sh"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(copies)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return (log.read_text().splitlines() if log.exists() else []), outputs


def test_round2_copies_share_the_runs_archive_whole_units_and_report_over_pretraining_runs(tmp_path):
    ran, outputs = _round2(tmp_path, copies=2, METHODS="mae")
    assert len(ran) == len(set(ran)), "a run ran twice"
    # 4 sweep runs; per pretraining seed: a pretraining run and its 14 evaluations, 8 of each random init
    assert len(ran) == 4 + 2 * (15 + 2 * 8)
    assert all(any(line.startswith("done") for line in out.splitlines()) for out in outputs)  # both worked
    archive = tmp_path / "results" / "runs"
    units = sorted(p.name for p in archive.glob("unit-*.done"))
    assert units == [f"unit-{u}-s{s}.done" for u in ("mae", "random", "random_vit") for s in (0, 1)]
    assert (archive / "unit-mae-s1.done").read_text().splitlines()[:2] == ["probe-lf0.01-mae-s1", "ft-lf0.01-mae-s1"]
    assert json.loads((archive / "ft-lf0.1-mae-s1" / "metrics.json").read_text())["per_seed"][0]["seed"] == 2
    assert "--crop-scale 0.35 1.0 --lr 0.0045" in (archive / "sweep-mae.flags").read_text()
    chosen_rows = [r for r in (archive / "sweep-mae.md").read_text().splitlines() if r.endswith("| yes |")]
    assert len(chosen_rows) == 1 and chosen_rows[0].startswith("| sweep-mae-crop0.35-lr4.5e-3 |")
    assert all((archive / d / "seconds.txt").read_text().strip().isdigit() for d in ("pretrain-mae-s0", "ld-lf1-mae-s1"))
    # a part of the round (one method, two pretraining seeds) reports beside the whole round's report
    assert not (tmp_path / "results" / "report.md").exists()
    part = tmp_path / "results" / "part-mae-s0-1"
    report_md = (part / "report.md").read_text()
    first_table = yaml.safe_load((part / "spec.yaml").read_text())["tables"][0]  # 1% of the labels
    rows = {row["label"]: row["runs"] for row in first_table["rows"]}
    assert rows["LP-FT, MAE (ViT-Tiny)"] == [str(archive / f"lpft-lf0.01-mae-s{s}") for s in (0, 1)]
    # each pretraining run is one value, its evaluation seeds' mean: 0.801 and 0.821, not four pooled seeds
    assert "| LP-FT, MAE (ViT-Tiny) | 0.811 ± 0.014 (n=2) |" in report_md
    assert "Each value is one run's mean over 2 evaluation seeds" in report_md
    assert "over the runs' means (one value per run)" in report_md
    # no pooled table: MAE's ViT-Tiny, fine-tuned at its own lr, is pooled with no ResNet-18; the wall times
    assert "every ResNet-18 method" not in report_md and "| layer decay, MAE (ViT-Tiny) | 0.811 ± 0.014 (n=2) |" in report_md
    assert "| MAE (ViT-Tiny) | 0 | 0 | 30 of 30 | 2 |" in report_md
    assert "| random init (ViT-Tiny) | – | 0 | 16 of 16 | 2 |" in report_md

    # the run directories gone (a new machine): the archived units are not run again; a unit cut short
    # runs its pretraining again (for its encoder) and the evaluations it lacks, and nothing else
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "ran.log").unlink()
    (archive / "unit-mae-s0.done").unlink()
    shutil.rmtree(archive / "ld-lf1-mae-s0")
    (archive / "sweep-mae.flags").unlink()  # chosen again from the archived sweep runs, which do not run again
    ran, _ = _round2(tmp_path, METHODS="mae")
    assert [r.split("/")[-1] for r in ran] == ["pretrain-mae-s0", "ld-lf1-mae-s0"]
    assert (archive / "unit-mae-s0.done").exists() and "--lr 0.0045" in (archive / "sweep-mae.flags").read_text()


def test_round2_a_copy_waits_for_another_copys_pretraining_and_shares_its_evaluations(tmp_path):
    # without waiting, the copy that did not pretrain would end after its second pass, before the encoder exists
    ran, outputs = _round2(tmp_path, copies=2, METHODS="byol", PRETRAIN_SEEDS="0", FAKE_SECONDS="1",
                           FAKE_PRETRAIN_SECONDS="4")
    assert len(ran) == len(set(ran)) == 1 + 14 + 8
    assert sum("wait    for another copy's pretraining run" in out for out in outputs) == 1
    evaluated = [[line for line in out.splitlines() if line.startswith("done") and "-byol-s0 " in line and
                  "pretrain-" not in line] for out in outputs]
    assert all(evaluated) and sum(map(len, evaluated)) == 14, outputs


def test_round2_evaluations_of_another_encoder_are_run_again(tmp_path):
    ran, _ = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0")
    archive = tmp_path / "results" / "runs"
    before = (archive / "ft-lf1-byol-s0" / "metrics.json").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "runs")
    (archive / "unit-byol-s0.done").unlink()
    shutil.rmtree(archive / "ld-lf1-byol-s0")
    (tmp_path / "ran.log").unlink()
    ran, outputs = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0", FAKE_ENCODER="1")
    assert "encoder differs from the one its archived evaluations used" in outputs[0]
    assert len(ran) == 15 and (archive / "ft-lf1-byol-s0" / "metrics.json").stat().st_mtime_ns > before


def test_round2_an_archived_run_of_other_flags_runs_again_and_a_reused_pid_holds_no_claim(tmp_path):
    ran, _ = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0")
    archive = tmp_path / "results" / "runs"
    command = (archive / "lpft-lf0.1-byol-s0" / "command.txt").read_text()
    assert "--head-epochs 1 --head-lr 2e-3" in command and "<runs>/pretrain-byol-s0/checkpoint.pt" in command
    assert str(tmp_path) not in command  # where the runs were kept is not part of the command
    # an evaluation archived by another protocol (here: another head lr): the unit's mark does not hide it
    (archive / "lpft-lf0.1-byol-s0" / "command.txt").write_text(command.replace("--head-lr 2e-3", "--head-lr 1e-2"))
    # a claim left by a dead copy whose PID a live process (this one) now has: not held
    (tmp_path / "runs" / "claims" / "ld-lf1-byol-s0").write_text(f"{os.getpid()} 1\n")
    shutil.rmtree(archive / "ld-lf1-byol-s0")
    shutil.rmtree(tmp_path / "runs" / "ld-lf1-byol-s0")
    (tmp_path / "ran.log").unlink()
    ran, outputs = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0")
    assert sorted(r.split("/")[-1] for r in ran) == ["ld-lf1-byol-s0", "lpft-lf0.1-byol-s0"]
    assert "rerun   " in outputs[0] and "--head-lr 1e-2" in outputs[0]
    assert (archive / "lpft-lf0.1-byol-s0" / "command.txt").read_text() == command
    assert (archive / "unit-byol-s0.done").exists()


def test_round2_run_flags_choose_how_runs_compute_and_leave_the_protocol_alone(tmp_path):
    # a GPU's runs join a CPU's: RUN_FLAGS reach every training run, not the command an archived run is checked by
    ran, _ = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0", RUN_FLAGS="--device cpu --precision fp32")
    argv = (tmp_path / "ran.log.argv").read_text().splitlines()
    assert len(argv) == len(ran) == 1 + 14 + 8
    assert all(line.endswith(" --device cpu --precision fp32") for line in argv)
    archive = tmp_path / "results" / "runs"
    assert not [p for p in archive.glob("*/command.txt") if "--device" in p.read_text() or "--precision" in p.read_text()]
    (tmp_path / "ran.log").unlink()
    ran, _ = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0")  # without them: every archived run counts
    assert ran == []
    env = {**os.environ, "PY": sys.executable, "RUNS": str(tmp_path / "runs2"), "RESULTS": str(tmp_path / "results2")}
    for bad in ("--lr 1", "--device gpu", "--precision"):
        result = subprocess.run(["bash", "scripts/reproduce_label_efficiency_round2.sh", "--dry-run"], cwd=REPO,
                                env={**env, "RUN_FLAGS": bad}, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "RUN_FLAGS" in result.stderr, bad
        assert not (tmp_path / "results2").exists()


def test_round2_stop_at_starts_no_pretraining(tmp_path):
    ran, outputs = _round2(tmp_path, STOP_AT="0", METHODS="byol mae")
    assert ran and not [r for r in ran if "/pretrain-" in r or "/sweep-" in r]
    assert not [r for r in ran if "-byol-s" in r or "-mae-s" in r]  # no encoder, no evaluation
    assert "stop    " in outputs[0] and "pretrain-byol-s0 (STOP_AT has passed" in outputs[0]
    assert "not run unit mae-s0: the sweep of mae chose nothing" in outputs[0]
    units = sorted(p.name for p in (tmp_path / "results" / "runs").glob("unit-*.done"))
    assert units == [f"unit-{u}-s{s}.done" for u in ("random", "random_vit") for s in (0, 1)]
    # one method (or baseline) at a time, its pretraining seeds together
    order = list(dict.fromkeys(r.split("/")[-1].split("-", 2)[-1] for r in ran))
    assert order == ["random-s0", "random-s1", "random_vit-s0", "random_vit-s1"]


def test_round2_archive_is_kept_by_git():
    """The archive of finished runs is what a fresh clone reports from and skips: git must not ignore it."""
    if not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "results/label_efficiency/round2/runs/unit-byol-s0.done",
                              "results/label_efficiency/round2/runs/ft-lf1-byol-s0/metrics.json"], cwd=REPO,
                             capture_output=True, text=True)
    assert ignored.returncode == 1 and not ignored.stdout  # 1: none of them ignored


def test_round2_a_pretraining_run_of_other_flags_runs_again_and_a_resumed_run_is_not_timed(tmp_path):
    ran, _ = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0")
    archive, runs = tmp_path / "results" / "runs", tmp_path / "runs"
    command = (runs / "pretrain-byol-s0" / "command.txt").read_text()
    assert command == (archive / "pretrain-byol-s0" / "command.txt").read_text() and "--lr 1e-3" in command
    # the pretraining run was made by another recipe (a sweep chose otherwise since): it runs again from the
    # start, and the evaluations of its old encoder with it
    for made in (runs, archive):
        (made / "pretrain-byol-s0" / "command.txt").write_text(command.replace("--lr 1e-3", "--lr 9e-3"))
    (tmp_path / "ran.log").unlink()
    ran, outputs = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0", FAKE_ENCODER="1")
    assert "rerun   " in outputs[0] and "pretrain-byol-s0 (made by: " in outputs[0]
    assert ran[0].endswith("/pretrain-byol-s0") and len(ran) == 15
    assert (archive / "pretrain-byol-s0" / "command.txt").read_text() == command
    # an evaluation cut short and resumed: the attempt that finished it is not its wall time
    shutil.rmtree(archive / "ft-lf1-byol-s0")
    (runs / "ft-lf1-byol-s0" / "metrics.json").unlink()
    (runs / "ft-lf1-byol-s0" / "seed_0.json").write_text("{}")
    (tmp_path / "ran.log").unlink()
    ran, _ = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0", FAKE_ENCODER="1")
    assert [r.split("/")[-1] for r in ran] == ["ft-lf1-byol-s0"]
    assert (archive / "ft-lf1-byol-s0" / "metrics.json").exists()
    assert not (archive / "ft-lf1-byol-s0" / "seconds.txt").exists() and (archive / "ft-lf0.1-byol-s0" / "seconds.txt").exists()
    # a run directory whose command was never recorded (cut short by a copy that kept no record): run again
    # from the start, not resumed
    shutil.rmtree(archive / "ft-lf0.1-byol-s0")
    for name in ("metrics.json", "command.txt"):
        (runs / "ft-lf0.1-byol-s0" / name).unlink()
    (runs / "ft-lf0.1-byol-s0" / "seed_0.json").write_text("{}")
    (tmp_path / "ran.log").unlink()
    ran, outputs = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0", FAKE_ENCODER="1")
    assert [r.split("/")[-1] for r in ran] == ["ft-lf0.1-byol-s0"]
    assert "ft-lf0.1-byol-s0 (made by: a command that was not recorded)" in outputs[0]
    assert (archive / "ft-lf0.1-byol-s0" / "seconds.txt").exists()
    report_md = (tmp_path / "results" / "part-byol-s0" / "report.md").read_text()
    assert "| BYOL | 0 | – | 14 of 15 | 1 |" in report_md  # no unit's time while a kind (ft-lf1) has no timed run


def test_round2_a_superseded_pretraining_keeps_its_unit_open_until_it_has_run_again(tmp_path):
    """Another recipe for a finished unit's pretraining, and no pretraining may start (STOP_AT): the old
    checkpoint goes, and the unit's archived evaluations are not trusted, on this launch or the next,
    until the pretraining has run again and its encoder been checked."""
    _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0")
    archive, runs = tmp_path / "results" / "runs", tmp_path / "runs"
    command = (archive / "pretrain-byol-s0" / "command.txt").read_text()
    for made in (runs, archive):
        (made / "pretrain-byol-s0" / "command.txt").write_text(command.replace("--lr 1e-3", "--lr 9e-3"))
    for launch in range(2):
        (tmp_path / "ran.log").unlink(missing_ok=True)
        ran, outputs = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0", STOP_AT="0")
        assert not ran and not (runs / "pretrain-byol-s0").exists()
        assert (archive / "pretrain-byol-s0" / "superseded.txt").exists()
        assert not (archive / "unit-byol-s0.done").exists() and "archived unit" not in outputs[0]
    ran, outputs = _round2(tmp_path, METHODS="byol", PRETRAIN_SEEDS="0", FAKE_ENCODER="1")
    assert ran[0].endswith("/pretrain-byol-s0") and len(ran) == 15  # every evaluation of the new encoder
    assert "encoder differs from the one its archived evaluations used" in outputs[0]
    assert not (archive / "pretrain-byol-s0" / "superseded.txt").exists() and (archive / "unit-byol-s0.done").exists()


def test_round2_fine_tunes_a_vit_at_its_own_lr_and_a_resnet_at_the_default(tmp_path):
    # a ViT-Tiny trained from scratch at the ResNet's Adam 1e-3 ends below its own frozen features
    result = run_script("reproduce_label_efficiency_round2.sh", "--dry-run", quick=False, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    script = open(os.path.join(REPO, "scripts", "reproduce_label_efficiency_round2.sh")).read()
    vit_lr = re.search(r"^VIT_LR=(\S+)", script, re.M).group(1)
    finetune = [line for line in result.stdout.splitlines() if "evaluate.py" in line and "--mode finetune" in line]
    vit = [line for line in finetune if "vit_tiny" in line or "pretrain-mae-" in line]
    resnet = [line for line in finetune if line not in vit]
    assert len(vit) == 3 * (10 + 4) and len(resnet) == 6 * 3 * 10 + 3 * 4  # MAE's units and its baseline's
    assert all(f" --lr {vit_lr} " in line for line in vit)
    assert not [line for line in resnet if " --lr " in line]
    probes = [line for line in result.stdout.splitlines() if "--mode linear_probe" in line]
    assert probes and not [line for line in probes if " --lr " in line]
    spec = (tmp_path / "results" / "spec.yaml").read_text()
    assert f"a ViT-Tiny's {vit_lr}" in spec
    # the pooled tables pair the ResNet-18 methods' encoders alone: the report refuses rows of two lrs
    pooled = [t for t in yaml.safe_load(spec)["tables"] if "ResNet-18 encoders of every method" in t["title"]]
    assert len(pooled) == 3 and all(len(row["runs"]) == 6 * 3 for t in pooled for row in t["rows"])
    assert not [run for t in pooled for row in t["rows"] for run in row["runs"] if "-mae-" in run]
