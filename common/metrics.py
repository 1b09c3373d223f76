"""Classification metrics for MedMNIST tasks (numpy in, python floats / numpy arrays out).

Task strings are medmnist's ``INFO[flag]["task"]`` values. AUC and ACC follow medmnist's
own ``getAUC`` / ``getACC`` definitions so numbers are comparable with the MedMNIST benchmark;
AUC is always computed from continuous scores, never from thresholded predictions.
"""
import os

import numpy as np
import matplotlib

matplotlib.use("Agg")  # headless: plots are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

BINARY = "binary-class"
MULTI_CLASS = "multi-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASKS = (BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL)


def _check_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    # MedMNIST scores ordinal regression exactly like multi-class (argmax + one-vs-rest AUC).
    return MULTI_CLASS if task == ORDINAL else task


def _labels(y_true, task):
    y = np.asarray(y_true)
    if task == MULTI_LABEL:
        if y.ndim != 2:
            raise ValueError(f"multi-label y_true must be (N, L), got {y.shape}")
        return y.astype(int)
    # medmnist stores single labels as (N, 1); reshape (not squeeze) so N == 1 still works.
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(f"{task} y_true must be (N,) or (N, 1), got {y.shape}")
    return y.astype(int)


def _scores(y_score, task):
    """Binary -> (N,) P(class 1); multi-class / multi-label -> (N, C) / (N, L)."""
    s = np.asarray(y_score, dtype=float)
    if task == BINARY:
        if s.ndim == 1:
            return s
        if s.ndim == 2 and s.shape[1] == 1:
            return s[:, 0]
        if s.ndim == 2 and s.shape[1] == 2:
            return s[:, 1]  # column 1 is the positive class (medmnist takes the last column)
        raise ValueError(f"binary y_score must be (N,), (N, 1) or (N, 2), got {s.shape}")
    if s.ndim != 2:
        raise ValueError(f"{task} y_score must be 2-D, got {s.shape}")
    return s


def _prepare(y_true, y_score, task):
    task = _check_task(task)
    y, s = _labels(y_true, task), _scores(y_score, task)
    if len(y) != len(s):
        raise ValueError(f"y_true has {len(y)} samples but y_score has {len(s)}")
    return task, y, s


def _n_classes(s, task):
    return 2 if task == BINARY else s.shape[1]


def _auc(y, s, task):
    if task == BINARY:
        return float(roc_auc_score(y, s))
    if task == MULTI_CLASS:
        # One-vs-rest per class from the softmax column, then an unweighted mean (medmnist's
        # definition; it does not need rows to sum to 1, unlike sklearn's multi_class="ovr").
        return float(np.mean([roc_auc_score(y == c, s[:, c]) for c in range(s.shape[1])]))
    return float(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(s.shape[1])]))


def auc(y_true, y_score, task):
    """ROC AUC from scores: binary, one-vs-rest macro (multi-class/ordinal), or mean per label."""
    task, y, s = _prepare(y_true, y_score, task)
    return _auc(y, s, task)


def hard_labels(y_score, task, threshold=0.5):
    """Hard predictions: binary (N,) of score > threshold, multi-class argmax, multi-label (N, L)."""
    task = _check_task(task)
    s = _scores(y_score, task)
    if task == MULTI_CLASS:
        return np.argmax(s, axis=1)
    # Strict ">" as in medmnist's getACC: a score of exactly `threshold` is negative.
    return (s > threshold).astype(int)


def acc(y_true, y_score, task, threshold=0.5):
    """MedMNIST accuracy; multi-label is the mean of per-label accuracies (not subset accuracy)."""
    task, y, _ = _prepare(y_true, y_score, task)
    pred = hard_labels(y_score, task, threshold)
    if task == MULTI_LABEL:
        return float(np.mean([accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1])]))
    return float(accuracy_score(y, pred))


def classification_metrics(y_true, y_score, task):
    """Dict of auc, acc, precision, recall, f1 (positive class / macro), weighted_f1."""
    task, y, s = _prepare(y_true, y_score, task)
    pred = hard_labels(s, task)
    average = "binary" if task == BINARY else "macro"
    return {
        "auc": _auc(y, s, task),
        "acc": acc(y, s, task),
        "precision": float(precision_score(y, pred, average=average, zero_division=0)),
        "recall": float(recall_score(y, pred, average=average, zero_division=0)),
        "f1": float(f1_score(y, pred, average=average, zero_division=0)),
        "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
    }


def confusion(y_true, y_score, task):
    """(C, C) confusion matrix (rows = true, cols = predicted), or (L, 2, 2) for multi-label."""
    task, y, s = _prepare(y_true, y_score, task)
    pred = hard_labels(s, task)
    if task == MULTI_LABEL:
        return multilabel_confusion_matrix(y, pred)
    # Fixed labels keep the shape (C, C) even if a class is never predicted or never present.
    return confusion_matrix(y, pred, labels=list(range(_n_classes(s, task))))


def _auc_defined(y, task, n_classes):
    """True when every per-class / per-label AUC has both positives and negatives."""
    if task == MULTI_LABEL:
        pos = y.sum(axis=0)
        return bool(np.all((pos > 0) & (pos < len(y))))
    return bool(np.isin(np.arange(n_classes), y).all())


def bootstrap_auc_ci(y_true, y_score, task, n_boot=1000, seed=0, alpha=0.05):
    """Percentile bootstrap (1 - alpha) CI of the AUC, resampling test samples with replacement."""
    task, y, s = _prepare(y_true, y_score, task)
    n, k = len(y), _n_classes(s, task)
    if not _auc_defined(y, task, k):
        raise ValueError("AUC is undefined on the full set: some class/label has one value only")
    rng = np.random.default_rng(seed)
    aucs = []
    # Resamples missing a class (or a label with only one value) have no AUC; they are REDRAWN
    # rather than skipped, so the interval always rests on exactly n_boot replicates. The cap
    # stops an endless loop on tiny sets where a valid resample is very unlikely.
    max_draws = 20 * n_boot + 100
    draws = 0
    while len(aucs) < n_boot:
        if draws >= max_draws:
            raise ValueError(f"only {len(aucs)} of {n_boot} resamples had every class present")
        draws += 1
        idx = rng.integers(0, n, size=n)
        if _auc_defined(y[idx], task, k):
            aucs.append(_auc(y[idx], s[idx], task))
    low, high = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def mean_std(values):
    """Mean and sample std (ddof=1) over runs/seeds; std is 0.0 for a single value."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


def _new_axes(title):
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if title:
        ax.set_title(title, fontsize=9)
    return fig, ax


def _save(fig, path):
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)  # figures are not freed otherwise; long runs would leak memory


def plot_roc(y_true, y_score, task, path, title=""):
    """Write a ROC-curve PNG (one curve, or one per class / label); returns the plotted AUC."""
    task, y, s = _prepare(y_true, y_score, task)
    fig, ax = _new_axes(title)
    if task == BINARY:
        curves = [("", y, s)]
    elif task == MULTI_CLASS:
        curves = [(f"class {c}", y == c, s[:, c]) for c in range(s.shape[1])]
    else:
        curves = [(f"label {j}", y[:, j], s[:, j]) for j in range(s.shape[1])]
    for name, yt, sc in curves:
        fpr, tpr, _ = roc_curve(yt, sc)
        label = f"{name} AUC={roc_auc_score(yt, sc):.3f}".strip()
        ax.plot(fpr, tpr, lw=1, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    overall = _auc(y, s, task)
    # Many labels (e.g. ChestMNIST's 14) need a small legend font to stay readable.
    legend_title = None if task == BINARY else f"macro AUC={overall:.3f}"
    ax.legend(loc="lower right", fontsize=6 if len(curves) > 4 else 8, title=legend_title,
              title_fontsize=7)
    _save(fig, path)
    return overall


def plot_confusion(cm, path, class_names=None, title=""):
    """Write a confusion-matrix heatmap PNG with counts in the cells.

    A (L, 2, 2) multi-label stack is drawn as one L x 4 table, a row per label with the
    columns TN, FP, FN, TP (sklearn's [[TN, FP], [FN, TP]] order flattened), which keeps a
    single readable heatmap instead of a grid of tiny plots.
    """
    cm = np.asarray(cm)
    if cm.ndim == 3:
        data = cm.reshape(len(cm), 4)
        rows = class_names or [f"label {j}" for j in range(len(cm))]
        cols, xlabel, ylabel = ["TN", "FP", "FN", "TP"], "", "Label"
    elif cm.ndim == 2 and cm.shape[0] == cm.shape[1]:
        data = cm
        rows = cols = class_names or [str(c) for c in range(len(cm))]
        xlabel, ylabel = "Predicted", "True"
    else:
        raise ValueError(f"cm must be (C, C) or (L, 2, 2), got {cm.shape}")
    fig, ax = _new_axes(title)
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=45 if len(cols) > 4 else 0)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # White text on dark cells so the counts stay legible.
    dark = data.max() / 2 if data.size else 0
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7,
                color="white" if v > dark else "black")
    _save(fig, path)


def knn_scores(memory, memory_labels, queries, k, task, n_classes):
    """Class scores of `queries` from their k nearest `memory` features by cosine similarity: the
    mean one-hot (or multi-hot) label of the neighbours. Written in torch rather than with
    sklearn's KNeighborsClassifier so it runs on the features' device in one matmul, and treats
    single- and multi-label data alike."""
    import torch
    memory = torch.nn.functional.normalize(memory.float(), dim=1)
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    labels = memory_labels.float() if task == MULTI_LABEL else \
        torch.nn.functional.one_hot(memory_labels.long(), n_classes).float()
    k = min(k, len(memory))
    scores = []
    for i in range(0, len(queries), 1024):  # chunks keep the similarity matrix small
        nearest = (queries[i:i + 1024] @ memory.T).topk(k, dim=1).indices
        scores.append(labels[nearest].mean(dim=1))
    return torch.cat(scores).cpu().numpy()


def plot_lr_range(lrs, losses, chosen, path, title="LR range test"):
    """Write the LR range test's curve (loss against lr, log scale) with the chosen lr marked."""
    fig, ax = _new_axes(title)
    ax.plot(lrs, losses, lw=1)
    ax.axvline(chosen, color="r", ls="--", lw=0.8, label=f"chosen lr {chosen:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def compare_samples(a, b):
    """Two samples of a metric (e.g. per-seed test AUCs of two methods) side by side: means, sample
    stds, Welch's t-test (unequal variances) and the two-sided Mann-Whitney U test, via scipy.
    p-values are None when a test is undefined (fewer than 2 values a side; no variance at all)."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    out = {"n_a": int(a.size), "n_b": int(b.size), "mean_a": mean_a, "std_a": std_a, "mean_b": mean_b,
           "std_b": std_b, "diff": mean_b - mean_a, "welch_t": None, "welch_p": None, "mwu_u": None, "mwu_p": None}
    if min(a.size, b.size) < 2:
        return out
    if np.ptp(a) + np.ptp(b) > 0:  # exactly constant samples have no t statistic
        t = stats.ttest_ind(a, b, equal_var=False)
        out["welch_t"], out["welch_p"] = float(t.statistic), float(t.pvalue)
    u = stats.mannwhitneyu(a, b, alternative="two-sided")
    out["mwu_u"], out["mwu_p"] = float(u.statistic), float(u.pvalue)
    return out


# ---------------------------------------------------------------- one evaluation's outputs
def write_results(out, header, per_seed, y_true, scores, task, first_seed, title):
    """What evaluate.py and finetune_beit.py leave in `out`: metrics.json (header, mean / std over
    seeds, per-seed results), predictions.npz (test labels and scores of every seed), roc.png and
    confusion.png of the first seed, and a printed summary; metrics.json is written last (a directory
    holding it is a finished run). Returns the metrics.json dict."""
    import json

    from common.rundir import atomic_write_text
    names = list(per_seed[0]["test"])
    summary = {k: mean_std([r["test"][k] for r in per_seed]) for k in names}
    ci = bootstrap_auc_ci(y_true, scores[0], task, seed=first_seed)
    result = {**header, "task": task, "n": len(per_seed), "mean": {k: m for k, (m, s) in summary.items()},
              "std": {k: s for k, (m, s) in summary.items()}, "auc_ci95_first_seed": list(ci),
              "per_seed": per_seed}
    np.savez(os.path.join(out, "predictions.npz"), y_true=y_true, y_score=scores[0],
             y_score_per_seed=np.stack(scores), seeds=np.array([r["seed"] for r in per_seed]))
    plot_roc(y_true, scores[0], task, os.path.join(out, "roc.png"), title=title)
    plot_confusion(confusion(y_true, scores[0], task), os.path.join(out, "confusion.png"), title=title)
    print(f"\n{title} test, n={len(per_seed)} seeds")
    for k in names:
        print(f"  {k:12s} {summary[k][0]:.4f} ± {summary[k][1]:.4f}")
    print(f"  AUC 95% CI (bootstrap, seed {first_seed}): [{ci[0]:.4f}, {ci[1]:.4f}]")
    # last, atomically: a directory holding metrics.json is a finished run
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(result, indent=2))
    print(f"wrote {out}/metrics.json")
    return result
