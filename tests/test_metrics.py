"""Tests for common/metrics.py against scikit-learn and medmnist's own evaluator."""
import os
import sys

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so plain `pytest` works as well as `python -m pytest`

from common import figures as F  # noqa: E402
from common import metrics as M  # noqa: E402
from common import results  # noqa: E402

BIN, MC, ML, ORD = M.BINARY, M.MULTI_CLASS, M.MULTI_LABEL, M.ORDINAL
ROOT = os.environ.get("MEDMNIST_ROOT", os.path.join(REPO, "..", "shared", "data", "medmnist"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def make(task, n=300, n_classes=4, n_labels=5, signal=1.0, seed=0):
    """Seeded labels and informative (but imperfect) probability scores for a task."""
    rng = np.random.default_rng(seed)
    if task == BIN:
        y = rng.integers(0, 2, n)
        logits = rng.normal(size=(n, 2))
        logits[np.arange(n), y] += signal
        return y, softmax(logits)
    if task in (MC, ORD):
        y = rng.integers(0, n_classes, n)
        logits = rng.normal(size=(n, n_classes))
        logits[np.arange(n), y] += signal
        return y, softmax(logits)
    y = rng.integers(0, 2, (n, n_labels))
    return y, sigmoid(rng.normal(size=(n, n_labels)) + signal * (2 * y - 1))


# --- agreement with scikit-learn -------------------------------------------------------

@pytest.mark.parametrize("task", [BIN, MC, ML])
def test_metrics_match_direct_sklearn(task):
    y, s = make(task)
    got = M.classification_metrics(y, s, task)
    if task == BIN:
        ref_auc = roc_auc_score(y, s[:, 1])
        pred = (s[:, 1] > 0.5).astype(int)
        ref_acc, avg = accuracy_score(y, pred), "binary"
    elif task == MC:
        # sklearn's own OvR macro (rows sum to 1), independent of our per-class loop.
        ref_auc = roc_auc_score(y, s, multi_class="ovr", average="macro")
        pred = s.argmax(1)
        ref_acc, avg = accuracy_score(y, pred), "macro"
    else:
        ref_auc = roc_auc_score(y, s, average="macro")
        pred = (s > 0.5).astype(int)
        ref_acc, avg = float(np.mean(y == pred)), "macro"  # per-label accuracy, averaged
    ref = {
        "auc": ref_auc,
        "acc": ref_acc,
        "precision": precision_score(y, pred, average=avg, zero_division=0),
        "recall": recall_score(y, pred, average=avg, zero_division=0),
        "f1": f1_score(y, pred, average=avg, zero_division=0),
        "weighted_f1": f1_score(y, pred, average="weighted", zero_division=0),
    }
    if task == BIN:
        ref["sensitivity"] = recall_score(y, pred, pos_label=1)
        ref["specificity"] = recall_score(y, pred, pos_label=0)
    assert set(got) == set(ref)
    for k in ref:
        assert isinstance(got[k], float)
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    assert M.auc(y, s, task) == got["auc"] and M.acc(y, s, task) == got["acc"]
    # Informative scores: far from chance, so a swapped column would be caught.
    assert got["auc"] > 0.65
    np.testing.assert_array_equal(M.hard_labels(s, task), pred)


def test_ordinal_scored_like_multiclass():
    y, s = make(ORD, n_classes=5)
    assert M.classification_metrics(y, s, ORD) == M.classification_metrics(y, s, MC)
    np.testing.assert_array_equal(M.confusion(y, s, ORD), M.confusion(y, s, MC))


def test_unknown_task_and_bad_shapes_raise():
    y, s = make(BIN)
    with pytest.raises(ValueError):
        M.auc(y, s, "regression")
    with pytest.raises(ValueError):
        M.auc(y, np.ones((len(y), 3)) / 3, BIN)  # 3 columns is not a binary score
    with pytest.raises(ValueError):
        M.auc(y[:-1], s, BIN)


# --- agreement with medmnist's definitions ----------------------------------------------

@pytest.mark.parametrize("task,shape", [
    (BIN, "N2"), (BIN, "N1"), (BIN, "N"), (MC, "N2"), (ORD, "N2"), (ML, "N2"),
])
def test_matches_medmnist_getAUC_getACC(task, shape):
    from medmnist.evaluator import getACC, getAUC

    y, s = make(task, seed=3)
    if task == BIN and shape != "N2":
        s = s[:, 1:] if shape == "N1" else s[:, 1]
    if task != ML:
        y = y[:, None]  # medmnist stores labels as (N, 1)
    for thr in (0.5, 0.3):
        assert abs(M.acc(y, s, task, threshold=thr) - getACC(y, s, task, threshold=thr)) <= 1e-12
    assert abs(M.auc(y, s, task) - getAUC(y, s, task)) <= 1e-12


@pytest.mark.parametrize("flag,n_test", [("pneumoniamnist", 624), ("breastmnist", 156)])
def test_matches_medmnist_evaluator_on_real_labels(flag, n_test):
    from medmnist import INFO, Evaluator

    path = os.path.join(ROOT, f"{flag}.npz")
    if not os.path.exists(path):
        msg = f"real MedMNIST file missing: {path}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    task = INFO[flag]["task"]
    labels = np.load(path)["test_labels"]  # read independently of the Evaluator
    assert labels.shape == (n_test, 1)
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(n_test, 2))
    logits[np.arange(n_test), labels[:, 0]] += 1.0
    scores = softmax(logits)

    ev = Evaluator(flag, "test", size=28, root=ROOT)
    ref_auc, ref_acc = ev.evaluate(scores)
    assert abs(M.auc(labels, scores, task) - ref_auc) <= 1e-12
    assert abs(M.acc(labels, scores, task) - ref_acc) <= 1e-12
    assert 0.5 < ref_auc < 1.0  # sanity: real labels, informative scores


# --- AUC semantics ---------------------------------------------------------------------

def test_auc_uses_scores_not_thresholded_labels():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.4])  # perfect ranking, but all below 0.5
    thresholded = roc_auc_score(y, M.hard_labels(p1, BIN))
    assert thresholded == 0.5
    assert M.auc(y, p1, BIN) == 1.0

    y, s = make(MC, seed=5)
    onehot = np.eye(s.shape[1])[s.argmax(1)]
    from_labels = M.auc(y, onehot, MC)
    from_scores = roc_auc_score(y, s, multi_class="ovr")
    assert abs(from_labels - from_scores) > 0.01
    assert M.auc(y, s, MC) == pytest.approx(from_scores, abs=1e-12)


def test_perfect_and_reversed_scores():
    y = np.array([0, 1, 1, 0, 1, 0])
    assert M.auc(y, y.astype(float), BIN) == 1.0
    assert M.acc(y, y.astype(float), BIN) == 1.0
    assert M.auc(y, 1.0 - y, BIN) == 0.0
    assert M.acc(y, 1.0 - y, BIN) == 0.0

    yc = np.array([0, 1, 2, 2, 1, 0, 3])
    perfect = np.eye(4)[yc]
    assert M.auc(yc, perfect, MC) == 1.0 and M.acc(yc, perfect, MC) == 1.0

    yl = np.array([[0, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]])
    m = M.classification_metrics(yl, yl * 0.9 + 0.05, ML)
    assert all(m[k] == 1.0 for k in m), m


def test_binary_score_shapes_agree():
    y, s = make(BIN, n=200, seed=11)
    forms = [s, s[:, 1:], s[:, 1]]
    ref = M.classification_metrics(y, forms[0], BIN)
    for f in forms[1:]:
        assert M.classification_metrics(y, f, BIN) == ref
        np.testing.assert_array_equal(M.confusion(y, f, BIN), M.confusion(y, s, BIN))
    # (N, 1) labels are flattened the same way.
    assert M.classification_metrics(y[:, None], s, BIN) == ref


def test_threshold_is_strict_and_adjustable():
    y = np.array([0, 1, 1, 0])
    p1 = np.array([0.5, 0.5, 0.7, 0.2])
    np.testing.assert_array_equal(M.hard_labels(p1, BIN), [0, 0, 1, 0])  # 0.5 is not > 0.5
    assert M.acc(y, p1, BIN) == 0.75
    assert M.acc(y, p1, BIN, threshold=0.4) == 0.75  # both 0.5s now positive: one right, one wrong
    assert M.acc(y, p1, BIN, threshold=0.8) == 0.5


# --- bootstrap CI ----------------------------------------------------------------------

def test_bootstrap_ci_contains_point_narrows_and_is_reproducible():
    widths = []
    for n in (100, 2000):
        y, s = make(BIN, n=n, seed=n)
        lo, hi = M.bootstrap_auc_ci(y, s, BIN, n_boot=200, seed=0)
        assert lo <= M.auc(y, s, BIN) <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(N): 2000 vs 100 should be ~4.5x narrower

    y, s = make(MC, n=150, seed=2)
    a = M.bootstrap_auc_ci(y, s, MC, n_boot=60, seed=42)
    assert a == M.bootstrap_auc_ci(y, s, MC, n_boot=60, seed=42)
    assert a != M.bootstrap_auc_ci(y, s, MC, n_boot=60, seed=43)
    wide = M.bootstrap_auc_ci(y, s, MC, n_boot=60, seed=42, alpha=0.5)
    assert a[0] <= wide[0] <= wide[1] <= a[1]  # a 50% interval sits inside the 95% one


@pytest.mark.parametrize("task", [BIN, MC, ML])
def test_bootstrap_ci_is_the_percentile_interval_of_sklearns_auc_on_the_same_resamples(task):
    y, s = make(task, n=120, seed=5)
    _, yy, ss = M._prepare(y, s, task)
    k = M._n_classes(ss, task)
    resamples = M._resamples(yy, task, k, 300, np.random.default_rng(7))
    if task == BIN:
        reference = [roc_auc_score(yy[i], ss[i]) for i in resamples]
    else:
        reference = [roc_auc_score(yy[i], ss[i], average="macro") if task == ML else
                     np.mean([roc_auc_score(yy[i] == c, ss[i][:, c]) for c in range(k)]) for i in resamples]
    low, high = M.bootstrap_auc_ci(y, s, task, n_boot=300, seed=7)
    assert (low, high) == pytest.approx(tuple(np.percentile(reference, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_redraws_resamples_missing_a_class():
    # Class 2 has a single sample: most resamples of 10 miss it, and must be redrawn.
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 2])
    s = softmax(np.random.default_rng(1).normal(size=(10, 3)) + 2 * np.eye(3)[y])
    lo, hi = M.bootstrap_auc_ci(y, s, MC, n_boot=50, seed=0)
    assert 0.0 <= lo <= hi <= 1.0 and np.isfinite([lo, hi]).all()

    yl = np.array([[0, 1], [1, 1], [0, 1], [1, 0], [0, 1], [1, 1]])  # label 1 has one 0
    sl = sigmoid(np.random.default_rng(2).normal(size=yl.shape) + 2 * (2 * yl - 1))
    lo, hi = M.bootstrap_auc_ci(yl, sl, ML, n_boot=50, seed=0)
    assert 0.0 <= lo <= hi <= 1.0

    with pytest.raises(ValueError):  # AUC undefined on the full set: nothing to resample
        M.bootstrap_auc_ci(np.zeros(5, int), np.full(5, 0.3), BIN, n_boot=10)


def test_mean_std():
    m, s = M.mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(np.sqrt(5 / 3), abs=1e-12)  # ddof=1, not 1.118
    assert M.mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        M.mean_std([])


# --- medical reporting: the positive class, sensitivity / specificity, per-class metrics ---------

@pytest.mark.parametrize("positive", [0, 1])
def test_binary_metrics_match_sklearn_for_the_chosen_positive_class(positive):
    y, s = make(BIN, n=200, seed=11)
    y = np.where(np.arange(200) < 150, 1, y)  # imbalanced, so the two choices of positive class differ
    got = M.classification_metrics(y, s, BIN, positive_class=positive)
    pred = (s[:, 1] > 0.5).astype(int)
    assert got["precision"] == pytest.approx(precision_score(y, pred, pos_label=positive), abs=1e-12)
    assert got["recall"] == pytest.approx(recall_score(y, pred, pos_label=positive), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(y, pred, pos_label=positive), abs=1e-12)
    # AUC and ACC do not depend on which class is called positive
    assert got["auc"] == pytest.approx(roc_auc_score(y, s[:, 1]), abs=1e-12)
    assert got["acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    other = M.classification_metrics(y, s, BIN, positive_class=1 - positive)
    assert other["precision"] != pytest.approx(got["precision"])
    # sensitivity / specificity swap when the positive class does
    assert other["sensitivity"] == got["specificity"] and other["specificity"] == got["sensitivity"]
    with pytest.raises(ValueError):
        M.classification_metrics(y, s, BIN, positive_class=2)


def test_sensitivity_and_specificity_are_read_off_the_confusion_matrix():
    y, s = make(BIN, n=157, seed=12)
    (tn, fp), (fn, tp) = M.confusion(y, s, BIN)  # rows true 0 / 1, columns predicted 0 / 1
    one = M.classification_metrics(y, s, BIN, positive_class=1)
    assert one["sensitivity"] == pytest.approx(tp / (tp + fn)) and one["specificity"] == pytest.approx(tn / (tn + fp))
    assert one["precision"] == pytest.approx(tp / (tp + fp))
    zero = M.classification_metrics(y, s, BIN, positive_class=0)
    assert zero["sensitivity"] == pytest.approx(tn / (tn + fp)) and zero["precision"] == pytest.approx(tn / (tn + fn))


def test_positive_index_takes_an_index_or_a_class_name():
    names = ["malignant", "normal, benign"]
    assert M.positive_index("malignant", names) == 0 and M.positive_index("Normal, Benign", names) == 1
    assert M.positive_index(0, names) == 0 and M.positive_index("1", names) == 1
    with pytest.raises(ValueError, match="malignant"):
        M.positive_index("tumour", names)
    assert M.class_names_from_info({"0": "malignant", "1": "normal, benign"}) == names


@pytest.mark.parametrize("task", [BIN, MC, ML])
def test_per_class_metrics_match_sklearn_per_class(task):
    y, s = make(task, n=240, seed=13)
    got = M.per_class_metrics(y, s, task)
    pred = M.hard_labels(s, task)
    if task == ML:
        ref = [(precision_score(y[:, j], pred[:, j]), recall_score(y[:, j], pred[:, j]),
                f1_score(y[:, j], pred[:, j]), int(y[:, j].sum())) for j in range(y.shape[1])]
        assert list(got) == [f"label {j}" for j in range(y.shape[1])]
    else:
        n = s.shape[1]
        p, r, f = (fn(y, pred, average=None, labels=list(range(n))) for fn in (precision_score, recall_score, f1_score))
        ref = [(p[c], r[c], f[c], int(np.sum(y == c))) for c in range(n)]
    for (name, m), (rp, rr, rf, support) in zip(got.items(), ref):
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((rp, rr, rf), abs=1e-12), name
        assert m["support"] == support
    if task == MC:  # the macro average is the mean of the per-class values
        macro = M.classification_metrics(y, s, task)
        assert macro["f1"] == pytest.approx(np.mean([m["f1"] for m in got.values()]))
    with pytest.raises(ValueError):
        M.per_class_metrics(y, s, task, class_names=["only one"])


def test_confusion_table_has_names_counts_and_row_percentages():
    cm = np.array([[30, 10], [5, 15]])
    lines = M.confusion_table(cm, ["malignant", "normal, benign"])
    assert "malignant" in lines[0] and "normal, benign" in lines[0]
    assert lines[2] == "| malignant | 30 (75%) | 10 (25%) |"
    assert lines[3] == "| normal, benign | 5 (25%) | 15 (75%) |"


def test_write_results_names_the_positive_class_and_stores_per_class_metrics(tmp_path, capsys):
    import json
    y, s = make(BIN, n=80, seed=14)
    names = ["malignant", "normal, benign"]
    per_seed = [{"seed": 0, "test": M.classification_metrics(y, s, BIN, positive_class=0)}]
    r = results.write_results(str(tmp_path), {"data": "x"}, per_seed, y, [s], BIN, 0, "t", class_names=names,
                        positive_class=0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["positive_class"] == {"index": 0, "name": "malignant"} == r["positive_class"]
    assert saved["class_names"] == names and list(saved["per_class_first_seed"]) == names
    assert saved["per_class_first_seed"]["malignant"]["recall"] == pytest.approx(per_seed[0]["test"]["sensitivity"])
    assert np.sum(saved["confusion_first_seed"]) == 80
    out = capsys.readouterr().out
    assert "positive class: malignant" in out and "| malignant |" in out
    for png in ("roc.png", "confusion.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


# --- confusion matrices and plots ------------------------------------------------------

def test_confusion_hand_counted():
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.2, 0.7, 0.9, 0.4, 0.6])  # predictions 0, 1, 1, 0, 1
    np.testing.assert_array_equal(M.confusion(y, p1, BIN), [[1, 1], [1, 2]])

    yc = np.array([0, 1, 2, 2, 0])
    sc = np.eye(3)[[0, 2, 2, 0, 0]]  # class 1 is never predicted: column of zeros
    np.testing.assert_array_equal(M.confusion(yc, sc, MC), [[2, 0, 0], [0, 0, 1], [1, 0, 1]])
    # A class absent from both truth and predictions still gets its row and column.
    assert M.confusion(yc, np.hstack([sc, np.zeros((5, 1))]), MC).shape == (4, 4)

    yl = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]])
    sl = np.array([[0.9, 0.1, 0.2], [0.6, 0.2, 0.8], [0.3, 0.7, 0.1]])
    cm = M.confusion(yl, sl, ML)
    assert cm.shape == (3, 2, 2)
    # label 0: truth 1,0,1 vs pred 1,1,0 -> TN 0, FP 1, FN 1, TP 1
    np.testing.assert_array_equal(cm[0], [[0, 1], [1, 1]])
    np.testing.assert_array_equal(cm[1], [[2, 0], [0, 1]])


@pytest.mark.parametrize("task", [BIN, MC, ML])
def test_plot_roc_writes_png_and_reports_the_auc(task, tmp_path):
    y, s = make(task, n=120, seed=4)
    path = tmp_path / "sub" / "roc.png"
    shown = F.plot_roc(y, [s], task, path, title=task)
    assert shown["auc"] == (M.auc(y, s, task), 0.0)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    assert (path.parent / "roc.pdf").read_bytes()[:4] == b"%PDF"


@pytest.mark.parametrize("task", [MC, ML])
def test_plot_confusion_writes_png_of_consistent_counts(task, tmp_path):
    y, s = make(task, n=120, seed=6)
    cm = M.confusion(y, s, task)
    if task == MC:
        assert cm.sum() == 120 and np.trace(cm) / 120 == pytest.approx(M.acc(y, s, task))
    else:
        assert (cm.sum(axis=(1, 2)) == 120).all()
        correct = cm[:, 0, 0] + cm[:, 1, 1]
        assert np.mean(correct / 120) == pytest.approx(M.acc(y, s, task))
    path = tmp_path / "cm.png"
    F.plot_confusion(cm, path, title="cm")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        F.plot_confusion(np.zeros((2, 3)), tmp_path / "bad.png")


def test_log_axis_only_when_values_span_orders_of_magnitude():
    assert F.log_scale_needed([2.1, 1.4, 560, 380])          # BYOL and Barlow Twins losses on one axis
    assert not F.log_scale_needed([2.1, 1.4, 1.2])
    assert not F.log_scale_needed([-1.0, 500.0])             # a log axis cannot show non-positive values
    assert not F.log_scale_needed([])


def test_training_curves_tick_whole_epochs_and_go_log_for_mixed_scales(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    seen = {}
    real_save = F.save

    def record(fig, path, title=None):
        ax = fig.axes[0]
        fig.canvas.draw()
        seen[os.path.basename(path)] = (ax.get_yscale(), [t for t in ax.get_xticks() if 0 <= t <= 2],
                                        ax.get_legend() is not None)
        return real_save(fig, path, title)
    monkeypatch.setattr(F, "save", record)
    F.plot_training_curves({"BYOL": ([0, 1, 2], [2.1, 1.6, 1.4]), "Barlow Twins": ([0, 1, 2], [560, 420, 380])},
                           tmp_path / "both.png", title="pretraining loss")
    F.plot_training_curves({"BYOL": ([0, 1, 2], [2.1, 1.6, 1.4])}, tmp_path / "one.png", title="BYOL loss")
    assert seen["both.png"][0] == "log" and seen["one.png"][0] == "linear"
    for scale, ticks, legend in seen.values():
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # a legend names two series; one series is named by the title
    assert seen["both.png"][2] and not seen["one.png"][2]
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_MAGIC
    # one monitored epoch (a 5-epoch run with --eval-every 5): whole-epoch ticks around it, not 4.74 ... 5.22
    seen.clear()
    monkeypatch.setattr(F, "save", lambda fig, path, title=None: seen.update(ticks=list(fig.axes[0].get_xticks()),
                                                                              xlim=fig.axes[0].get_xlim()))
    F.plot_training_curves({"kNN": ([5], [0.96])}, tmp_path / "knn.png")
    inside = [t for t in seen["ticks"] if seen["xlim"][0] <= t <= seen["xlim"][1]]
    assert 5 in inside and all(float(t).is_integer() for t in inside), seen
    plt.close("all")


def test_confusion_plot_shows_class_names_and_row_percentages(tmp_path, monkeypatch):
    texts = {}
    real_save = F.save

    def record(fig, path, title=None):
        ax = fig.axes[0]
        texts["cells"] = [t.get_text() for t in ax.texts]
        texts["x"] = [t.get_text() for t in ax.get_xticklabels()]
        texts["colorbar"] = len(fig.axes) == 2
        return real_save(fig, path, title)
    monkeypatch.setattr(F, "save", record)
    F.plot_confusion(np.array([[30, 10], [5, 15]]), tmp_path / "cm.png", class_names=["malignant", "normal, benign"])
    assert texts["cells"] == ["30\n75%", "10\n25%", "5\n25%", "15\n75%"]
    assert texts["x"] == ["malignant", "normal, benign"] and texts["colorbar"]


def test_binary_roc_is_the_positive_class_curve_with_the_same_auc(tmp_path, monkeypatch):
    y, s = make(BIN, n=150, seed=15)
    one = F.plot_roc(y, [s], BIN, tmp_path / "one.png", class_names=["malignant", "normal, benign"])
    zero = F.plot_roc(y, [s], BIN, tmp_path / "zero.png", class_names=["malignant", "normal, benign"], positive_class=0)
    auc = one["auc"][0]
    assert auc == zero["auc"][0] == pytest.approx(roc_auc_score(y, s[:, 1]))  # AUC of class 0 on 1 - score is the same
    assert zero["legend"] == [f"malignant (positive class): AUC {auc:.3f}"]  # one seed: no spread, no band
    assert one["legend"] == [f"normal, benign (positive class): AUC {auc:.3f}"]


def test_compare_samples_against_a_constant_side_warns_nothing_and_matches_the_one_sample_test():
    import warnings
    from scipy import stats
    varied, constant = [0.90, 0.91, 0.92, 0.905, 0.915], [0.965] * 5  # a fixed encoder's probe: std 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = M.compare_samples(varied, constant)
    # Welch with one zero-variance side is the one-sample t-test of the other against that value
    assert c["std_b"] < 1e-12 and c["welch_p"] == pytest.approx(stats.ttest_1samp(varied, 0.965).pvalue)


# --- imbalance and the decision threshold ---------------------------------------------------------

@pytest.mark.parametrize("task", [BIN, MC, ML])
def test_balanced_accuracy_matches_sklearn(task):
    from sklearn.metrics import balanced_accuracy_score
    y, s = make(task, n=400, seed=21)
    if task == BIN:
        y = np.where(np.arange(400) < 300, 1, y)  # imbalanced: plain accuracy and balanced accuracy part
    pred = M.hard_labels(s, task)
    if task == ML:
        ref = np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1])])
    else:
        ref = balanced_accuracy_score(y, pred)
    assert M.balanced_accuracy(y, s, task) == pytest.approx(ref, abs=1e-12)
    if task == BIN:
        assert abs(ref - M.acc(y, s, task)) > 0.01
        # calling every image the majority class: accuracy 0.75 or more, balanced accuracy 0.5
        assert M.balanced_accuracy(y, np.ones(400), BIN) == 0.5


def plain_youden(y, s):
    """Brute force: every cut between neighbouring distinct scores (and below / above all of them), the
    calls s > cut, the largest sensitivity + specificity - 1."""
    values = np.unique(s)
    cuts = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1]]])
    best = -np.inf
    for cut in cuts:
        pred = s > cut
        best = max(best, pred[y == 1].mean() + (~pred[y == 0]).mean() - 1)
    return best


def test_youden_threshold_maximises_j_on_validation_and_breaks_ties_high():
    for seed in range(3):
        y, s = make(BIN, n=120, seed=30 + seed)
        s1 = np.round(s[:, 1], 2)  # ties among the scores too
        t = M.youden_threshold(y, s1)
        pred = s1 > t  # the module's strict convention
        j = pred[y == 1].mean() + (~pred[y == 0]).mean() - 1
        assert j == pytest.approx(plain_youden(y, s1), abs=1e-12)
        assert M.youden_threshold(y[:, None], np.stack([1 - s1, s1], axis=1)) == t  # (N, 1) labels, (N, 2) scores
    # two cuts tie at J = 0.5 (above 0.3, above 0.1): the higher one, halfway to the next score
    assert M.youden_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="one class"):
        M.youden_threshold(np.zeros(5, int), np.linspace(0, 1, 5))


@pytest.mark.parametrize("positive", [0, 1])
def test_threshold_metrics_match_sklearn_at_the_threshold(positive):
    y, s = make(BIN, n=250, seed=22)
    t = 0.37
    pred = (s[:, 1] > t).astype(int)
    got = M.threshold_metrics(y, s, t, positive_class=positive)
    sens, spec = recall_score(y, pred, pos_label=positive), recall_score(y, pred, pos_label=1 - positive)
    assert got["sensitivity"] == pytest.approx(sens, abs=1e-12) and got["specificity"] == pytest.approx(spec, abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx((sens + spec) / 2, abs=1e-12)
    assert got["precision"] == pytest.approx(precision_score(y, pred, pos_label=positive), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(y, pred, pos_label=positive), abs=1e-12)
    # at 0.5 the same as classification_metrics
    half = M.threshold_metrics(y, s, 0.5, positive)
    ref = M.classification_metrics(y, s, BIN, positive_class=positive)
    assert (half["sensitivity"], half["specificity"]) == (ref["sensitivity"], ref["specificity"])


def test_evaluation_metrics_extends_classification_metrics():
    y, s = make(BIN, n=200, seed=23)
    yv, sv = make(BIN, n=80, seed=24)
    base = M.classification_metrics(y, s, BIN, positive_class=0)
    got = M.evaluation_metrics(y, s, BIN, positive_class=0, y_val=yv, val_score=sv)
    assert {k: got[k] for k in base} == base
    assert set(got) - set(base) == {"balanced_accuracy", "ece", "brier", *M.THRESHOLD_KEYS}
    assert all(isinstance(v, float) for v in got.values())
    t = M.youden_threshold(yv, sv)
    assert got["threshold"] == t
    at = M.threshold_metrics(y, s, t, positive_class=0)
    assert got["sensitivity_at_threshold"] == at["sensitivity"] and got["f1_at_threshold"] == at["f1"]
    # J does not depend on which class is positive: the threshold is the same, sensitivity and specificity swap
    other = M.evaluation_metrics(y, s, BIN, positive_class=1, y_val=yv, val_score=sv)
    assert other["threshold"] == t and other["sensitivity_at_threshold"] == got["specificity_at_threshold"]
    # no validation scores, or a validation split of one class: no threshold keys
    assert not set(M.THRESHOLD_KEYS) & set(M.evaluation_metrics(y, s, BIN))
    assert not set(M.THRESHOLD_KEYS) & set(M.evaluation_metrics(y, s, BIN, y_val=np.ones(80, int), val_score=sv))
    ym, sm = make(MC, n=150, seed=25)
    assert set(M.evaluation_metrics(ym, sm, MC, y_val=ym, val_score=sm)) == \
        set(M.classification_metrics(ym, sm, MC)) | {"balanced_accuracy", "ece", "brier"}
    with pytest.raises(ValueError, match="both"):
        M.evaluation_metrics(y, s, BIN, y_val=yv)


# --- calibration -------------------------------------------------------------------------------------

def reference_ece(confidence, correct, n_bins):
    """ECE from sklearn's calibration_curve (per non-empty bin: accuracy and mean confidence) weighted by
    bin counts from np.histogram over the same equal-width bins."""
    from sklearn.calibration import calibration_curve
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    counts = np.histogram(confidence, bins=np.linspace(0, 1, n_bins + 1))[0]
    counts = counts[counts > 0]
    return float(np.sum(counts * np.abs(accuracy - mean_confidence)) / counts.sum())


@pytest.mark.parametrize("task", [BIN, MC, ML])
def test_ece_equals_calibration_curve_with_bin_counts(task):
    y, s = make(task, n=500, seed=26, signal=2.0)
    if task == BIN:
        p = s[:, 1]
        conf, correct = np.maximum(p, 1 - p), ((p > 0.5) == y)
    elif task == MC:
        conf, correct = s.max(axis=1), s.argmax(axis=1) == y
    else:  # every (image, label) pair as one binary prediction
        conf, correct = np.maximum(s, 1 - s).ravel(), ((s > 0.5) == y).ravel()
    for bins in (15, 10):
        ece = M.expected_calibration_error(y, s, task, n_bins=bins)
        assert ece == pytest.approx(reference_ece(conf, correct.astype(int), bins), abs=1e-12)
    assert M.expected_calibration_error(y, s, task) == M.expected_calibration_error(y, s, task, n_bins=15)
    # perfectly confident and always right: 0
    onehot = np.eye(s.shape[1])[y] if task == MC else (y if task == ML else np.eye(2)[y])
    assert M.expected_calibration_error(y, onehot.astype(float), task) == 0.0


def test_brier_matches_sklearn():
    from sklearn.metrics import brier_score_loss
    y, s = make(BIN, n=300, seed=27)
    assert M.brier(y, s, BIN) == pytest.approx(brier_score_loss(y, s[:, 1]), abs=1e-12)
    y, s = make(MC, n=300, seed=28)
    direct = np.mean(np.sum((s - np.eye(s.shape[1])[y]) ** 2, axis=1))
    assert M.brier(y, s, MC) == pytest.approx(direct, abs=1e-12)
    try:  # scikit-learn 1.7 and later score multi-class probabilities the same way
        assert M.brier(y, s, MC) == pytest.approx(brier_score_loss(y, s), abs=1e-12)
    except ValueError:
        pass
    y, s = make(ML, n=300, seed=29)
    assert M.brier(y, s, ML) == pytest.approx(np.mean([brier_score_loss(y[:, j], s[:, j]) for j in range(5)]))


def test_reliability_diagram_is_written_and_shows_the_ece(tmp_path, monkeypatch):
    y, s = make(MC, n=200, seed=31)
    seen = {}
    real_save = F.save
    monkeypatch.setattr(F, "save", lambda fig, path, title=None: (seen.update(
        texts=[t.get_text() for t in fig.axes[0].texts], title=fig.axes[0].get_title()), real_save(fig, path, title)))
    ece = F.plot_reliability(y, s, MC, tmp_path / "rel.png", title="seed 0")
    assert ece == M.expected_calibration_error(y, s, MC)
    assert seen["texts"] == [f"ECE {ece:.3f} (15 bins, n=200)"] and seen["title"] == "seed 0"
    assert (tmp_path / "rel.png").read_bytes()[:8] == PNG_MAGIC


def nll(y, p):
    return -np.mean(np.log(p[np.arange(len(y)), y]))


def test_temperature_scaling_fits_over_confidence_and_leaves_calibrated_scores():
    rng = np.random.default_rng(32)
    logits = rng.normal(scale=1.5, size=(4000, 3))
    p = softmax(logits)
    y = np.array([rng.choice(3, p=row) for row in p])  # labels drawn from the scores: calibrated
    assert M.fit_temperature(y, p, MC) == pytest.approx(1.0, abs=0.08)
    sharp = softmax(3 * logits)  # over-confident: the same ranking, logits x3
    t = M.fit_temperature(y, sharp, MC)
    assert t == pytest.approx(3.0, rel=0.1)
    scaled = M.apply_temperature(sharp, t, MC)
    assert nll(y, scaled) < nll(y, sharp) - 0.1
    grid = np.linspace(0.5, 6, 1101)  # the fitted T is the grid's minimum of the validation NLL
    best = grid[np.argmin([nll(y, softmax(np.log(sharp) / g)) for g in grid])]
    assert t == pytest.approx(best, abs=0.01)
    np.testing.assert_array_equal(scaled.argmax(axis=1), sharp.argmax(axis=1))  # the calls do not change
    # binary scores keep their shape; T = 1 gives the scores back
    yb, sb = make(BIN, n=100, seed=33)
    for form in (sb, sb[:, 1], sb[:, 1:]):
        back = M.apply_temperature(form, 1.0, BIN)
        assert back.shape == form.shape and np.allclose(back, form)
    assert M.fit_temperature(yb, sb, BIN) > 0
    with pytest.raises(ValueError):
        M.apply_temperature(sb, 0.0, BIN)


# --- paired comparisons of two classifiers on the same test images -------------------------------

def plain_delong(y, sa, sb):
    """DeLong et al. (1988) as written: psi(X, Y) = 1, 1/2, 0 for X >, =, < Y; placement values
    V10(X_i) = mean_j psi(X_i, Y_j) over negatives, V01(Y_j) = mean_i psi(X_i, Y_j) over positives;
    S10, S01 their sample covariance matrices over the two classifiers; S = S10 / m + S01 / n."""
    v10, v01, aucs = [], [], []
    for s in (sa, sb):
        x, z = s[y == 1], s[y == 0]
        psi = np.array([[1.0 if xi > zj else 0.5 if xi == zj else 0.0 for zj in z] for xi in x])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = len(v10[0]), len(v01[0])
    s10 = np.array([[np.sum((v10[r] - aucs[r]) * (v10[c] - aucs[c])) / (m - 1) for c in range(2)] for r in range(2)])
    s01 = np.array([[np.sum((v01[r] - aucs[r]) * (v01[c] - aucs[c])) / (n - 1) for c in range(2)] for r in range(2)])
    cov = s10 / m + s01 / n
    return aucs, cov


def test_delong_equals_the_1988_placement_value_formulas():
    from scipy.stats import norm
    rng = np.random.default_rng(34)
    y = rng.integers(0, 2, 90)
    sa = np.round(rng.normal(size=90) + 0.8 * y, 1)  # rounded: ties within and between classes
    sb = np.round(0.6 * sa + rng.normal(size=90) + 0.5 * y, 1)
    got = M.delong_test(y, sa, sb)
    (auc_a, auc_b), cov = plain_delong(y, sa, sb)
    assert got["auc_a"] == pytest.approx(auc_a, abs=1e-12) and got["auc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert got["auc_a"] == pytest.approx(roc_auc_score(y, sa), abs=1e-12)
    assert (got["var_a"], got["var_b"], got["cov_ab"]) == pytest.approx((cov[0, 0], cov[1, 1], cov[0, 1]), abs=1e-14)
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert got["se"] == pytest.approx(se, abs=1e-12)
    assert got["p"] == pytest.approx(2 * norm.sf(abs(auc_b - auc_a) / se), rel=1e-9)
    assert got["ci_low"] == pytest.approx(auc_b - auc_a - 1.959964 * se, abs=1e-6)
    # (N, 2) scores and (N, 1) labels read the same; a classifier against itself: no difference
    assert M.delong_test(y[:, None], np.stack([1 - sa, sa], 1), sb)["p"] == got["p"]
    same = M.delong_test(y, sa, sa)
    assert same["diff"] == 0 and same["p"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        M.delong_test(np.array([0, 0, 0, 1]), np.arange(4.0), np.arange(4.0))


def test_delong_variance_of_one_auc_and_the_mann_whitney_statistic():
    from scipy import stats
    rng = np.random.default_rng(35)
    y = np.repeat([0, 1], [70, 50])
    s = rng.normal(size=120) + 0.7 * y
    got = M.delong_test(y, s, rng.normal(size=120))
    m, n = 50, 70
    # the AUC is the Mann-Whitney U of the positives over m * n
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert got["auc_a"] == pytest.approx(u / (m * n), abs=1e-12)
    # DeLong's variance is the two-sample jackknife variance of U / (m n) (one image left out at a time)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    jack = 0.0
    for group in (pos, neg):
        loo = np.array([roc_auc_score(np.delete(y, i), np.delete(s, i)) for i in group])
        jack += (len(group) - 1) / len(group) * np.sum((loo - loo.mean()) ** 2)
    assert got["var_a"] == pytest.approx(jack, rel=1e-9)
    # with no signal its mean is Var(U) / (m n)^2 = (m + n + 1) / (12 m n), U's null variance
    null = [M.delong_test(y, rng.normal(size=120), rng.normal(size=120))["var_a"] for _ in range(200)]
    assert np.mean(null) == pytest.approx((m + n + 1) / (12 * m * n), rel=0.05)


def test_paired_bootstrap_agrees_with_delong_and_is_seeded():
    rng = np.random.default_rng(36)
    y = rng.integers(0, 2, 400)
    sa = rng.normal(size=400) + 0.8 * y
    sb = 0.7 * sa + 0.7 * rng.normal(size=400) + 0.6 * y  # correlated with A, as two models on one test set
    delong = M.delong_test(y, sa, sb)
    boot = M.paired_bootstrap_auc(y, sa, sb, BIN, n_boot=500, seed=1)
    assert boot["diff"] == pytest.approx(delong["diff"], abs=1e-12)
    assert boot["ci_low"] < delong["diff"] < boot["ci_high"]  # the bootstrap interval covers DeLong's centre
    assert (boot["ci_high"] - boot["ci_low"]) / 3.92 == pytest.approx(delong["se"], rel=0.25)
    assert boot == M.paired_bootstrap_auc(y, sa, sb, BIN, n_boot=500, seed=1)
    assert boot != M.paired_bootstrap_auc(y, sa, sb, BIN, n_boot=500, seed=2)
    assert 2 / 501 <= boot["p"] <= 1
    # a clear difference: every resample agrees on its sign, so p is at its floor
    assert M.paired_bootstrap_auc(y, sa, rng.normal(size=400), BIN, n_boot=200)["p"] == pytest.approx(2 / 201)
    ym, sm = make(MC, n=200, seed=37)
    multi = M.paired_auc_test(ym, sm, softmax(np.log(sm) + rng.normal(size=sm.shape)), MC)
    assert multi["method"] == "paired bootstrap" and multi["auc_a"] == M.auc(ym, sm, MC) and multi["diff"] < 0
    assert M.paired_auc_test(y, sa, sb, BIN) == delong


@pytest.mark.parametrize("task", [BIN, MC, ML])
def test_the_bootstraps_rank_auc_is_the_auc(task):
    y, s = make(task, n=150, seed=41)
    s = np.round(s, 2)  # with ties
    task_, yy, ss = M._prepare(y, s, task)
    assert M._rank_auc(yy, ss, task_) == pytest.approx(M.auc(y, s, task), abs=1e-12)


def test_mann_whitney_minimum_p_is_scipys_exact_p_of_separated_samples():
    from scipy import stats
    for n_a, n_b in ((2, 2), (3, 3), (3, 4), (3, 5), (4, 4), (5, 5), (2, 9)):
        exact = stats.mannwhitneyu(np.arange(n_a), n_a + np.arange(n_b), method="exact").pvalue
        assert M.mwu_min_p(n_a, n_b) == pytest.approx(exact, rel=1e-9), (n_a, n_b)
    assert M.mwu_min_p(3, 3) == pytest.approx(0.1) and M.mwu_min_p(4, 4) < 0.05 and M.mwu_min_p(0, 3) is None


def test_compare_samples_gives_welchs_interval_of_the_difference():
    from scipy import stats
    a, b = [0.70, 0.72, 0.69, 0.71], [0.75, 0.74, 0.78, 0.80, 0.77]
    c = M.compare_samples(a, b)
    ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert (c["diff_ci95_low"], c["diff_ci95_high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert c["diff_ci95_low"] < c["diff"] < c["diff_ci95_high"] and c["diff_ci95_low"] > 0
    assert c["mwu_min_p"] == M.mwu_min_p(4, 5)
    assert c["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)  # the old keys stay
    assert M.compare_samples([0.7], b)["diff_ci95_low"] is None


# --- comparing runs ---------------------------------------------------------------------------------

def run_dict(**changes):
    run = {"data": "breastmnist", "data_hash": "h1", "size": 28, "mode": "linear_probe", "encoder": "random",
           "task": BIN, "positive_class": {"index": 1, "name": "normal, benign"},
           "args": {"label_fraction": 1.0, "shots": 20, "probe": "logreg", "resize": None}}
    for key, value in changes.items():
        (run["args"] if key in run["args"] else run)[key] = value
    return run


def test_protocol_mismatches_name_each_field_that_matters():
    assert M.protocol_mismatches(run_dict(), run_dict(encoder="runs/byol/checkpoint.pt")) == []
    assert M.protocol_mismatches(run_dict(), run_dict(size=64, probe="sgd")) == \
        [("size", 28, 64), ("probe", "logreg", "sgd")]
    assert M.protocol_mismatches(run_dict(), run_dict(data_hash="h2")) == [("data_hash", "h1", "h2")]
    assert M.protocol_mismatches(run_dict(), run_dict(resize=224, positive_class={"index": 0})) == \
        [("resize", None, 224), ("positive_class", 1, 0)]
    # shots matter to few-shot only, the label fraction and the probe not to it
    few = dict(mode="fewshot", label_fraction=0.1, probe="sgd")
    assert M.protocol_mismatches(run_dict(**few), run_dict(**few, shots=5)) == [("shots", 20, 5)]
    assert M.protocol_mismatches(run_dict(**few), run_dict(mode="fewshot")) == []
    # a field only one run records (an older run) is not compared; split and grouping when both have them
    old = run_dict()
    del old["data_hash"]
    assert M.protocol_mismatches(old, run_dict(data_hash="h2", split={"seed": 0})) == []
    assert M.protocol_mismatches(run_dict(split="official"), run_dict(split="drawn 80/10/10")) == \
        [("split", "official", "drawn 80/10/10")]
    found = M.group_mismatches([run_dict(), run_dict(encoder="x")], [run_dict(size=64), run_dict(mode="finetune")])
    assert found == [("size", 28, 64, 2), ("mode", "linear_probe", "finetune", 3)]


def test_group_names_come_from_the_runs():
    assert M.group_name([run_dict()]) == "random, linear_probe (logreg), breastmnist 28 px, label fraction 1.0"
    seeds = [run_dict(encoder=f"runs/further-s{i}/checkpoint.pt", mode="fewshot") for i in range(3)]
    assert M.group_name(seeds) == "further-s* (3 encoders), fewshot (20 shots), breastmnist 28 px"
    assert M.group_name([{"per_seed": []}], ["runs/x/metrics.json"]) == "x"


# --- write_results with the new metrics ---------------------------------------------------------------

def test_write_results_reports_calibration_and_the_threshold_and_takes_old_records(tmp_path, capsys):
    import json
    y, s = make(BIN, n=120, seed=38)
    _, s2 = make(BIN, n=120, seed=39)
    s2 = softmax(np.log(s2) + 2 * np.eye(2)[y])
    yv, sv = make(BIN, n=60, seed=40)
    per_seed = [{"seed": 0, "test": M.evaluation_metrics(y, s, BIN, 1, yv, sv)},
                {"seed": 1, "test": M.classification_metrics(y, s2, BIN)}]  # an older seed record
    r = results.write_results(str(tmp_path), {"data": "x"}, per_seed, y, [s, s2], BIN, 0, "t")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mean"] == r["mean"]
    eces = [M.expected_calibration_error(y, sc, BIN) for sc in (s, s2)]
    assert saved["mean"]["ece"] == pytest.approx(np.mean(eces)) and saved["per_seed"][1]["test"]["ece"] == eces[1]
    assert saved["mean"]["threshold"] == per_seed[0]["test"]["threshold"] and saved["std"]["threshold"] == 0.0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "ece" in out and "brier" in out
    assert "chosen on validation by Youden's J" in out and "at that threshold: sensitivity" in out
    assert "(n=1)" in out and "cannot reach p < 0.05" in out
    assert (tmp_path / "reliability.png").read_bytes()[:8] == PNG_MAGIC
