"""Tests for scripts/report.py on metrics.json / predictions.npz / log.jsonl files built in tmp_path."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import yaml
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from common import figures, metrics
from common.errors import UserError
from scripts import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
A_AUC, B_AUC = [0.70, 0.72, 0.69], [0.75, 0.74, 0.78, 0.80, 0.77, 0.76]


def write_run(folder, aucs, label_fraction=1.0, task="binary-class", seed=0, labels_seed=None, **changes):
    """A run directory as evaluate.py leaves it: metrics.json (acc = auc - 0.1; `changes` replace its
    fields) and predictions.npz (test labels drawn from `labels_seed` when given, else from `seed`)."""
    os.makedirs(folder, exist_ok=True)
    per_seed = [{"seed": i, "test": {"auc": a, "acc": a - 0.1}, "val_auc": 0.9, "best_epoch": 3}
                for i, a in enumerate(aucs)]
    run = {"data": "breastmnist", "size": 28, "mode": "finetune", "encoder": "random", "task": task, "n": len(aucs),
           "per_seed": per_seed, "args": {"arch": "resnet18", "label_fraction": label_fraction, "epochs": 5,
                                          "device": "cpu"}}
    run.update(changes)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(run, f)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    if labels_seed is not None:
        y = np.random.default_rng(labels_seed).integers(0, 2, 60)
    p1 = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    np.savez(os.path.join(folder, "predictions.npz"), y_true=y[:, None], y_score=np.stack([1 - p1, p1], axis=1))
    return folder


def table_spec(tmp_path, **extra_rows):
    write_run(tmp_path / "a", A_AUC)
    write_run(tmp_path / "b-s0", B_AUC[:3], seed=1)
    write_run(tmp_path / "b-s1", B_AUC[3:], seed=2)
    rows = [{"label": "A", "runs": str(tmp_path / "a"), "published": {"auc": 0.82}},
            {"label": "B", "runs": str(tmp_path / "b-s*")}, *extra_rows.values()]
    return {"title": "Paper X", "tables": [{"title": "T", "metrics": ["auc", "acc"], "source": "REFERENCE.md",
                                            "rows": rows, "compare": [["A", "B"]]}]}


def line_of(text, start):
    found = [line for line in text.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, text)
    return found[0]


def test_table_cells_are_mean_sample_std_and_n_and_p_values_are_scipys(tmp_path):
    out = tmp_path / "out"
    text = open(report.build_report(table_spec(tmp_path), str(out))).read()
    a_acc = np.array(A_AUC) - 0.1
    # ddof=1 as common.metrics.mean_std; ddof=0 would print 0.012 for A's AUC instead of 0.015
    assert line_of(text, "| A |") == (f"| A | {np.mean(A_AUC):.3f} ± {np.std(A_AUC, ddof=1):.3f} (n=3) | "
                                      f"0.82 (quoted) | {a_acc.mean():.3f} ± {a_acc.std(ddof=1):.3f} (n=3) |")
    assert f"| B | {np.mean(B_AUC):.3f} ± {np.std(B_AUC, ddof=1):.3f} (n=6) | – |" in text  # two runs pooled
    welch = stats.ttest_ind(A_AUC, B_AUC, equal_var=False).pvalue
    mwu = stats.mannwhitneyu(A_AUC, B_AUC, alternative="two-sided").pvalue
    diff = np.mean(B_AUC) - np.mean(A_AUC)
    ci = stats.ttest_ind(B_AUC, A_AUC, equal_var=False).confidence_interval(0.95)
    assert line_of(text, "| B vs A | AUC |").endswith(f"| {diff:+.3f} | [{ci.low:+.3f}, {ci.high:+.3f}] | "
                                                      f"{welch:.3f} | {mwu:.3f} |")
    assert "quoted from REFERENCE.md" in text


def test_missing_rows_say_not_run_with_the_best_reason_known(tmp_path):
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "not_run.txt").write_text("error: cannot download ImageNet weights\n")
    write_run(tmp_path / "part-s0", A_AUC)
    (tmp_path / "part-s1").mkdir()  # a seed that died before writing metrics.json
    spec = table_spec(tmp_path,
                      gpu={"label": "C", "runs": str(tmp_path / "c-*"), "not_run": "needs a GPU",
                           "published": {"auc": 0.9}},
                      failed={"label": "D", "runs": str(tmp_path / "failed"), "not_run": "overridden by not_run.txt"},
                      nowhere={"label": "E", "runs": str(tmp_path / "e-*")},
                      part={"label": "F", "runs": str(tmp_path / "part-*")})
    spec["tables"][0]["compare"].append(["A", "C"])
    text = open(report.build_report(spec, str(tmp_path / "out"))).read()
    assert line_of(text, "| C |") == "| C | not run: needs a GPU | 0.9 (quoted) | – |"
    assert line_of(text, "| D |").startswith("| D | not run: error: cannot download ImageNet weights | – |")
    assert line_of(text, "| E |").startswith(f"| E | not run: no metrics.json under {tmp_path / 'e-*'} |")
    assert line_of(text, "| F |").startswith(f"| F | {np.mean(A_AUC):.3f}")
    assert f"- F: partly run: 1 matched run directories have no metrics.json: {tmp_path / 'part-s1'}" in text
    assert "not run: C" in line_of(text, "| C vs A |")


def test_csv_has_one_line_per_run_and_seed_with_metrics_and_flags(tmp_path):
    report.build_report(table_spec(tmp_path), str(tmp_path / "out"))
    with open(tmp_path / "out" / "runs.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 9
    assert [float(r["auc"]) for r in lines] == A_AUC + B_AUC
    assert [int(r["seed"]) for r in lines] == [0, 1, 2] * 3
    first = lines[0]
    assert first["run"] == str(tmp_path / "a") and first["used_in"] == "T / A" and first["data"] == "breastmnist"
    assert first["label_fraction"] == "1.0" and first["best_epoch"] == "3" and "device" not in first


def test_unknown_comparison_and_malformed_spec_are_one_line_errors(tmp_path):
    spec = table_spec(tmp_path)
    spec["tables"][0]["compare"] = [["A", "Z"]]
    with pytest.raises(UserError, match="'Z', which is not one of its rows"):
        report.build_report(spec, str(tmp_path / "out"))
    with pytest.raises(UserError, match="needs a `label`"):
        report.build_report({"tables": [{"title": "T", "rows": [{"runs": "x"}]}]}, str(tmp_path / "out"))
    with pytest.raises(UserError, match="kind must be one of"):
        report.build_report({"figures": [{"title": "F", "kind": "pie", "rows": []}]}, str(tmp_path / "out"))
    for name, index in (("s1", [0, 1]), ("s2", [5, 6])):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "saliency.npz", images=np.zeros((2, 8, 8)), index=index, gradcam=np.zeros((2, 8, 8)))
    rows = [{"label": name, "runs": str(tmp_path / name)} for name in ("s1", "s2")]
    with pytest.raises(UserError, match="other test images"):
        report.build_report({"figures": [{"title": "F", "kind": "saliency", "rows": rows}]}, str(tmp_path / "out"))


def test_seed_roc_binary_is_sklearns_curve_and_multiclass_area_is_the_macro_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    score = np.stack([1 - rng.random(100), rng.random(100) + 0.3 * y], axis=1)
    fpr, tpr, _ = roc_curve(y, score[:, 1])
    tpr_grid = report.seed_roc(y[:, None], score, metrics.BINARY)
    inside = ~np.isin(figures.FPR_GRID, fpr)  # off sklearn's points: its curve linearly interpolated
    np.testing.assert_allclose(tpr_grid[inside], np.interp(figures.FPR_GRID[inside], fpr, tpr))
    # class 0 positive: the curve of 1 - P(class 1) for y == 0, the same area
    zero = report.seed_roc(y[:, None], score, metrics.BINARY, positive_class=0)
    assert np.trapezoid(zero, figures.FPR_GRID) == pytest.approx(roc_auc_score(y, score[:, 1]), abs=0.01)
    y3 = rng.integers(0, 3, 300)
    score3 = rng.random((300, 3)) + 0.5 * np.eye(3)[y3]
    tpr3 = report.seed_roc(y3, score3, metrics.MULTI_CLASS)
    assert np.trapezoid(tpr3, figures.FPR_GRID) == pytest.approx(metrics.auc(y3, score3, metrics.MULTI_CLASS),
                                                                 abs=0.005)


def test_loss_series_splits_seeds_and_skips_head_only_epochs(tmp_path):
    records = [{"seed": 0, "epoch": 0, "loss": 1.0}, {"seed": 1, "epoch": 0, "loss": 2.0}, {"phase": "head", "seed": 0,
               "epoch": 0, "loss": 9.0}, {"seed": 0, "epoch": 1, "loss": 0.5}, {"seed": 0, "epoch": 1, "loss": 0.4}]
    (tmp_path / "log.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n")
    # the second epoch-1 line is a resumed run re-logging that epoch: the later value wins
    assert report.loss_series(str(tmp_path / "log.jsonl")) == [{0: 1.0, 1: 0.4}, {0: 2.0}]


def test_a_loss_figure_draws_any_logged_key_from_the_epochs_that_have_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": 0, "loss": 3.0}, {"epoch": 1, "loss": 2.0, "knn_val_auc": 0.7},
               {"epoch": 2, "loss": 1.0}, {"epoch": 3, "loss": 0.5, "knn_val_auc": 0.8}]
    (run / "log.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    assert report.loss_series(str(run / "log.jsonl"), "knn_val_auc") == [{1: 0.7, 3: 0.8}]
    spec = {"figures": [{"kind": "loss", "title": "kNN monitor", "key": "knn_val_auc",
                         "rows": [{"label": "BYOL", "runs": str(run)}]}]}
    report.build_report(spec, str(tmp_path / "out"))
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "out" / "knn_monitor.png").shape[0] > 100


def test_every_figure_kind_is_drawn_and_a_missing_row_is_named(tmp_path, monkeypatch):
    for fraction, aucs in ((0.1, [0.6, 0.64]), (0.5, [0.7, 0.74]), (1.0, [0.8, 0.8])):
        write_run(tmp_path / f"lf{fraction}", aucs, label_fraction=fraction)
    for name, seed in (("pre", 0), ("rand", 1)):
        folder = write_run(tmp_path / name, [0.8], seed=seed)
        with open(folder / "log.jsonl", "w") as f:  # two seeds: loss (seed + 1) / (epoch + 1)
            f.writelines(json.dumps({"seed": s, "epoch": e, "loss": (s + 1) / (e + 1)}) + "\n"
                         for e in range(4) for s in (0, 1))
        lr_range = {"lrs": [1e-5, 1e-4, 1e-3], "losses": [1, 0.7, 2], "chosen": 1e-4}
        (folder / "lr_range.json").write_text(json.dumps(lr_range))
        np.savez(folder / "saliency.npz", images=np.zeros((2, 28, 28), np.uint8), index=np.array([3, 7]),
                 gradcam=np.random.rand(2, 28, 28), occlusion=np.random.rand(2, 28, 28))
    rows = [{"label": "pretrained", "runs": str(tmp_path / "pre")}, {"label": "random", "runs": str(tmp_path / "rand")},
            {"label": "ImageNet", "runs": str(tmp_path / "imagenet"), "not_run": "offline: no ImageNet weights"}]
    figures = [{"kind": kind, "title": f"{kind} figure", "rows": rows}
               for kind in ("roc", "confusion", "loss", "lr_range", "saliency")]
    figures.append({"kind": "curve", "title": "label efficiency", "x": "label_fraction", "log_x": True,
                    "rows": [{"label": "pretrained", "runs": str(tmp_path / "lf*")}]})
    drawn, band = [], report.band

    def recording_band(ax, xs, groups, label, colour=None):  # what the curve and loss figures plot
        drawn.append((list(xs), groups))
        band(ax, xs, groups, label, colour)
    monkeypatch.setattr(report, "band", recording_band)

    text = open(report.build_report({"title": "Figures", "figures": figures}, str(tmp_path / "out"))).read()
    pngs = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".png"))
    assert pngs == ["confusion_figure_0.png", "confusion_figure_1.png", "label_efficiency.png", "loss_figure.png",
                    "lr_range_figure_0.png", "lr_range_figure_1.png", "roc_figure.png", "saliency_figure.png"]
    for png in pngs:
        assert open(tmp_path / "out" / png, "rb").read(8) == PNG_MAGIC and f"({png})" in text
    assert text.count("- ImageNet: not run: offline: no ImageNet weights") == 5
    # the label-efficiency curve groups the pooled seeds by each run's --label-fraction
    assert ([0.1, 0.5, 1.0], [[0.6, 0.64], [0.7, 0.74], [0.8, 0.8]]) in drawn
    # both seeds' losses, epochs counted from 1
    assert ([1, 2, 3, 4], [[1.0, 2.0], [0.5, 1.0], [1 / 3, 2 / 3], [0.25, 0.5]]) in drawn


def test_cli_reads_a_yaml_spec(tmp_path, monkeypatch, capsys):
    # main() in-process: a subprocess would spend seconds re-importing torch for the same code path
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(table_spec(tmp_path)))
    monkeypatch.setattr(sys, "argv", ["report.py", "--spec", str(spec), "--out", str(tmp_path / "out")])
    report.main()
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / "runs.csv").is_file()
    assert "| B vs A | AUC |" in (tmp_path / "out" / "report.md").read_text()
    monkeypatch.setattr(sys, "argv", ["report.py", "--spec", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="cannot read the spec"):
        report.main()


def test_a_single_value_is_shown_without_a_spread():
    assert report.cell([0.91234]) == "0.912 (n=1)"
    assert report.cell([0.9, 0.8]) == f"0.850 ± {np.std([0.9, 0.8], ddof=1):.3f} (n=2)"
    assert report.cell([]) == "–"


def test_torn_files_and_an_out_that_is_a_file_are_one_line_errors(tmp_path, monkeypatch):
    spec = table_spec(tmp_path)
    (tmp_path / "a" / "metrics.json").write_text('{"data": "breastmnist", "per_se')  # killed mid-write
    with pytest.raises(UserError, match=r"a/metrics.json is not valid JSON"):
        report.build_report(spec, str(tmp_path / "out"))
    write_run(tmp_path / "a", A_AUC)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="--out .*taken is a file"):
        report.build_report(spec, str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "a file"
    # the CLI: exit 2, one line, no traceback
    from conftest import run_cli
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    r = run_cli("scripts/report.py", "--spec", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "taken"))
    assert r.returncode == 2 and r.stderr.startswith("error: --out") and r.stderr.count("\n") == 1, r.stderr


def test_a_torn_last_log_line_is_left_out_and_a_damaged_log_refused(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"epoch": 0, "loss": 2.0}) + "\n" + json.dumps({"epoch": 1, "loss": 1.5}) + "\n"
                   + '{"epoch": 2, "lo')
    assert report.loss_series(str(log)) == [{0: 2.0, 1: 1.5}]
    assert "incomplete" in capsys.readouterr().err
    log.write_text('{"epoch": 0, "lo\n' + json.dumps({"epoch": 1, "loss": 1.5}) + "\n")
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        report.loss_series(str(log))


def test_loss_figure_uses_a_log_axis_when_losses_differ_by_orders_of_magnitude(tmp_path, monkeypatch):
    import matplotlib.axes
    scales = []
    real = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", lambda ax, v, **kw: (scales.append(v), real(ax, v, **kw)))
    for name, loss in (("byol", 2.0), ("barlow", 560.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": loss / (e + 1)}) + "\n"
                                                           for e in range(3)))
    rows = [{"label": n, "runs": str(tmp_path / n)} for n in ("byol", "barlow")]
    report.build_report({"figures": [{"kind": "loss", "title": "losses", "rows": rows}]}, str(tmp_path / "o"))
    assert scales == ["log"]
    scales.clear()
    report.build_report({"figures": [{"kind": "loss", "title": "losses", "rows": rows[:1]}]}, str(tmp_path / "o"))
    assert scales == []


def test_saliency_grids_name_the_classes_from_the_runs_metrics(tmp_path, monkeypatch):
    folder = write_run(tmp_path / "pre", [0.8])
    run = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**run, "class_names": ["normal", "pneumonia"]}))
    np.savez(folder / "saliency.npz", images=np.zeros((2, 8, 8), np.uint8), index=np.array([3, 7]),
             gradcam=np.random.rand(2, 8, 8), class_idx=np.array([1, 0]), predicted=np.array([1, 1]))
    seen = {}
    monkeypatch.setattr(report.saliency, "plot_overlay_grid",
                        lambda images, maps, path, **kw: seen.update(kw))
    spec = {"figures": [{"kind": "saliency", "title": "G", "rows": [{"label": "pre", "runs": str(folder)}]}]}
    report.build_report(spec, str(tmp_path / "out"))
    assert seen["row_labels"] == ["pneumonia", "normal"]
    assert seen["predicted"] == {"pre": ["pneumonia", "pneumonia"]}
    spec["figures"][0]["class_names"] = ["no", "yes"]  # the spec's names win
    report.build_report(spec, str(tmp_path / "out"))
    assert seen["row_labels"] == ["yes", "no"]


def test_comparisons_of_runs_of_another_protocol_need_the_tables_allow_mismatch(tmp_path):
    write_run(tmp_path / "a", A_AUC)
    write_run(tmp_path / "b", B_AUC[:3], seed=1, size=64, mode="linear_probe")
    table = {"title": "T", "metrics": ["auc"], "compare": [["A", "B"]],
             "rows": [{"label": "A", "runs": str(tmp_path / "a")}, {"label": "B", "runs": str(tmp_path / "b")}]}
    text = open(report.build_report({"tables": [table]}, str(tmp_path / "out"))).read()
    assert "not compared: the runs differ in size" in line_of(text, "| B vs A |")
    assert ("- B vs A: not compared: the runs differ in size (28 vs 64); mode (finetune vs linear_probe); list the "
            "field in the table's allow_mismatch to compare them anyway.") in text
    table["allow_mismatch"] = ["size", "mode"]
    text = open(report.build_report({"tables": [table]}, str(tmp_path / "out"))).read()
    assert line_of(text, "| B vs A | AUC |").startswith(f"| B vs A | AUC | {np.mean(A_AUC):.3f}")
    assert "- B vs A: the runs differ in size (28 vs 64); mode (finetune vs linear_probe); compared as the " \
           "table's allow_mismatch permits." in text
    # 3 values a side: the exact Mann-Whitney test cannot reach p < 0.05, and the report says so
    assert "- B vs A: with 3 and 3 values the exact Mann-Whitney test cannot go below p = 0.100" in text
    table["allow_mismatch"] = ["colour"]
    with pytest.raises(UserError, match="allow_mismatch must be true or a list of"):
        report.build_report({"tables": [table]}, str(tmp_path / "out"))


def test_rows_scored_on_the_same_test_images_get_the_paired_test(tmp_path):
    spec = table_spec(tmp_path)
    text = open(report.build_report(spec, str(tmp_path / "out"))).read()
    assert "Paired on the same test images" not in text  # table_spec's rows have other test labels
    write_run(tmp_path / "a", A_AUC, seed=3, labels_seed=9)
    for i, name in enumerate(("b-s0", "b-s1")):
        write_run(tmp_path / name, B_AUC[3 * i:3 * i + 3], seed=4 + i, labels_seed=9)
    text = open(report.build_report(spec, str(tmp_path / "out"))).read()
    first = {name: np.load(tmp_path / name / "predictions.npz") for name in ("a", "b-s0", "b-s1")}
    # one score per run here (no y_score_per_seed): B's two runs are averaged
    ref = metrics.delong_test(first["a"]["y_true"], first["a"]["y_score"],
                              (first["b-s0"]["y_score"] + first["b-s1"]["y_score"]) / 2)
    assert line_of(text, "| B vs A | 60 |") == (f"| B vs A | 60 | {ref['auc_a']:.3f} | {ref['auc_b']:.3f} | "
                                                f"{ref['diff']:+.3f} | [{ref['ci_low']:+.3f}, {ref['ci_high']:+.3f}] | "
                                                f"{report.p_text(ref['p'])} | DeLong |")


def test_paired_rows_pair_runs_by_encoder_and_seeds_and_take_the_paired_t_test(tmp_path):
    """Three encoders far apart, each fine-tuned two ways: Welch's test over the two rows drowns the
    small, consistent difference in the spread between encoders; the paired test over the same
    encoders finds it. A run without a partner is left out and said; a short row is said."""
    ft = {"e0": 0.70, "e1": 0.80, "e2": 0.90}
    gain = {"e0": 0.010, "e1": 0.012, "e2": 0.011}
    args = {"arch": "resnet18", "label_fraction": 0.1, "epochs": 5, "device": "cpu"}
    for e, auc in ft.items():
        write_run(tmp_path / f"ft-{e}", [auc - 0.01, auc + 0.01], args={**args, "ckpt": f"runs/{e}/checkpoint.pt"})
        write_run(tmp_path / f"lpft-{e}", [auc + gain[e] - 0.01, auc + gain[e] + 0.01],
                  args={**args, "ckpt": f"runs/{e}/checkpoint.pt"})
    write_run(tmp_path / "lpft-e3", [0.5, 0.5], args={**args, "ckpt": "runs/e3/checkpoint.pt"})
    spec = {"title": "X", "tables": [{
        "title": "T", "metrics": ["auc"], "unit": "run", "runs_expected": 4,
        "rows": [{"label": "fine-tune", "runs": str(tmp_path / "ft-*")}, {"label": "LP-FT", "runs": str(tmp_path / "lpft-*")}],
        "compare": [["fine-tune", "LP-FT"]], "compare_paired": [["fine-tune", "LP-FT"]]}]}
    text = open(report.build_report(spec, str(tmp_path / "out"))).read()
    diffs = list(gain.values())
    expected = stats.ttest_rel([ft[e] + gain[e] for e in ft], list(ft.values()))
    paired = line_of(text, "| LP-FT vs fine-tune | AUC | 3 |")
    assert f"| {np.mean(diffs):+.3f} |" in paired and "| 3 of 3 |" in paired
    assert f"| {expected.pvalue:.3f} |" in paired and expected.pvalue < 0.05
    welch = line_of(text, "| LP-FT vs fine-tune | AUC | 0.800")
    assert float(welch.split("|")[7]) > 0.05  # the same runs unpaired (with e3's): no difference holds
    assert "LP-FT vs fine-tune: 1 run without a partner left out" in text
    assert "- fine-tune: 3 of the 4 runs expected" in text and "- LP-FT: 3 of" not in text


def test_compare_pairs_is_scipys_paired_t_test():
    a, b = [0.70, 0.80, 0.90, 0.85], [0.72, 0.81, 0.93, 0.84]
    c = metrics.compare_pairs(a, b)
    t = stats.ttest_rel(b, a)
    assert c["n"] == 4 and c["b_higher"] == 3 and c["diff"] == pytest.approx(np.mean(np.subtract(b, a)))
    assert c["p"] == pytest.approx(t.pvalue) and c["t"] == pytest.approx(t.statistic)
    assert c["ci95_low"] < c["diff"] < c["ci95_high"]
    assert metrics.compare_pairs([0.7], [0.8])["p"] is None  # one pair: no test
    with pytest.raises(ValueError):
        metrics.compare_pairs([0.7, 0.8], [0.8])


def test_same_training_refuses_comparisons_of_runs_trained_otherwise_and_names_a_mixed_row(tmp_path):
    """Fine-tuning with 40 epochs against 10 is not a comparison of encoders: a table with
    same_training refuses it unless allow_mismatch names the field; a row whose own runs trained
    differently says so under the table, with or without same_training."""
    args = {"arch": "resnet18", "label_fraction": 0.1, "device": "cpu", "lr": 1e-3}
    write_run(tmp_path / "a-s0", [0.80, 0.82], args={**args, "epochs": 40})
    write_run(tmp_path / "a-s1", [0.81, 0.83], args={**args, "epochs": 40})
    write_run(tmp_path / "b-s0", [0.85, 0.86], args={**args, "epochs": 10})
    write_run(tmp_path / "b-s1", [0.84, 0.87], args={**args, "epochs": 40})
    table = {"title": "T", "metrics": ["auc"], "unit": "run", "compare": [["A", "B"]],
             "rows": [{"label": "A", "runs": str(tmp_path / "a-s*")}, {"label": "B", "runs": str(tmp_path / "b-s*")}]}
    text = open(report.build_report({"tables": [table]}, str(tmp_path / "out"))).read()
    assert line_of(text, "| B vs A | AUC |")  # epochs are not part of the protocol by default ...
    assert "- B: its runs differ in" not in text
    table["same_training"] = True  # ... they are with same_training
    text = open(report.build_report({"tables": [table]}, str(tmp_path / "out"))).read()
    assert "not compared: the runs differ in epochs" in line_of(text, "| B vs A |")
    assert "- B: its runs differ in epochs (10 vs 40)" in text and "- A: its runs differ" not in text
    table["allow_mismatch"] = ["epochs"]
    text = open(report.build_report({"tables": [table]}, str(tmp_path / "out"))).read()
    assert line_of(text, "| B vs A | AUC |") and "compared as the table's allow_mismatch permits" in text
    # a logistic-regression probe trains by none of these fields: its default epochs are not compared
    probe = {"mode": "linear_probe", "args": {**args, "probe": "logreg", "epochs": 50}}
    assert metrics.protocol_mismatches({**probe}, {**probe, "args": {**probe["args"], "epochs": 7}},
                                       metrics.PROTOCOL_FIELDS + metrics.TRAINING_FIELDS) == []


def test_paired_runs_pair_by_the_checkpoints_content_where_provenance_records_it(tmp_path):
    """The same checkpoint evaluated from two paths (runs moved) still pairs; two checkpoints that
    share a path but not their content (a pretraining run replaced) do not."""
    args = {"arch": "resnet18", "label_fraction": 0.1, "epochs": 5, "device": "cpu"}

    def run(name, aucs, path, sha):
        write_run(tmp_path / name, aucs, args={**args, "ckpt": path})
        with open(tmp_path / name / "provenance.json", "w") as f:
            json.dump({"encoder": {"file": path, "sha256": sha}}, f)
    for i in range(3):
        run(f"ft-{i}", [0.80 + i / 20, 0.82 + i / 20], f"old/e{i}/checkpoint.pt", f"sha{i}")
        run(f"lpft-{i}", [0.81 + i / 20, 0.83 + i / 20], f"new/e{i}/checkpoint.pt", f"sha{i}")
    run("lpft-9", [0.5, 0.5], "old/e0/checkpoint.pt", "another")  # e0's path, another encoder
    spec = {"tables": [{"title": "T", "metrics": ["auc"], "unit": "run", "compare_paired": [["fine-tune", "LP-FT"]],
                        "rows": [{"label": "fine-tune", "runs": str(tmp_path / "ft-*")},
                                 {"label": "LP-FT", "runs": str(tmp_path / "lpft-*")}]}]}
    text = open(report.build_report(spec, str(tmp_path / "out"))).read()
    assert "| LP-FT vs fine-tune | AUC | 3 | +0.010 |" in text and "| 3 of 3 |" in text
    assert "LP-FT vs fine-tune: 1 run without a partner left out" in text


def test_the_report_counts_its_tests_and_a_mann_whitney_test_not_run_gets_no_floor_note(tmp_path):
    spec = table_spec(tmp_path)
    write_run(tmp_path / "c", [0.9], seed=5)  # one value: Welch and Mann-Whitney n/a
    spec["tables"][0]["rows"].append({"label": "C", "runs": str(tmp_path / "c")})
    spec["tables"][0]["compare"].append(["A", "C"])
    text = open(report.build_report(spec, str(tmp_path / "out"))).read()
    # B vs A on AUC and ACC; C vs A has no test (n/a), and no two rows share their test labels
    assert line_of(text, "| C vs A | AUC |").endswith("| n/a | n/a |")
    assert "the tables above make 2 tests" in text and "about 0.1 of them" in text
    assert "C vs A: with" not in text  # no Mann-Whitney floor for a test that was not run
