"""Classification metrics for MedMNIST tasks (numpy in, python floats / numpy arrays out).

Task strings are medmnist's ``INFO[flag]["task"]`` values. AUC and ACC follow medmnist's
own ``getAUC`` / ``getACC`` definitions so numbers are comparable with the MedMNIST benchmark;
AUC is always computed from continuous scores, never from thresholded predictions.
"""
import os
import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
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


def _rank_auc(y, s, task):
    """The same AUC as _auc from mid-ranks (the Mann-Whitney form, ties counting 1/2), every column at
    once: ~50x faster than a roc_auc_score call per class, for the bootstrap's thousands of resamples."""
    from scipy.stats import rankdata
    if task == BINARY:
        y, s = y[:, None], s[:, None]
    elif task == MULTI_CLASS:
        y = y[:, None] == np.arange(s.shape[1])
    y = y.astype(bool)
    m = y.sum(axis=0)
    rank_sum = np.where(y, rankdata(s, axis=0), 0.0).sum(axis=0)
    return float(np.mean((rank_sum - m * (m + 1) / 2) / (m * (len(y) - m))))


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


# ---------------------------------------------------------------- imbalance and the decision threshold
def balanced_accuracy(y_true, y_score, task, threshold=0.5):
    """Mean recall over classes at the hard labels of hard_labels (sklearn's balanced_accuracy_score):
    0.5 for a classifier that calls every image the majority class, however imbalanced the data.
    Multi-label: the mean over labels of each label's balanced accuracy."""
    task, y, s = _prepare(y_true, y_score, task)
    pred = hard_labels(s, task, threshold)
    with warnings.catch_warnings():  # a class absent from y_true: sklearn warns and leaves it out, as intended
        warnings.simplefilter("ignore", UserWarning)
        if task == MULTI_LABEL:
            return float(np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1])]))
        return float(balanced_accuracy_score(y, pred))


def youden_threshold(y_val, val_score):
    """The decision threshold of a binary task chosen on VALIDATION scores by Youden's J: the ROC
    point (sklearn's roc_curve of the class-1 score, every distinct score a threshold) that maximises
    sensitivity + specificity - 1. J is the same whichever class is called positive (the two swap),
    so the threshold is too. Ties go to the first maximum in roc_curve's order, the highest
    threshold (the fewest class-1 calls).

    Returned as a cut on P(class 1) in this module's strict ">" convention (class 1 when the score is
    above it): halfway between the chosen ROC threshold and the next lower validation score, so that
    on validation it makes exactly that ROC point's calls and on test a score between the two goes
    to the nearer side."""
    y, s = _labels(y_val, BINARY), _scores(val_score, BINARY)
    if len(y) != len(s):
        raise ValueError(f"y_val has {len(y)} samples but val_score has {len(s)}")
    if len(np.unique(y)) < 2:
        raise ValueError("the validation split has one class only: Youden's J is undefined")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    k = int(np.argmax(tpr - fpr))
    if k == 0:  # the point "nothing is class 1" (roc_curve's threshold inf): cut at the top score
        return float(thresholds[1])
    if k == len(thresholds) - 1:  # "everything is class 1": just below the lowest score
        return float(np.nextafter(thresholds[k], -np.inf))
    return float((thresholds[k] + thresholds[k + 1]) / 2)


def threshold_metrics(y_true, y_score, threshold, positive_class=1):
    """A binary task's calls at `threshold` on P(class 1) (class 1 when the score is strictly
    above it): sensitivity (recall of `positive_class`), specificity (recall of the other class),
    their mean (balanced accuracy), and precision and F1 of `positive_class`."""
    task, y, s = _prepare(y_true, y_score, BINARY)
    if positive_class not in (0, 1):
        raise ValueError(f"positive_class of a binary task must be 0 or 1, got {positive_class!r}")
    pred = hard_labels(s, task, threshold)
    sens = float(recall_score(y, pred, pos_label=positive_class, zero_division=0))
    spec = float(recall_score(y, pred, pos_label=1 - positive_class, zero_division=0))
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2,
            "precision": float(precision_score(y, pred, pos_label=positive_class, zero_division=0)),
            "f1": float(f1_score(y, pred, pos_label=positive_class, zero_division=0))}


# ---------------------------------------------------------------- calibration
def _top_label(y, s, task):
    """(confidence, correct) of every prediction: the top-label probability and whether that label is
    the true one. Binary: max(p, 1 - p) with the call of hard_labels; multi-label: every (image,
    label) pair as one binary prediction."""
    if task == MULTI_CLASS:
        return s.max(axis=1), (s.argmax(axis=1) == y).astype(float)
    p, t = s.ravel(), y.ravel()
    return np.maximum(p, 1 - p), ((p > 0.5).astype(int) == t).astype(float)


def _calibration_bins(confidence, correct, n_bins):
    """Counts, mean confidence and accuracy per equal-width bin of [0, 1]; a confidence on an edge
    goes to the lower bin ((a, b], the first bin [0, b]), as in sklearn's calibration_curve."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], confidence)
    count = np.bincount(ids, minlength=n_bins)
    safe = np.maximum(count, 1)
    return (count, np.bincount(ids, weights=confidence, minlength=n_bins) / safe,
            np.bincount(ids, weights=correct, minlength=n_bins) / safe)


def expected_calibration_error(y_true, y_score, task, n_bins=15):
    """ECE (Guo et al. 2017, eq. 3) on the TOP-LABEL confidence: predictions are put in n_bins
    equal-width bins of confidence over [0, 1] (15 by default), and ECE is the count-weighted mean of
    |accuracy - mean confidence| over the bins. Binary: the confidence of the called class,
    max(p, 1 - p); multi-class and ordinal: the largest class probability; multi-label: every
    (image, label) pair as one binary prediction."""
    task, y, s = _prepare(y_true, y_score, task)
    count, confidence, accuracy = _calibration_bins(*_top_label(y, s, task), n_bins)
    return float(np.sum(count * np.abs(accuracy - confidence)) / count.sum())


def brier(y_true, y_score, task):
    """Brier score. Binary: mean (P(class 1) - y)^2 (sklearn's brier_score_loss of class 1);
    multi-class and ordinal: the multi-class Brier score, mean over images of sum over classes of
    (p_c - [y = c])^2 (0 to 2; Brier 1950); multi-label: the binary score over every (image, label)."""
    task, y, s = _prepare(y_true, y_score, task)
    if task == MULTI_CLASS:
        return float(np.mean(np.sum((s - np.eye(s.shape[1])[y]) ** 2, axis=1)))
    return float(np.mean((s - y) ** 2))


def _logits(y_score, task):
    """Logits whose softmax (sigmoid, multi-label) gives the scores back: log p for class
    probabilities (a binary P(class 1) as the two columns 1 - p, p), log-odds per label. Clipped
    away from 0 and 1: kNN scores hold exact zeros."""
    s = np.clip(_scores(y_score, task), 1e-12, 1 - 1e-12)
    if task == BINARY:
        return np.log(np.stack([1 - s, s], axis=1))
    return np.log(s) - np.log1p(-s) if task == MULTI_LABEL else np.log(s)


def _nll(y, z, task):
    """Mean negative log-likelihood of labels y under logits z (cross-entropy; per-label binary
    cross-entropy for multi-label)."""
    from scipy.special import log_softmax
    if task == MULTI_LABEL:
        return float(np.mean(np.logaddexp(0, z) - y * z))  # -log sigmoid(z) for y = 1, -log(1 - sigmoid(z)) for 0
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(y)), y]))


def fit_temperature(y_val, val_score, task):
    """Temperature scaling (Guo et al. 2017, sec. 4.2): the T > 0 that minimises the validation NLL
    of softmax(logits / T) (sigmoid per label, multi-label), with logits = log p of the scores
    (_logits). Searched on log T in [-4, 4] (T from 0.018 to 55) by scipy's bounded Brent method; T > 1
    softens over-confident scores. Accuracy and AUC are unchanged by it."""
    from scipy.optimize import minimize_scalar
    task, y, _ = _prepare(y_val, val_score, task)
    z = _logits(val_score, task)
    fit = minimize_scalar(lambda log_t: _nll(y, z / np.exp(log_t), task), bounds=(-4.0, 4.0), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(fit.x))


def apply_temperature(y_score, temperature, task):
    """Scores rescaled by a temperature from fit_temperature, in the shape given: softmax(log p / T)
    ((N,), (N, 1) or (N, 2) binary scores keep their shape), sigmoid(log-odds / T) per label."""
    from scipy.special import expit, softmax
    if not temperature > 0:
        raise ValueError(f"the temperature must be > 0, got {temperature!r}")
    task = _check_task(task)
    z = _logits(y_score, task) / temperature
    if task == MULTI_LABEL:
        return expit(z)
    p = softmax(z, axis=1)
    if task == BINARY:
        shape = np.shape(y_score)
        return p if len(shape) == 2 and shape[1] == 2 else p[:, 1].reshape(shape)
    return p


# ---------------------------------------------------------------- one seed's test metrics
THRESHOLD_KEYS = ("threshold", "sensitivity_at_threshold", "specificity_at_threshold",
                  "balanced_accuracy_at_threshold", "precision_at_threshold", "f1_at_threshold")


def evaluation_metrics(y_true, y_score, task, positive_class=1, y_val=None, val_score=None):
    """One seed's test metrics, a flat dict of floats: classification_metrics (at 0.5 / argmax) plus
    balanced_accuracy, ece (15 bins, top-label) and brier. For a binary task given the validation
    labels and scores also the threshold chosen on validation by Youden's J (youden_threshold, a cut
    on P(class 1)) and, on the test split at it, sensitivity_at_threshold, specificity_at_threshold,
    balanced_accuracy_at_threshold, precision_at_threshold and f1_at_threshold (of
    `positive_class`); left out when the validation split has one class only."""
    if (y_val is None) != (val_score is None):
        raise ValueError("give both y_val and val_score, or neither")
    out = classification_metrics(y_true, y_score, task, positive_class)
    out["balanced_accuracy"] = balanced_accuracy(y_true, y_score, task)
    out["ece"] = expected_calibration_error(y_true, y_score, task)
    out["brier"] = brier(y_true, y_score, task)
    if _check_task(task) == BINARY and y_val is not None and len(np.unique(_labels(y_val, BINARY))) == 2:
        t = youden_threshold(y_val, val_score)
        at = threshold_metrics(y_true, y_score, t, positive_class)
        out["threshold"] = t
        out.update({f"{k}_at_threshold": v for k, v in at.items()})
    return out


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


def _resamples(y, task, k, n_boot, rng):
    """n_boot bootstrap index arrays of the test samples (with replacement) on which every AUC is
    defined. Resamples missing a class (or a label with only one value) are REDRAWN rather than
    skipped, so an interval always rests on exactly n_boot replicates; the cap stops an endless loop
    on tiny sets where a valid resample is very unlikely."""
    n, kept, draws, max_draws = len(y), 0, 0, 20 * n_boot + 100
    while kept < n_boot:
        if draws >= max_draws:
            raise ValueError(f"only {kept} of {n_boot} resamples had every class present")
        draws += 1
        idx = rng.integers(0, n, size=n)
        if _auc_defined(y[idx], task, k):
            kept += 1
            yield idx


def bootstrap_auc_ci(y_true, y_score, task, n_boot=1000, seed=0, alpha=0.05):
    """Percentile bootstrap (1 - alpha) CI of the AUC, resampling test samples with replacement."""
    task, y, s = _prepare(y_true, y_score, task)
    k = _n_classes(s, task)
    if not _auc_defined(y, task, k):
        raise ValueError("AUC is undefined on the full set: some class/label has one value only")
    # mid-rank AUCs: 0.3 s for 1,000 resamples of 624 test images on one CPU thread, 5.0 s by roc_auc_score
    aucs = [_rank_auc(y[idx], s[idx], task) for idx in _resamples(y, task, k, n_boot, np.random.default_rng(seed))]
    low, high = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def mean_std(values):
    """Mean and sample std (ddof=1) over runs/seeds; std is 0.0 for a single value."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


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


def mwu_min_p(n_a, n_b):
    """The smallest two-sided p the exact Mann-Whitney U test can give for samples of n_a and n_b
    values: 2 / C(n_a + n_b, n_a), both extreme orderings (capped at 1). With 3 seeds a side it is
    0.1, so no difference can reach p < 0.05; 4 a side reach 0.029. (scipy falls back to the normal
    approximation when values tie, which can print a p below this bound.) None when a side is empty."""
    from math import comb
    if min(n_a, n_b) < 1:
        return None
    return min(1.0, 2 / comb(n_a + n_b, n_a))


def compare_samples(a, b):
    """Two samples of a metric (e.g. per-seed test AUCs of two methods) side by side: means, sample
    stds, Welch's t-test (unequal variances) with its 95% confidence interval of the difference of
    means b - a (diff_ci95_low, diff_ci95_high), and the two-sided Mann-Whitney U test with the
    smallest p its exact form can reach at these sizes (mwu_min_p), via scipy. p-values and the
    interval are None when a test is undefined (fewer than 2 values a side; no variance at all)."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    out = {"n_a": int(a.size), "n_b": int(b.size), "mean_a": mean_a, "std_a": std_a, "mean_b": mean_b,
           "std_b": std_b, "diff": mean_b - mean_a, "welch_t": None, "welch_p": None, "diff_ci95_low": None,
           "diff_ci95_high": None, "mwu_u": None, "mwu_p": None, "mwu_min_p": mwu_min_p(a.size, b.size)}
    if min(a.size, b.size) < 2:
        return out
    if np.ptp(a) + np.ptp(b) > 0:  # exactly constant samples have no t statistic
        with warnings.catch_warnings():
            # one exactly constant side (a fixed encoder's probe) has variance 0, which is exact; scipy's
            # "precision loss" warning is meant for values that only nearly agree
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            t = stats.ttest_ind(a, b, equal_var=False)
            # the interval of b - a: the same test with the samples swapped (Welch-Satterthwaite df)
            ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
        out["welch_t"], out["welch_p"] = float(t.statistic), float(t.pvalue)
        out["diff_ci95_low"], out["diff_ci95_high"] = float(ci.low), float(ci.high)
    u = stats.mannwhitneyu(a, b, alternative="two-sided")
    out["mwu_u"], out["mwu_p"] = float(u.statistic), float(u.pvalue)
    return out


def compare_pairs(a, b):
    """Paired samples of a metric (a[i] and b[i] from the same unit, e.g. one pretraining run evaluated
    two ways): the mean of the differences b - a, their sample std, the paired t-test with its 95%
    interval of the mean difference (scipy's ttest_rel), and in how many pairs b is higher. p and the
    interval are None with fewer than 2 pairs or differences without variance."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.size != b.size:
        raise ValueError(f"paired samples need one value each per pair, got {a.size} and {b.size}")
    d = b - a
    mean, std = mean_std(d) if d.size else (float("nan"), 0.0)
    out = {"n": int(d.size), "diff": mean, "std": std, "b_higher": int((d > 0).sum()), "t": None, "p": None,
           "ci95_low": None, "ci95_high": None}
    if d.size >= 2 and np.ptp(d) > 0:
        t = stats.ttest_rel(b, a)
        ci = t.confidence_interval(0.95)
        out.update(t=float(t.statistic), p=float(t.pvalue), ci95_low=float(ci.low), ci95_high=float(ci.high))
    return out


# ---------------------------------------------------------------- paired tests on the same test images
def delong_test(y_true, score_a, score_b, alpha=0.05):
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated ROC AUCs: two binary classifiers
    scored on the SAME test images. Placement values V10 (per positive: the share of negatives it
    outranks, ties 1/2) and V01 (per negative: the share of positives that outrank it) give each
    AUC's variance and their covariance, S = S10 / m + S01 / n (m positives, n negatives; sample
    covariances); computed from mid-ranks with Sun & Xu's (2014) fast algorithm. AUCs are of
    P(class 1), which is also the AUC of class 0 on 1 - P(class 1).

    Returns auc_a, auc_b, diff = auc_b - auc_a, se (its standard error), ci_low / ci_high (normal
    1 - alpha interval of diff), z, p (two-sided), var_a, var_b, cov_ab, method. z and p are None
    when se is 0 but diff is not (p is 1 when both are 0: the same ranking)."""
    from scipy.stats import norm, rankdata
    y = _labels(y_true, BINARY)
    sa, sb = _scores(score_a, BINARY), _scores(score_b, BINARY)
    if not len(y) == len(sa) == len(sb):
        raise ValueError(f"y_true, score_a and score_b have {len(y)}, {len(sa)} and {len(sb)} samples")
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if min(m, n) < 2:
        raise ValueError(f"DeLong's test needs at least 2 images of each class, got {m} and {n}")
    aucs, v10, v01 = [], [], []
    for s in (sa, sb):
        x, z = s[pos], s[~pos]
        rank_all = rankdata(np.concatenate([x, z]))  # mid-ranks: a tie counts 1/2 each way
        v10.append((rank_all[:m] - rankdata(x)) / n)
        v01.append(1 - (rank_all[m:] - rankdata(z)) / m)
        aucs.append(float(v10[-1].mean()))
    cov = np.cov(np.stack(v10)) / m + np.cov(np.stack(v01)) / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se, diff = float(np.sqrt(max(var, 0.0))), aucs[1] - aucs[0]
    half = float(norm.ppf(1 - alpha / 2)) * se
    z_value = diff / se if se > 0 else None
    p = float(2 * norm.sf(abs(z_value))) if se > 0 else (1.0 if diff == 0 else None)
    return {"auc_a": aucs[0], "auc_b": aucs[1], "diff": diff, "se": se, "ci_low": diff - half,
            "ci_high": diff + half, "z": z_value, "p": p, "var_a": float(cov[0, 0]), "var_b": float(cov[1, 1]),
            "cov_ab": float(cov[0, 1]), "method": "DeLong"}


def paired_bootstrap_auc(y_true, score_a, score_b, task, n_boot=1000, seed=0, alpha=0.05):
    """Paired bootstrap of the AUC difference of two classifiers scored on the SAME test images, any
    task: the images are resampled with replacement (seeded; a resample that leaves a class or label
    without both values is redrawn) and both AUCs computed on each resample. Returns auc_a, auc_b,
    diff = auc_b - auc_a, the percentile (1 - alpha) interval ci_low / ci_high, p (two-sided: twice
    the smaller share of resampled differences on either side of 0, with the (count + 1) / (n_boot
    + 1) correction, so never below 2 / (n_boot + 1)), n_boot, method."""
    task, y, sa = _prepare(y_true, score_a, task)
    _, _, sb = _prepare(y_true, score_b, task)
    if sa.shape != sb.shape:
        raise ValueError(f"score_a and score_b differ in shape: {sa.shape} and {sb.shape}")
    k = _n_classes(sa, task)
    if not _auc_defined(y, task, k):
        raise ValueError("AUC is undefined on the full set: some class/label has one value only")
    diffs = np.array([_rank_auc(y[i], sb[i], task) - _rank_auc(y[i], sa[i], task)
                      for i in _resamples(y, task, k, n_boot, np.random.default_rng(seed))])
    low, high = np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    auc_a, auc_b = _auc(y, sa, task), _auc(y, sb, task)
    side = min(int(np.sum(diffs <= 0)), int(np.sum(diffs >= 0)))
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": auc_b - auc_a, "ci_low": float(low), "ci_high": float(high),
            "p": min(1.0, 2 * (side + 1) / (n_boot + 1)), "n_boot": int(n_boot), "method": "paired bootstrap"}


def paired_auc_test(y_true, score_a, score_b, task, seed=0):
    """The paired test of two classifiers' AUCs on the same test images: DeLong's test for a binary
    task, the paired bootstrap (1000 resamples, `seed`) otherwise."""
    if _check_task(task) == BINARY:
        return delong_test(y_true, score_a, score_b)
    return paired_bootstrap_auc(y_true, score_a, score_b, task, seed=seed)


# ---------------------------------------------------------------- comparing evaluation runs
# What must agree between runs for their test metrics to be comparable, in the order they are checked:
# the data (its hash when both runs record one), the split and patient grouping, the image size, the
# evaluation mode, the label fraction (not few-shot), the shots (few-shot), the probe (linear probe),
# the upsampling and, for binary tasks, the positive class. The encoder is what is compared.
PROTOCOL_FIELDS = ("data", "split", "grouping", "size", "mode", "label_fraction", "shots", "probe", "resize",
                   "positive_class")
# How a fine-tuned (or SGD-probed) model trains: what must also agree where a comparison is about the
# encoder alone, e.g. several pretraining runs of one study fine-tuned by one protocol. A logistic-
# regression probe trains by none of them.
TRAINING_FIELDS = ("epochs", "batch_size", "lr", "lr_schedule", "weight_decay", "freeze", "layer_decay", "frozen_bn",
                   "precise_bn", "head_epochs", "head_lr", "val_every", "train_aug", "tta", "class_weight", "max_steps")


def _protocol_value(run, field):
    """(known, value) of one protocol field of a metrics.json dict; a field a run does not record
    (an older run, another script) is unknown and not compared."""
    args, mode = run.get("args") or {}, run.get("mode")
    if field in ("data", "data_hash", "split", "grouping", "size", "mode"):
        return field in run, run.get(field)
    if field == "positive_class":
        known = isinstance(run.get("positive_class"), dict)
        return known, run["positive_class"].get("index") if known else None
    # shots only matter to few-shot (which ignores the label fraction), the probe only to a linear probe
    if (field == "shots" and mode != "fewshot") or (field == "label_fraction" and mode == "fewshot") \
            or (field == "probe" and mode != "linear_probe"):
        return False, None
    if field in TRAINING_FIELDS and mode == "linear_probe" and args.get("probe", "logreg") == "logreg":
        return False, None
    return field in args, args.get(field)


def protocol_mismatches(run_a, run_b, fields=PROTOCOL_FIELDS):
    """[(field, value in run_a, value in run_b)] for every entry of `fields` (PROTOCOL_FIELDS, and
    TRAINING_FIELDS where the training must agree too) in which two metrics.json dicts differ; fields
    either run does not record are skipped. The data is compared by its hash (field "data_hash") when
    both runs record one, else by name."""
    found = []
    for field in fields:
        if field == "data" and "data_hash" in run_a and "data_hash" in run_b:
            field = "data_hash"
        (known_a, a), (known_b, b) = _protocol_value(run_a, field), _protocol_value(run_b, field)
        if known_a and known_b and a != b:
            found.append((field, a, b))
    return found


def group_mismatches(runs_a, runs_b, fields=PROTOCOL_FIELDS):
    """Mismatches in `fields` of two groups of runs (metrics.json dicts) to be compared: every run of
    either group against the first run of group A. [(field, its value there, the other value, index
    of the other run in runs_a + runs_b)], one entry per field (its first occurrence)."""
    runs = list(runs_a) + list(runs_b)
    found = {}
    for i, run in enumerate(runs[1:], start=1):
        for field, a, b in protocol_mismatches(runs[0], run, fields):
            found.setdefault(field, (field, a, b, i))
    return [found[f] for f in sorted(found, key=lambda f: fields.index("data" if f == "data_hash" else f))]


def _encoder_name(encoder):
    """random / imagenet as they are; a checkpoint path by its run directory's name."""
    text = str(encoder)
    if text.endswith((".pt", ".pth", ".ckpt")):
        return os.path.basename(os.path.dirname(os.path.abspath(text))) or text
    return text


def group_name(runs, paths=()):
    """A short name of a group of runs from their metrics.json dicts: encoder, mode (with the probe or
    the shots), data and size, label fraction, e.g. "byol-cpu, linear_probe (logreg), pneumoniamnist
    28 px, label fraction 1.0". Several encoders (pretraining seeds) read as their common prefix and
    "*"; runs that record none of these are named by their folders (`paths`)."""
    def values(get):
        return list(dict.fromkeys(v for v in map(get, runs) if v is not None))

    encoders = values(lambda r: _encoder_name(r["encoder"]) if r.get("encoder") is not None else None)
    parts = []
    if len(encoders) == 1:
        parts.append(encoders[0])
    elif encoders:
        prefix = os.path.commonprefix(encoders)
        parts.append(f"{prefix}* ({len(encoders)} encoders)" if prefix else f"{len(encoders)} encoders")
    for mode in values(lambda r: r.get("mode")):
        args = runs[0].get("args") or {}
        extra = {"linear_probe": args.get("probe"), "fewshot": args.get("shots") and f"{args['shots']} shots"}.get(mode)
        parts.append(f"{mode} ({extra})" if extra else str(mode))
    data, size = values(lambda r: r.get("data")), values(lambda r: r.get("size"))
    if data:
        parts.append("/".join(map(str, data)) + (f" {'/'.join(map(str, size))} px" if size else ""))
    fractions = values(lambda r: (r.get("args") or {}).get("label_fraction") if r.get("mode") != "fewshot" else None)
    if fractions:
        parts.append("label fraction " + "/".join(map(str, fractions)))
    if parts:
        return ", ".join(parts)
    folders = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    return ", ".join(dict.fromkeys(folders)) or "runs"


def read_predictions(folder):
    """(y_true, scores of every seed (S, N, ...)) of the predictions.npz in a run folder, as
    write_results leaves it (y_score alone in files without y_score_per_seed). Raises OSError or
    ValueError when it is missing or unreadable."""
    import zipfile
    path = os.path.join(folder, "predictions.npz")
    try:
        with np.load(path) as p:
            y = p["y_true"]
            scores = p["y_score_per_seed"] if "y_score_per_seed" in p else p["y_score"][None]
    except (KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a predictions.npz of an evaluation ({e})")
    return np.asarray(y), np.asarray(scores, dtype=float)


def paired_runs_test(group_a, group_b, seed=0):
    """The paired test of two groups of runs on their test images, each group = [(metrics.json dict,
    run folder)]. Only when every run scored the same test images: one data hash (where recorded)
    and identical y_true in every predictions.npz. Each group's scores are averaged over all its
    seeds and runs (an ensemble: its AUC can exceed the per-seed mean), then paired_auc_test.
    Returns (result, None), the result with n_images, n_scores_a / n_scores_b (seeds averaged), or
    (None, why not)."""
    runs = [run for run, _ in list(group_a) + list(group_b)]
    hashes = {run.get("data_hash") for run in runs if run.get("data_hash") is not None}
    if len(hashes) > 1:
        return None, "the runs were scored on different data (data_hash)"
    tasks = {run.get("task") for run in runs}
    if len(tasks) != 1 or None in tasks:
        return None, "the runs' metrics.json do not name one task"
    task = tasks.pop()
    y_ref, stacks = None, ([], [])
    for side, group in enumerate((group_a, group_b)):
        for _, folder in group:
            try:
                y, scores = read_predictions(folder)
            except (OSError, ValueError) as e:
                return None, f"no readable predictions.npz in {folder} ({getattr(e, 'strerror', None) or e})"
            if y_ref is None:
                y_ref = y
            elif y.shape != y_ref.shape or not np.array_equal(y, y_ref):
                return None, f"{folder} has other test labels (y_true) than {group_a[0][1]}: not the same test images"
            stacks[side].append(scores)
    a, b = np.concatenate(stacks[0]), np.concatenate(stacks[1])
    if a.shape[1:] != b.shape[1:]:
        return None, f"the groups' scores differ in shape ({a.shape[1:]} and {b.shape[1:]})"
    try:
        result = paired_auc_test(y_ref, a.mean(axis=0), b.mean(axis=0), task, seed=seed)
    except ValueError as e:
        return None, str(e)
    return {**result, "task": task, "n_images": int(len(y_ref)), "n_scores_a": int(len(a)),
            "n_scores_b": int(len(b))}, None
