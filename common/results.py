"""What one evaluation leaves in its run directory: metrics.json, predictions.npz and the figures of
its test predictions (evaluate.py and finetune_beit.py, through common/supervised.py)."""
import json
import os

import numpy as np

from common import figures, metrics
from common.rundir import atomic_write_text


def write_results(out, header, per_seed, y_true, scores, task, first_seed, title, class_names=None,
                  positive_class=1, file_names=None):
    """What evaluate.py and finetune_beit.py leave in `out`: metrics.json (header, mean / std over
    seeds, per-seed results, the first seed's per-class metrics and confusion matrix with the class
    names, and for binary tasks which class is positive), predictions.npz (test labels and scores of
    every seed, each row's index in the test split and, where the data has them, its file names:
    `file_names`, or the header's "file_names", which stays out of metrics.json), and the figures
    (common.figures, PDF + PNG): roc (mean curve over seeds with its band, AUC mean ± std, the
    reported operating point), confusion (summed over seeds), reliability (every seed's test
    predictions pooled), and a printed summary. per_seed[i]["test"] should come from
    evaluation_metrics (or classification_metrics) with the same positive_class; balanced accuracy,
    ECE and Brier are added from the seed's scores where it lacks them. A key only some seeds have
    (the validation threshold of a resumed older run) is averaged over those seeds. metrics.json is
    written last (a directory holding it is a finished run). Returns the metrics.json dict."""
    header = dict(header)
    file_names = header.pop("file_names", None) if file_names is None else file_names
    header.pop("file_names", None)
    per_seed = [_with_calibration(r, y_true, sc, task) for r, sc in zip(per_seed, scores)]
    names = list(dict.fromkeys(k for r in per_seed for k in r["test"]))
    values = {k: [r["test"][k] for r in per_seed if k in r["test"]] for k in names}
    summary = {k: metrics.mean_std(v) for k, v in values.items()}
    ci = metrics.bootstrap_auc_ci(y_true, scores[0], task, seed=first_seed)
    cm = metrics.confusion(y_true, scores[0], task)
    n = len(cm) if task == metrics.MULTI_LABEL else cm.shape[0]
    labels = metrics._names(class_names, n, task)
    result = {**header, "task": task, "n": len(per_seed), "mean": {k: m for k, (m, s) in summary.items()},
              "std": {k: s for k, (m, s) in summary.items()}, "auc_ci95_first_seed": list(ci),
              "class_names": labels,
              **({"positive_class": {"index": positive_class, "name": labels[positive_class]}} if task == metrics.BINARY else {}),
              "per_class_first_seed": metrics.per_class_metrics(y_true, scores[0], task, labels),
              "confusion_first_seed": cm.tolist(),
              "per_seed": per_seed}
    rows = {"index": np.arange(len(np.asarray(y_true)))}
    if file_names is not None:
        if len(file_names) != len(rows["index"]):
            raise ValueError(f"{len(file_names)} file names for {len(rows['index'])} test images")
        rows["file_names"] = np.array([str(f) for f in file_names])
    np.savez(os.path.join(out, "predictions.npz"), y_true=y_true, y_score=scores[0],
             y_score_per_seed=np.stack(scores), seeds=np.array([r["seed"] for r in per_seed]), **rows)
    # figures: titles from the header (never a path), every seed shown
    seeds = len(scores)
    point = figures.operating_point(result["mean"], labels[positive_class], seeds) if task == metrics.BINARY else None
    figures.plot_roc(y_true, list(scores), task, os.path.join(out, "roc.png"),
                     title=figures.run_title(result, seeds, "Test ROC"), class_names=labels,
                     positive_class=positive_class, operating_point=point)
    summed = sum(metrics.confusion(y_true, s, task) for s in scores)
    call = "argmax" if metrics._check_task(task) == metrics.MULTI_CLASS else "P > 0.5"
    figures.plot_confusion(summed, os.path.join(out, "confusion.png"), class_names=labels,
                           title=figures.run_title(result, seeds, f"Test confusion ({call}"
                                                   + (f", summed over {seeds} seeds)" if seeds > 1 else ")")))
    figures.plot_reliability(np.concatenate([np.asarray(y_true)] * seeds),
                             np.concatenate([np.asarray(s) for s in scores]), task, os.path.join(out, "reliability.png"),
                             title=figures.run_title(result, seeds, "Reliability" + (f" ({seeds} seeds pooled)"
                                                                                     if seeds > 1 else "")))
    print(f"\n{title} test, n={len(per_seed)} seeds"
          + (f"; positive class: {labels[positive_class]}" if task == metrics.BINARY else ""))
    width = max(len(k) for k in names if k not in metrics.THRESHOLD_KEYS)

    def shown(k):
        few = f" (n={len(values[k])})" if len(values[k]) < len(per_seed) else ""
        return f"{summary[k][0]:.4f} ± {summary[k][1]:.4f}{few}"
    for k in names:
        if k not in metrics.THRESHOLD_KEYS:
            print(f"  {k:{width}s} {shown(k)}")
    if "threshold" in summary:
        at = ", ".join(f"{k.replace('_at_threshold', '').replace('_', ' ')} {shown(k)}" for k in metrics.THRESHOLD_KEYS[1:]
                       if k in summary)
        print(f"  {'threshold':{width}s} {shown('threshold')} (on P(class 1), chosen on validation by Youden's J)")
        print(f"  at that threshold: {at}")
    print(f"  AUC 95% CI (bootstrap, seed {first_seed}): [{ci[0]:.4f}, {ci[1]:.4f}]")
    if len(per_seed) == 1:
        print("  note: one seed: no std, and no test against another run is possible; with 4 seeds a side the "
              "Mann-Whitney test can reach p < 0.05")
    elif len(per_seed) < 4:  # 2 / C(2n, n) >= 0.05 up to n = 3
        print(f"  note: against another run of {len(per_seed)} seeds the exact Mann-Whitney test cannot reach "
              f"p < 0.05 (its smallest p is {metrics.mwu_min_p(len(per_seed), len(per_seed)):.3f}); 4 seeds a side can")
    if cm.ndim == 2:
        print("  confusion matrix (first seed; rows: true class):")
        for line in metrics.confusion_table(cm, labels):
            print("    " + line)
    # last, atomically: a directory holding metrics.json is a finished run
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(result, indent=2))
    print(f"wrote {out}/metrics.json")
    return result


def _with_calibration(record, y_true, y_score, task):
    """A per-seed record whose test metrics gained balanced_accuracy, ece and brier where it lacks them."""
    test = dict(record["test"])
    for key, metric in (("balanced_accuracy", metrics.balanced_accuracy), ("ece", metrics.expected_calibration_error),
                        ("brier", metrics.brier)):
        if key not in test:
            test[key] = metric(y_true, y_score, task)
    return {**record, "test": test}
