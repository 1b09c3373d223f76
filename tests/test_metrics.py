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

from common import metrics as M  # noqa: E402

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
    r = M.write_results(str(tmp_path), {"data": "x"}, per_seed, y, [s], BIN, 0, "t", class_names=names,
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
    shown = M.plot_roc(y, s, task, path, title=task)
    assert shown == M.auc(y, s, task)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


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
    M.plot_confusion(cm, path, title="cm")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        M.plot_confusion(np.zeros((2, 3)), tmp_path / "bad.png")


def test_log_axis_only_when_values_span_orders_of_magnitude():
    assert M.log_scale_needed([2.1, 1.4, 560, 380])          # BYOL and Barlow Twins losses on one axis
    assert not M.log_scale_needed([2.1, 1.4, 1.2])
    assert not M.log_scale_needed([-1.0, 500.0])             # a log axis cannot show non-positive values
    assert not M.log_scale_needed([])


def test_training_curves_tick_whole_epochs_and_go_log_for_mixed_scales(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    seen = {}
    real_save = M._save

    def record(fig, path):
        ax = fig.axes[0]
        fig.canvas.draw()
        seen[os.path.basename(path)] = (ax.get_yscale(), [t for t in ax.get_xticks() if 0 <= t <= 2],
                                        ax.get_legend() is not None)
        real_save(fig, path)
    monkeypatch.setattr(M, "_save", record)
    M.plot_training_curves({"BYOL": ([0, 1, 2], [2.1, 1.6, 1.4]), "Barlow Twins": ([0, 1, 2], [560, 420, 380])},
                           tmp_path / "both.png", title="pretraining loss")
    M.plot_training_curves({"BYOL": ([0, 1, 2], [2.1, 1.6, 1.4])}, tmp_path / "one.png")
    assert seen["both.png"][0] == "log" and seen["one.png"][0] == "linear"
    for scale, ticks, legend in seen.values():
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert legend
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_MAGIC
    # one monitored epoch (a 5-epoch run with --eval-every 5): whole-epoch ticks around it, not 4.74 ... 5.22
    seen.clear()
    monkeypatch.setattr(M, "_save", lambda fig, path: seen.update(ticks=list(fig.axes[0].get_xticks()),
                                                                   xlim=fig.axes[0].get_xlim()))
    M.plot_training_curves({"kNN": ([5], [0.96])}, tmp_path / "knn.png")
    inside = [t for t in seen["ticks"] if seen["xlim"][0] <= t <= seen["xlim"][1]]
    assert 5 in inside and all(float(t).is_integer() for t in inside), seen
    plt.close("all")


def test_confusion_plot_shows_class_names_and_row_percentages(tmp_path, monkeypatch):
    texts = {}
    real_save = M._save

    def record(fig, path):
        ax = fig.axes[0]
        texts["cells"] = [t.get_text() for t in ax.texts]
        texts["x"] = [t.get_text() for t in ax.get_xticklabels()]
        texts["colorbar"] = len(fig.axes) == 2
        real_save(fig, path)
    monkeypatch.setattr(M, "_save", record)
    M.plot_confusion(np.array([[30, 10], [5, 15]]), tmp_path / "cm.png", class_names=["malignant", "normal, benign"])
    assert texts["cells"] == ["30\n75%", "10\n25%", "5\n25%", "15\n75%"]
    assert texts["x"] == ["malignant", "normal, benign"] and texts["colorbar"]


def test_binary_roc_is_the_positive_class_curve_with_the_same_auc(tmp_path, monkeypatch):
    y, s = make(BIN, n=150, seed=15)
    labels = {}
    real_save = M._save
    monkeypatch.setattr(M, "_save", lambda fig, path: (labels.setdefault(os.path.basename(path), [
        t.get_text() for t in fig.axes[0].get_legend().get_texts()]), real_save(fig, path)))
    one = M.plot_roc(y, s, BIN, tmp_path / "one.png", class_names=["malignant", "normal, benign"])
    zero = M.plot_roc(y, s, BIN, tmp_path / "zero.png", class_names=["malignant", "normal, benign"], positive_class=0)
    assert one == zero == pytest.approx(roc_auc_score(y, s[:, 1]))  # AUC of class 0 on 1 - score is the same
    assert labels["zero.png"] == [f"malignant (positive class): AUC {one:.3f}"]
    assert labels["one.png"] == [f"normal, benign (positive class): AUC {one:.3f}"]


def test_compare_samples_against_a_constant_side_warns_nothing_and_matches_the_one_sample_test():
    import warnings
    from scipy import stats
    varied, constant = [0.90, 0.91, 0.92, 0.905, 0.915], [0.965] * 5  # a fixed encoder's probe: std 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = M.compare_samples(varied, constant)
    # Welch with one zero-variance side is the one-sample t-test of the other against that value
    assert c["std_b"] < 1e-12 and c["welch_p"] == pytest.approx(stats.ttest_1samp(varied, 0.965).pvalue)
