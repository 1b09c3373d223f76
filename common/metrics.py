"""Classification metrics for MedMNIST tasks (numpy in, python floats / numpy arrays out).

Task strings are medmnist's ``INFO[flag]["task"]`` values. AUC and ACC follow medmnist's
own ``getAUC`` / ``getACC`` definitions so numbers are comparable with the MedMNIST benchmark;
AUC is always computed from continuous scores, never from thresholded predictions.
"""
import os
import warnings

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


def class_names_from_info(label):
    """medmnist INFO's `label` mapping ({"0": "malignant", "1": "normal, benign"}) -> names by index."""
    return [label[str(i)] for i in range(len(label))]


def positive_index(value, class_names=None):
    """The positive class of a binary task as an index: an int, an int as text, or a class name
    (matched case-insensitively). Raises ValueError naming the accepted values."""
    names = list(class_names) if class_names else ["0", "1"]
    text = str(value).strip()
    if text in ("0", "1"):
        return int(text)
    matches = [i for i, n in enumerate(names) if n.lower() == text.lower()]
    if len(matches) != 1:
        choices = ", ".join(f"{i} ({n!r})" for i, n in enumerate(names))
        raise ValueError(f"positive class {value!r} is not a class of this binary task; choose {choices}")
    return matches[0]


def _names(class_names, n, task):
    if class_names is not None:
        if len(class_names) != n:
            raise ValueError(f"{len(class_names)} class names given for {n} classes/labels")
        return [str(c) for c in class_names]
    return [f"label {j}" if task == MULTI_LABEL else str(j) for j in range(n)]


def classification_metrics(y_true, y_score, task, positive_class=1):
    """Flat dict of floats: auc, acc, precision, recall, f1, weighted_f1; binary tasks add
    sensitivity and specificity. Binary precision / recall / F1 / sensitivity are those of
    `positive_class` (default 1, medmnist's last column: in BreastMNIST that is "normal, benign",
    so pass 0 to read them for malignancy); specificity is the recall of the other class. AUC and
    ACC do not depend on the choice. Multi-class / multi-label: macro averages (per_class_metrics
    gives each class's)."""
    task, y, s = _prepare(y_true, y_score, task)
    pred = hard_labels(s, task)
    if task != BINARY:
        return {
            "auc": _auc(y, s, task),
            "acc": acc(y, s, task),
            "precision": float(precision_score(y, pred, average="macro", zero_division=0)),
            "recall": float(recall_score(y, pred, average="macro", zero_division=0)),
            "f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        }
    if positive_class not in (0, 1):
        raise ValueError(f"positive_class of a binary task must be 0 or 1, got {positive_class!r}")
    negative = 1 - positive_class
    return {
        "auc": _auc(y, s, task),
        "acc": acc(y, s, task),
        "precision": float(precision_score(y, pred, pos_label=positive_class, zero_division=0)),
        "recall": float(recall_score(y, pred, pos_label=positive_class, zero_division=0)),
        "f1": float(f1_score(y, pred, pos_label=positive_class, zero_division=0)),
        "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        # sensitivity = recall of the positive class, specificity = recall of the negative one
        "sensitivity": float(recall_score(y, pred, pos_label=positive_class, zero_division=0)),
        "specificity": float(recall_score(y, pred, pos_label=negative, zero_division=0)),
    }


def per_class_metrics(y_true, y_score, task, class_names=None):
    """{class or label name: {precision, recall, f1, support}} at the same hard labels as
    classification_metrics (binary: both classes, so the minority class is visible too)."""
    task, y, s = _prepare(y_true, y_score, task)
    pred = hard_labels(s, task)
    n = _n_classes(s, task)
    names = _names(class_names, n, task)
    if task == MULTI_LABEL:
        cols = [(y[:, j], pred[:, j], 1) for j in range(n)]
    else:
        cols = [(y, pred, c) for c in range(n)]
    out = {}
    for name, (yt, pr, c) in zip(names, cols):
        out[name] = {"precision": float(precision_score(yt, pr, labels=[c], average="macro", zero_division=0)),
                     "recall": float(recall_score(yt, pr, labels=[c], average="macro", zero_division=0)),
                     "f1": float(f1_score(yt, pr, labels=[c], average="macro", zero_division=0)),
                     "support": int(np.sum(yt == c))}
    return out


def confusion(y_true, y_score, task):
    """(C, C) confusion matrix (rows = true, cols = predicted), or (L, 2, 2) for multi-label."""
    task, y, s = _prepare(y_true, y_score, task)
    pred = hard_labels(s, task)
    if task == MULTI_LABEL:
        return multilabel_confusion_matrix(y, pred)
    # Fixed labels keep the shape (C, C) even if a class is never predicted or never present.
    return confusion_matrix(y, pred, labels=list(range(_n_classes(s, task))))


def confusion_table(cm, class_names=None):
    """A (C, C) confusion matrix as Markdown lines: counts with the row percentage (the share of
    that true class given each prediction, so the diagonal reads as each class's recall)."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_table needs a (C, C) matrix, got {cm.shape}")
    names = _names(class_names, len(cm), MULTI_CLASS)
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{cm[i, j]} ({pct[i, j]:.0f}%)" for j in range(len(names))) + " |")
    return lines


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


def wrap(text, width=48):
    """A title broken into lines of at most `width` characters, so it fits above a small plot."""
    import textwrap
    return "\n".join(textwrap.wrap(str(text), width)) if text else ""


def _new_axes(title, size=(4.5, 4.2)):
    fig, ax = plt.subplots(figsize=size, dpi=110)
    if title:
        ax.set_title(wrap(title, int(11 * size[0])), fontsize=9)
    return fig, ax


def _save(fig, path):
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    # "tight" grows the canvas to what is drawn: a long title or a legend below the axes is kept whole
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)  # figures are not freed otherwise; long runs would leak memory


def legend_below(ax, n_entries, fontsize=7):
    """A legend under the axes, off the curves, in up to 3 columns."""
    ncol = 1 if n_entries <= 3 else (2 if n_entries <= 8 else 3)
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=fontsize,
                     frameon=False)


def integer_epochs(ax):
    """Epoch axes tick at whole epochs only (a 3-epoch run otherwise gets 0.5, 1.5, ...). Call it
    after plotting: a single epoch is widened to one epoch each side, where MaxNLocator alone would
    fall back to fractional ticks."""
    from matplotlib.ticker import MaxNLocator
    lo, hi = ax.get_xlim()
    if hi - lo < 2:
        middle = round((lo + hi) / 2)
        ax.set_xlim(middle - 1, middle + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def log_scale_needed(values, ratio=30.0):
    """True when positive values span more than `ratio` (BYOL ~2 and Barlow Twins ~560 on one axis)."""
    v = np.asarray([x for x in np.ravel(values) if np.isfinite(x)], dtype=float)
    return bool(v.size and v.min() > 0 and v.max() / v.min() > ratio)


def plot_roc(y_true, y_score, task, path, title="", class_names=None, positive_class=1):
    """Write a ROC-curve PNG (the positive class's curve for a binary task, else one per class /
    label with its name); returns the plotted AUC. The legend sits below the axes."""
    task, y, s = _prepare(y_true, y_score, task)
    fig, ax = _new_axes(title)
    if task == BINARY:
        names = _names(class_names, 2, task)
        pos = positive_class
        curves = [(f"{names[pos]} (positive class)", y == pos, s if pos == 1 else 1 - s)]
    else:
        names = _names(class_names, s.shape[1], task)
        target = (lambda j: y[:, j]) if task == MULTI_LABEL else (lambda j: y == j)
        curves = [(names[j], target(j), s[:, j]) for j in range(s.shape[1])]
    if len(curves) > 10:  # matplotlib's default cycle repeats after 10 colours
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for name, yt, sc in curves:
        fpr, tpr, _ = roc_curve(yt, sc)
        ax.plot(fpr, tpr, lw=1.2, label=f"{name}: AUC {roc_auc_score(yt, sc):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    overall = _auc(y, s, task)
    if task != BINARY:
        ax.text(0.98, 0.02, f"macro AUC {overall:.3f}", ha="right", va="bottom", fontsize=8, transform=ax.transAxes)
    legend_below(ax, len(curves))
    _save(fig, path)
    return overall


def plot_confusion(cm, path, class_names=None, title=""):
    """Write a confusion-matrix heatmap PNG: each cell shows its count and its row percentage
    (true class = row, so the diagonal is each class's recall), coloured by that percentage so a
    small class's errors are as visible as a large one's; class names on both axes.

    A (L, 2, 2) multi-label stack is drawn as one L x 4 table, a row per label with the
    columns TN, FP, FN, TP (sklearn's [[TN, FP], [FN, TP]] order flattened), which keeps a
    single readable heatmap instead of a grid of tiny plots.
    """
    import textwrap
    cm = np.asarray(cm)
    if cm.ndim == 3:
        data = cm.reshape(len(cm), 4)
        rows = _names(class_names, len(cm), MULTI_LABEL)
        cols, xlabel, ylabel = ["TN", "FP", "FN", "TP"], "", "label"
    elif cm.ndim == 2 and cm.shape[0] == cm.shape[1]:
        data = cm
        rows = cols = _names(class_names, len(cm), MULTI_CLASS)
        xlabel, ylabel = "predicted class", "true class"
    else:
        raise ValueError(f"cm must be (C, C) or (L, 2, 2), got {cm.shape}")
    totals = data.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * data, totals, out=np.zeros(data.shape), where=totals > 0)
    side = max(4.0, 0.75 * max(len(cols), len(rows)) + 2)
    fig, ax = _new_axes(title, size=(side + 0.8, side))
    image = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("% of the true class (row)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    short = lambda names: ["\n".join(textwrap.wrap(n, 14, break_long_words=False)) for n in names]  # noqa: E731
    ax.set_xticks(range(len(cols)), short(cols), fontsize=7, rotation=45 if len(cols) > 4 else 0,
                  ha="right" if len(cols) > 4 else "center")
    ax.set_yticks(range(len(rows)), short(rows), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    small = 6 if len(cols) > 6 else 8
    for (i, j), v in np.ndenumerate(data):  # white text on dark cells so the numbers stay legible
        ax.text(j, i, f"{v:g}\n{pct[i, j]:.0f}%", ha="center", va="center", fontsize=small,
                color="white" if pct[i, j] > 55 else "black")
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
    if log_scale_needed(losses):
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.grid(alpha=0.3)
    legend_below(ax, 1, fontsize=8)
    _save(fig, path)


def plot_training_curves(series, path, title="", ylabel="loss", xlabel="epoch"):
    """Write curves of per-epoch values: series = {label: (epochs, values)}, e.g. a pretraining
    run's loss and its kNN monitor AUC on two calls. Whole-epoch ticks; a log axis when the values
    span more than 30x; the legend below the axes."""
    fig, ax = _new_axes(title)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, lw=1.2, label=label)
    integer_epochs(ax)
    if log_scale_needed([v for _, ys in series.values() for v in ys]):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or any(series):
        legend_below(ax, len(series))
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
        with warnings.catch_warnings():
            # one exactly constant side (a fixed encoder's probe) has variance 0, which is exact; scipy's
            # "precision loss" warning is meant for values that only nearly agree
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            t = stats.ttest_ind(a, b, equal_var=False)
        out["welch_t"], out["welch_p"] = float(t.statistic), float(t.pvalue)
    u = stats.mannwhitneyu(a, b, alternative="two-sided")
    out["mwu_u"], out["mwu_p"] = float(u.statistic), float(u.pvalue)
    return out


# ---------------------------------------------------------------- one evaluation's outputs
def write_results(out, header, per_seed, y_true, scores, task, first_seed, title, class_names=None,
                  positive_class=1):
    """What evaluate.py and finetune_beit.py leave in `out`: metrics.json (header, mean / std over
    seeds, per-seed results, the first seed's per-class metrics and confusion matrix with the class
    names, and for binary tasks which class is positive), predictions.npz (test labels and scores of
    every seed), roc.png and confusion.png of the first seed, and a printed summary. per_seed[i]["test"]
    should come from classification_metrics(..., positive_class) with the same positive_class.
    metrics.json is written last (a directory holding it is a finished run). Returns the metrics.json dict."""
    import json

    from common.rundir import atomic_write_text
    names = list(per_seed[0]["test"])
    summary = {k: mean_std([r["test"][k] for r in per_seed]) for k in names}
    ci = bootstrap_auc_ci(y_true, scores[0], task, seed=first_seed)
    cm = confusion(y_true, scores[0], task)
    n = len(cm) if task == MULTI_LABEL else cm.shape[0]
    labels = _names(class_names, n, task)
    result = {**header, "task": task, "n": len(per_seed), "mean": {k: m for k, (m, s) in summary.items()},
              "std": {k: s for k, (m, s) in summary.items()}, "auc_ci95_first_seed": list(ci),
              "class_names": labels,
              **({"positive_class": {"index": positive_class, "name": labels[positive_class]}} if task == BINARY else {}),
              "per_class_first_seed": per_class_metrics(y_true, scores[0], task, labels),
              "confusion_first_seed": cm.tolist(),
              "per_seed": per_seed}
    np.savez(os.path.join(out, "predictions.npz"), y_true=y_true, y_score=scores[0],
             y_score_per_seed=np.stack(scores), seeds=np.array([r["seed"] for r in per_seed]))
    plot_roc(y_true, scores[0], task, os.path.join(out, "roc.png"), title=title, class_names=labels,
             positive_class=positive_class)
    plot_confusion(cm, os.path.join(out, "confusion.png"), class_names=labels, title=title)
    print(f"\n{title} test, n={len(per_seed)} seeds"
          + (f"; positive class: {labels[positive_class]}" if task == BINARY else ""))
    for k in names:
        print(f"  {k:12s} {summary[k][0]:.4f} ± {summary[k][1]:.4f}")
    print(f"  AUC 95% CI (bootstrap, seed {first_seed}): [{ci[0]:.4f}, {ci[1]:.4f}]")
    if cm.ndim == 2:
        print("  confusion matrix (first seed; rows: true class):")
        for line in confusion_table(cm, labels):
            print("    " + line)
    # last, atomically: a directory holding metrics.json is a finished run
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(result, indent=2))
    print(f"wrote {out}/metrics.json")
    return result
