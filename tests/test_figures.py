"""Tests for common/figures.py and the figures evaluate.py and scripts/report.py write: the mean ROC
over seeds, its legend and operating point against metrics.json, PDF + 300 dpi PNG files, titles
without paths, one colour per series, the report without a spec, and file names in predictions.npz."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from common import figures, metrics, results
from scripts import report

BIN, MC = metrics.BINARY, metrics.MULTI_CLASS


def seeds_of(n_seeds, n=90, strength=1.0, seed=0):
    """Binary test labels and one (N, 2) score array per seed, better than chance by `strength`."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    scores = []
    for _ in range(n_seeds):
        p1 = 1 / (1 + np.exp(-(strength * (2 * y - 1) + rng.normal(0, 1, n))))
        scores.append(np.stack([1 - p1, p1], axis=1))
    return y, scores


def by_hand(y, s, grid):
    """sklearn's ROC interpolated linearly at each FPR of `grid`, the top of a vertical rise on one."""
    fpr, tpr, _ = roc_curve(y, s)
    out = []
    for g in grid:
        if np.any(fpr == g):
            out.append(tpr[fpr == g].max())
        else:
            i = np.flatnonzero(fpr < g)[-1]
            out.append(tpr[i] + (tpr[i + 1] - tpr[i]) * (g - fpr[i]) / (fpr[i + 1] - fpr[i]))
    return np.array(out)


def test_mean_roc_is_sklearns_curves_interpolated_and_averaged():
    y, scores = seeds_of(3)
    mean, std, tprs = figures.mean_roc(y, [s[:, 1] for s in scores])
    hand = np.array([by_hand(y, s[:, 1], figures.FPR_GRID) for s in scores])
    np.testing.assert_allclose(tprs, hand)
    np.testing.assert_allclose(mean, hand.mean(axis=0))
    np.testing.assert_allclose(std, hand.std(axis=0, ddof=1))
    assert mean[-1] == 1.0 and np.all(np.diff(mean) >= 0)
    # the area under the mean curve is close to the mean of the seeds' AUCs
    aucs = [metrics.auc(y, s, BIN) for s in scores]
    assert np.trapezoid(mean, figures.FPR_GRID) == pytest.approx(np.mean(aucs), abs=0.01)


def written_run(tmp_path, monkeypatch, n_seeds=3, header=None):
    """write_results on `n_seeds` seeds with validation thresholds; returns (metrics.json, plot_roc's
    result and keywords, the data)."""
    y, scores = seeds_of(n_seeds)
    yv, val = seeds_of(n_seeds, n=60, seed=1)
    per_seed = [{"seed": i, "test": metrics.evaluation_metrics(y, s, BIN, 0, yv, v)}
                for i, (s, v) in enumerate(zip(scores, val))]
    seen = {}
    real = figures.plot_roc

    def recording(*args, **kwargs):
        seen["result"], seen["kwargs"] = real(*args, **kwargs), kwargs
        return seen["result"]
    monkeypatch.setattr(figures, "plot_roc", recording)
    monkeypatch.setattr(metrics, "bootstrap_auc_ci", lambda *a, **k: (0.5, 0.9))  # 1000 resamples, not tested here
    results.write_results(str(tmp_path), header or {"data": "breastmnist", "size": 28, "mode": "linear_probe",
                                                    "encoder": "random", "args": {"label_fraction": 0.1}},
                          per_seed, y[:, None], scores, BIN, 0, "t", class_names=["malignant", "benign"],
                          positive_class=0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    return saved, seen, (y, scores, yv, val)


def test_roc_legend_is_metrics_json_auc_and_the_point_is_the_reported_threshold(tmp_path, monkeypatch):
    saved, seen, (y, scores, yv, val) = written_run(tmp_path, monkeypatch)
    mean, std = saved["mean"]["auc"], saved["std"]["auc"]
    assert seen["result"]["legend"][0] == f"malignant (positive class): AUC {mean:.3f} ± {std:.3f}"
    assert seen["result"]["auc"] == pytest.approx((mean, std))
    assert "± 1 SD of the TPR over 3 seeds" in seen["result"]["legend"]
    # the operating point: each seed's Youden threshold on its validation scores, malignant (class 0) positive
    at = [metrics.threshold_metrics(y, s, metrics.youden_threshold(yv, v), positive_class=0)
          for s, v in zip(scores, val)]
    point = seen["kwargs"]["operating_point"]
    assert point["tpr"] == pytest.approx(np.mean([a["sensitivity"] for a in at]))
    assert point["fpr"] == pytest.approx(1 - np.mean([a["specificity"] for a in at]))
    assert point["tpr"] == pytest.approx(saved["mean"]["sensitivity_at_threshold"])
    assert f"sensitivity {point['tpr']:.3f}" in seen["result"]["legend"][-1]
    # the plotted curve is the positive class's: malignant is class 0, scored by 1 - P(class 1)
    curve = np.mean([by_hand(y == 0, s[:, 0], figures.FPR_GRID) for s in scores], axis=0)
    np.testing.assert_allclose(seen["result"]["curves"]["malignant (positive class)"][1], curve)


def test_every_figure_is_a_pdf_and_a_300_dpi_png_titled_without_a_path(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "byol-s0"
    header = {"data": str(tmp_path / "my_xrays"), "size": 28, "mode": "finetune", "args": {"label_fraction": 1.0},
              "encoder": str(run_dir / "checkpoint.pt"), "pretraining": {"method": "byol"}}
    out = tmp_path / "eval"
    out.mkdir()
    written_run(out, monkeypatch, header=header)
    for stem in ("roc", "confusion", "reliability"):
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        with Image.open(out / f"{stem}.png") as png:
            assert png.info["dpi"] == pytest.approx((300, 300), abs=0.01)
            title = png.info["Title"]
        assert str(tmp_path) not in title and "/" not in title.replace("w/o", "")
        assert "my_xrays 28 px" in title and "BYOL encoder" in title and "3 seeds" in title, title
    with Image.open(out / "confusion.png") as png:
        assert "summed over 3 seeds" in png.info["Title"]
    assert figures.run_title({"encoder": str(run_dir / "checkpoint.pt")}) == "encoder of byol-s0"


def test_a_series_keeps_its_colour_across_figures_and_methods_their_own(tmp_path, monkeypatch):
    one, other = figures.colours(["BYOL", "random init", "zeta", "alpha"]), figures.colours(["alpha", "BYOL"])
    assert one["BYOL"] == other["BYOL"] == figures.PALETTE[figures.METHOD_COLOURS["byol"]]
    assert one["random init"] == figures.PALETTE[figures.METHOD_COLOURS["random"]]
    assert len(set(one.values())) == 4
    # two names of one method: the shortest keeps the method's colour, the other takes a free one
    two = figures.colours(["random init (ViT-Tiny)", "BYOL+", "random init", "BYOL", "MAE (ViT-Tiny)"])
    assert two["random init"] == figures.PALETTE[figures.METHOD_COLOURS["random"]]
    assert two["BYOL"] == figures.PALETTE[figures.METHOD_COLOURS["byol"]]
    assert two["MAE (ViT-Tiny)"] == figures.PALETTE[figures.METHOD_COLOURS["mae"]]
    assert len(set(two.values())) == 5
    assert len(set(figures.colours([f"series {i}" for i in range(20)]).values())) == 20
    # a report: every figure draws a row label in the same colour
    drawn = []
    real = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, path, title=None: (drawn.append(
        {line.get_label().split(":")[0].split(" (")[0]: line.get_color() for line in fig.axes[0].get_lines()}),
        real(fig, path, title))[1])
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        y, scores = seeds_of(2, seed=ord(name))
        np.savez(folder / "predictions.npz", y_true=y[:, None], y_score=scores[0], y_score_per_seed=np.stack(scores))
        (folder / "metrics.json").write_text(json.dumps({"task": BIN, "per_seed": [{"seed": 0, "test": {}}]}))
        (folder / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1 / (e + 1)}) + "\n" for e in range(3)))
    rows = [{"label": "zeta run", "runs": str(tmp_path / "a")}, {"label": "alpha run", "runs": str(tmp_path / "b")}]
    spec = {"figures": [{"kind": "roc", "title": "ROC", "rows": rows},
                        {"kind": "loss", "title": "loss", "rows": rows[1:]}]}
    report.build_report(spec, str(tmp_path / "out"))
    assert drawn[0]["alpha run"] == drawn[1]["alpha run"] != drawn[0]["zeta run"]
    assert (tmp_path / "out" / "roc.pdf").read_bytes()[:4] == b"%PDF"


def evaluation_dir(folder, encoder, aucs_seed, strength, n_seeds):
    # (tests using it stub metrics.bootstrap_auc_ci: its 1000 resamples are not what is tested here)
    """An evaluation run folder written by results.write_results (the real format)."""
    folder.mkdir(parents=True)
    y, scores = seeds_of(n_seeds, strength=strength, seed=aucs_seed)
    per_seed = [{"seed": i, "test": metrics.evaluation_metrics(y, s, BIN)} for i, s in enumerate(scores)]
    header = {"data": "breastmnist", "size": 28, "mode": "linear_probe", "encoder": encoder,
              "args": {"label_fraction": 1.0, "probe": "logreg"}}
    return results.write_results(str(folder), header, per_seed, y[:, None], scores, BIN, 0, "t",
                                 class_names=["malignant", "benign"])


def test_a_report_without_a_spec_tables_every_run_and_says_what_holds(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "bootstrap_auc_ci", lambda *a, **k: (0.5, 0.9))
    weak = evaluation_dir(tmp_path / "runs" / "eval-random", "random", 3, 0.3, 4)
    strong = evaluation_dir(tmp_path / "runs" / "eval-byol", "byol.pth", 3, 2.0, 4)
    capsys.readouterr()
    text = open(report.auto_report([str(tmp_path / "runs")], str(tmp_path / "out"))).read()
    for name, run in (("eval-random", weak), ("eval-byol", strong)):
        [row] = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        auc = f"{run['mean']['auc']:.3f} ± {run['std']['auc']:.3f} (n=4)"
        acc = f"{run['mean']['acc']:.3f} ± {run['std']['acc']:.3f} (n=4)"
        assert row.endswith(f"| 4 | {auc} | {acc} |") and "breastmnist 28 px" in row and "linear probe" in row, row
    c = metrics.compare_samples([s["test"]["auc"] for s in weak["per_seed"]],
                                [s["test"]["auc"] for s in strong["per_seed"]])
    assert c["welch_p"] < 0.05  # the data make the difference hold
    assert (f"- eval-byol has a higher test AUC than eval-random: {c['mean_b']:.3f} vs {c['mean_a']:.3f}"
            in text), text
    assert "| eval-byol vs eval-random | AUC |" in text and "DeLong" in text
    for png in ("roc_eval_random.png", "roc_eval_byol.png"):
        assert f"]({png})" in text and (tmp_path / "out" / png).is_file()
    # the command line: run folders or a spec, one of the two
    import sys
    from common.errors import UserError
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path / "runs" / "eval-*"), "--out", str(tmp_path / "o2")])
    report.main()
    assert (tmp_path / "o2" / "report.md").read_text() == text
    monkeypatch.setattr(sys, "argv", ["report.py", "--out", str(tmp_path / "o3")])
    with pytest.raises(UserError, match="give run folders .* or --spec"):
        report.main()


def test_predictions_name_the_image_files_of_a_folder_dataset(tmp_path, monkeypatch):
    import sys
    import evaluate
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDSSL_NO_DOWNLOAD", "1")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--data", str(tmp_path / "data"), "--mode", "knn",
                                      "--out", str(tmp_path / "ev")])
    evaluate.main()
    with np.load(tmp_path / "ev" / "predictions.npz") as p:
        names, y, index = list(p["file_names"]), p["y_true"].ravel(), p["index"]
    assert len(names) == len(y) == len(index) and list(index) == list(range(len(y)))
    # each row traces to its image: the file exists, and its class folder is the row's label
    for name, label in zip(names, y):
        assert (tmp_path / "data" / name).is_file()
        assert name.split(os.sep)[0] == ("benign", "malignant")[label]
    assert "file_names" not in json.loads((tmp_path / "ev" / "metrics.json").read_text())
