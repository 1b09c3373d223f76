"""scripts/compare.py through its command line, on metrics.json / predictions.npz files written here:
the groups' names, the interval of the difference, the refusal of runs of different protocols, and the
paired test on shared test images."""
import json
import os
import sys

import numpy as np
import pytest
from scipy import stats
from scipy.special import softmax

from common import metrics
from common.errors import UserError
from conftest import run_cli

N_TEST = 80


def write_run(folder, aucs, encoder="random", seed=0, labels_seed=0, signal=1.0, **changes):
    """A run directory as evaluate.py leaves it: metrics.json with per-seed test values `aucs` (acc = auc
    - 0.1, weighted F1 = auc - 0.12) and predictions.npz with one score per seed on N_TEST test images
    (labels drawn from `labels_seed`)."""
    os.makedirs(folder, exist_ok=True)
    y = np.random.default_rng(labels_seed).integers(0, 2, N_TEST)
    rng = np.random.default_rng(seed + 100)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=(len(aucs), N_TEST)) + signal * (2 * y - 1))))
    run = {"data": "breastmnist", "data_hash": "md5-of-the-file", "size": 28, "mode": "linear_probe",
           "encoder": encoder, "task": "binary-class", "positive_class": {"index": 1, "name": "normal, benign"},
           "args": {"label_fraction": 1.0, "probe": "logreg", "shots": 20, "resize": None},
           "per_seed": [{"seed": i, "test": {"auc": a, "acc": a - 0.1, "weighted_f1": a - 0.12}}
                        for i, a in enumerate(aucs)]}
    for key, value in changes.items():
        (run["args"] if key in run["args"] else run)[key] = value
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(run, f)
    scores = np.stack([1 - p1, p1], axis=-1)
    np.savez(os.path.join(folder, "predictions.npz"), y_true=y[:, None], y_score=scores[0], y_score_per_seed=scores,
             seeds=np.arange(len(aucs)))
    return str(folder)


A, B = [0.70, 0.72, 0.69], [0.75, 0.74, 0.78]


def test_names_interval_and_the_paired_delong_test(tmp_path):
    a = write_run(tmp_path / "a", A)
    b = write_run(tmp_path / "b", B, encoder="runs/byol-cpu/checkpoint.pt", seed=1, signal=1.5)
    r = run_cli("scripts/compare.py", "--a", a, "--b", b, "--metrics", "auc,acc", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| metric | A: random, linear_probe (logreg), breastmnist 28 px, label fraction 1.0 | "
                               "B: byol-cpu, linear_probe (logreg), breastmnist 28 px, label fraction 1.0 |")
    ci = stats.ttest_ind(B, A, equal_var=False).confidence_interval(0.95)
    auc_row = next(line for line in lines if line.startswith("| auc |"))
    assert f"| {np.mean(B) - np.mean(A):+.4f} | [{ci.low:+.4f}, {ci.high:+.4f}] |" in auc_row
    # both groups scored the same 80 images: DeLong's test on each group's seed-averaged scores
    with np.load(tmp_path / "a" / "predictions.npz") as pa, np.load(tmp_path / "b" / "predictions.npz") as pb:
        ref = metrics.delong_test(pa["y_true"], pa["y_score_per_seed"].mean(0), pb["y_score_per_seed"].mean(0))
    paired = next(line for line in lines if line.startswith("paired on the same 80 test images, DeLong's test"))
    assert f"B − A {ref['diff']:+.4f}, 95% CI [{ref['ci_low']:+.4f}, {ref['ci_high']:+.4f}]" in paired
    assert "cannot reach p < 0.05" in r.stdout  # 3 seeds a side: the exact Mann-Whitney p is at least 0.1
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["mismatch"] is False and saved["paired"]["method"] == "DeLong"
    assert saved["paired"]["p"] == pytest.approx(ref["p"]) and saved["names"]["a"].startswith("random,")
    assert saved["metrics"]["auc"]["diff_ci95_low"] == pytest.approx(ci.low)


def run_main(monkeypatch, capsys, *argv):
    """main() in-process (a subprocess spends seconds importing torch through common.cli); its stdout."""
    from scripts import compare
    monkeypatch.setattr(sys, "argv", ["compare.py", *argv])
    compare.main()
    return capsys.readouterr().out


def test_runs_of_another_protocol_are_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "a", A)
    b = write_run(tmp_path / "b", B, seed=1, size=64, mode="finetune")
    r = run_cli("scripts/compare.py", "--a", a, "--b", b)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: runs differ in size: {a}/metrics.json has 28, {b}/metrics.json has 64")
    assert "--allow-mismatch" in r.stderr
    out = run_main(monkeypatch, capsys, "--a", a, "--b", b, "--metrics", "auc", "--allow-mismatch",
                   "--json", str(tmp_path / "c.json"))
    assert out.splitlines()[0] == ("warning: the runs differ in size (28 vs 64); mode (linear_probe vs finetune): "
                                   "compared anyway (--allow-mismatch)")
    assert out.splitlines()[1].startswith("| metric | A: random, linear_probe (logreg), breastmnist 28 px")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["mismatch"] is True and [m["field"] for m in saved["mismatches"]] == ["size", "mode"]


def test_other_test_images_get_no_paired_test_and_a_mismatch_within_a_group_counts(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "a", A)
    b = write_run(tmp_path / "b", B, seed=1, labels_seed=5)  # other labels: not the same test images
    out = run_main(monkeypatch, capsys, "--a", a, "--b", b)
    assert "no paired test on the test images: " in out and "other test labels (y_true)" in out
    # the runs pooled into one group must agree too
    c = write_run(tmp_path / "c", B, seed=2, label_fraction=0.1)
    with pytest.raises(UserError, match=r"runs differ in label_fraction: .*a/metrics.json has 1.0, .*c/metrics.json "
                                        r"has 0.1"):
        run_main(monkeypatch, capsys, "--a", a, "--b", b, c)


def test_a_multi_class_pair_gets_the_paired_bootstrap(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    for name, signal in (("a", 0.5), ("b", 2.0)):
        os.makedirs(tmp_path / name)
        scores = softmax(rng.normal(size=(2, 90, 3)) + signal * np.eye(3)[y], axis=-1)  # 2 seeds
        with open(tmp_path / name / "metrics.json", "w") as f:
            json.dump({"data": "dermamnist", "task": "multi-class", "mode": "finetune", "encoder": name,
                       "per_seed": [{"seed": i, "test": {"auc": metrics.auc(y, s, "multi-class")}}
                                    for i, s in enumerate(scores)]}, f)
        np.savez(tmp_path / name / "predictions.npz", y_true=y[:, None], y_score_per_seed=scores)
    out = run_main(monkeypatch, capsys, "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--metrics", "auc",
                   "--json", str(tmp_path / "c.json"))
    assert "paired on the same 90 test images, a paired bootstrap of the images (1000 resamples)" in out
    saved = json.loads((tmp_path / "c.json").read_text())["paired"]
    assert saved["ci_low"] < saved["diff"] < saved["ci_high"] and saved["n_scores_a"] == 2
    assert "cannot reach p < 0.05" in out  # 2 seeds a side


def test_an_unwritable_json_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "a", A)
    (tmp_path / "file").write_text("x")
    for target, message in ((tmp_path / "missing" / "c.json", "does not exist"),
                            (tmp_path / "file" / "c.json", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(UserError, match=message):
            run_main(monkeypatch, capsys, "--a", a, "--b", a, "--json", str(target))
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(UserError, match="not writable"):
            run_main(monkeypatch, capsys, "--a", a, "--b", a, "--json", str(tmp_path / "locked" / "c.json"))
    assert capsys.readouterr().out == ""
