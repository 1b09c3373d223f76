"""Every figure MedSSL draws (common.metrics computes, this module draws).

Each figure is written twice with one stem: a vector PDF for a paper and a 300 dpi PNG for a screen
(`save`). Titles say what is shown (dataset, mode, label fraction, seeds, encoder; `run_title`), never
a path; the title is also stored in the files' metadata ("Title"). A series keeps one colour in every
figure: a pretraining method or baseline by its name, anything else by sorted order (`colours`).
"""
import os
import re
import textwrap

import numpy as np
import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from common import methods, metrics  # noqa: E402

DPI = 300
FPR_GRID = np.linspace(0.0, 1.0, 201)  # where the ROC curves of several seeds are averaged

# A method or baseline keeps its colour in every figure (tab10); other series take the colours left, in
# sorted order of their names.
PALETTE = plt.get_cmap("tab10").colors
METHOD_COLOURS = {"byol": 0, "barlow": 1, "simclr": 2, "moco": 3, "vicreg": 4, "dino": 5, "mae": 6, "beit": 9,
                  "imagenet": 7, "random": 8}
MODE_NAMES = {"linear_probe": "linear probe", "finetune": "fine-tuning", "fewshot": "few-shot fine-tuning",
              "knn": "kNN", "finetune_beit": "BEiT fine-tuning"}


# ---------------------------------------------------------------- names and colours
def method_name(method):
    """A pretraining method's name in tables and figures (its LABEL in the method list), else as given."""
    try:
        return methods.get(str(method)).label
    except KeyError:
        return str(method)


def method_key(name):
    """The METHOD_COLOURS key a series name refers to ("Barlow Twins, seed 1" -> barlow), or None."""
    words = re.findall(r"[a-z0-9]+", str(name).lower())
    for key in METHOD_COLOURS:
        if key in words or (key == "barlow" and "barlowtwins" in words):
            return key
    return None


def colours(names):
    """{series name: colour} for the names of one figure or one whole report: a method's or
    baseline's fixed colour, then the remaining palette colours by sorted name (tab20's light shades
    once they run out). Of several names of one method ("BYOL", "BYOL+"; "random init", "random init
    (ViT-Tiny)") only the shortest keeps the fixed colour and the others take free ones, so that
    two series of one method differ. Pass every name of a report at once so that a name keeps its
    colour in all its figures."""
    names = list(dict.fromkeys(map(str, names)))
    out = {}
    for n in sorted(names, key=lambda n: (len(n), n)):
        key = method_key(n)
        if key and PALETTE[METHOD_COLOURS[key]] not in out.values():
            out[n] = PALETTE[METHOD_COLOURS[key]]
    taken = {METHOD_COLOURS[method_key(n)] for n in out}
    # then tab20's light shades (its dark ones are tab10's)
    free = [PALETTE[i] for i in range(len(PALETTE)) if i not in taken] + list(plt.get_cmap("tab20").colors[1::2])
    for i, n in enumerate(sorted(n for n in names if n not in out)):
        out[n] = free[i % len(free)]
    return out


def dataset_name(data):
    """A --data value as a figure names it: a MedMNIST flag as it is, a file or folder by its name."""
    text = str(data).rstrip("/\\")
    return os.path.basename(text) if os.sep in text or "/" in text else text


def encoder_name(run):
    """The encoder of a metrics.json-like dict in words: "BYOL encoder", "random init", "ImageNet
    init", the run folder's name of a checkpoint whose method is not recorded; never a path."""
    method = (run.get("pretraining") or {}).get("method")
    if method:
        return f"{method_name(method)} encoder"
    encoder = run.get("encoder")
    if encoder in (None, ""):
        return None
    if encoder in ("random", "imagenet"):
        return {"random": "random init", "imagenet": "ImageNet init"}[encoder]
    text = str(encoder)
    if text.endswith((".pt", ".pth", ".ckpt", ".safetensors")):
        folder = os.path.basename(os.path.dirname(os.path.abspath(text)))
        return f"encoder of {folder}" if text.endswith(".pt") and folder else f"weights {os.path.basename(text)}"
    return text


def run_title(run, n_seeds=None, what=""):
    """A figure title from a metrics.json-like dict: what is shown, then dataset and size, mode,
    label fraction, encoder and seeds, e.g. "ROC: breastmnist 28 px, linear probe (logreg), 100%
    of the training labels, BYOL encoder, 3 seeds". Fields the dict lacks are left out."""
    args = run.get("args") or {}
    parts = []
    if run.get("data") is not None:
        parts.append(dataset_name(run["data"]) + (f" {run['size']} px" if run.get("size") else ""))
    mode = run.get("mode")
    if mode:
        extra = {"linear_probe": args.get("probe"), "fewshot": args.get("shots") and f"{args['shots']} per class"}
        parts.append(MODE_NAMES.get(mode, mode) + (f" ({extra[mode]})" if extra.get(mode) else ""))
    fraction = args.get("label_fraction")
    if fraction is not None and mode != "fewshot":
        parts.append(f"{100 * float(fraction):g}% of the training labels")
    if encoder_name(run):
        parts.append(encoder_name(run))
    n = n_seeds if n_seeds is not None else run.get("n")
    if n:
        parts.append(f"{n} seed{'s' if n != 1 else ''}")
    text = ", ".join(parts)
    return f"{what}: {text}" if what and text else (what or text)


def axis_label(key):
    """An axis label for a per-epoch log key: "Validation AUC (kNN, k = 20)" for knn_val_auc."""
    known = {"loss": "Training loss", "knn_val_auc": "Validation AUC (kNN, k = 20)", "lr": "Learning rate",
             "val_auc": "Validation AUC", "val_loss": "Validation loss", "train_loss": "Training loss"}
    if key in known:
        return known[key]
    text = key.replace("_", " ").replace("auc", "AUC").replace("knn", "kNN").replace("val ", "validation ")
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------- axes and files
def wrap(text, width=48):
    """A title broken into lines of at most `width` characters, so it fits above a small plot."""
    if not text:
        return ""
    kept = re.sub(r"(\d) px\b", "\\1\u00a0px", str(text))  # "28 px" stays on one line
    return "\n".join(textwrap.wrap(kept, width)).replace("\u00a0", " ")


def new_axes(title, size=(4.5, 4.2)):
    fig, ax = plt.subplots(figsize=size)
    if title:
        ax.set_title(wrap(title, int(11 * size[0])), fontsize=9)
    return fig, ax


def save(fig, path, title=None):
    """Write `fig` as <stem>.pdf (vector) and <stem>.png (300 dpi) for a path ending .png, .pdf or
    nothing, with its title in both files' metadata; closes it. Returns the PNG's path."""
    stem = os.path.splitext(os.fspath(path))[0] if os.fspath(path).endswith((".png", ".pdf")) else os.fspath(path)
    folder = os.path.dirname(stem)
    if folder:
        os.makedirs(folder, exist_ok=True)
    if title is None:
        shown = [ax.get_title() for ax in fig.axes if ax.get_title()]
        title = fig.get_suptitle() or (shown[0] if shown else "")
    title = " ".join(str(title).split())
    # "tight" grows the canvas to what is drawn: a long title or a legend below the axes is kept whole;
    # no creation date in the PDF, so that the same figure gives the same file
    fig.savefig(stem + ".pdf", bbox_inches="tight", metadata={"Title": title, "CreationDate": None})
    fig.savefig(stem + ".png", bbox_inches="tight", dpi=DPI, metadata={"Title": title})
    plt.close(fig)  # figures are not freed otherwise; long runs would leak memory
    return stem + ".png"


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


# ---------------------------------------------------------------- ROC across seeds
def roc_on_grid(y_true, y_score, grid=FPR_GRID):
    """sklearn's ROC curve of a 0/1 target, its TPR interpolated linearly at the FPRs of `grid`;
    at an FPR where the curve rises vertically, the top of the rise."""
    fpr, tpr, _ = roc_curve(y_true, y_score)
    out = np.interp(grid, fpr, tpr)  # between two distinct FPRs; on one where the curve rises, its top:
    last = np.searchsorted(fpr, grid, side="right") - 1
    on = fpr[last] == grid
    out[on] = tpr[last[on]]
    return out


def mean_roc(y_true, seed_scores, grid=FPR_GRID):
    """(mean TPR, sample std of TPR (0 for one seed), every seed's TPR) over seeds on `grid`, for a
    0/1 target and one score array per seed."""
    tprs = np.array([roc_on_grid(y_true, s, grid) for s in seed_scores])
    return tprs.mean(axis=0), (tprs.std(axis=0, ddof=1) if len(tprs) > 1 else np.zeros(len(grid))), tprs


def roc_targets(y_true, seed_scores, task, class_names=None, positive_class=1):
    """[(curve name, 0/1 target, [score of each seed])]: a binary task's positive class, else one
    per class / label."""
    task, y, _ = metrics._prepare(y_true, seed_scores[0], task)
    scores = [metrics._scores(s, task) for s in seed_scores]
    if task == metrics.BINARY:
        names = metrics._names(class_names, 2, task)
        return [(f"{names[positive_class]} (positive class)", (y == positive_class).astype(int),
                 [s if positive_class == 1 else 1 - s for s in scores])]
    names = metrics._names(class_names, scores[0].shape[1], task)
    target = (lambda j: y[:, j]) if task == metrics.MULTI_LABEL else (lambda j: (y == j).astype(int))
    return [(names[j], target(j), [s[:, j] for s in scores]) for j in range(scores[0].shape[1])]


def plot_roc(y_true, seed_scores, task, path, title="", class_names=None, positive_class=1, operating_point=None):
    """ROC curves over the seeds' test scores (`seed_scores`: one array per seed): each curve the
    mean TPR on a common FPR grid (mean_roc) with a ± 1 SD band across seeds, its AUC as mean ± SD
    over seeds (the same numbers as metrics.json's mean and std for a binary task); with several
    classes or labels a curve per class and the macro AUC written on the axes. `operating_point`:
    {"fpr", "tpr", "label"} marked on a binary curve. Returns {"auc": (mean, std) of the task's AUC,
    "legend": the legend's texts, "curves": {name: (grid, mean, std)}}."""
    n = len(seed_scores)
    task = metrics._check_task(task)
    curves = roc_targets(y_true, seed_scores, task, class_names, positive_class)
    fig, ax = new_axes(title)
    if len(curves) > 10:  # matplotlib's default cycle repeats after 10 colours
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    drawn = {}
    for name, target, scores in curves:
        mean, std, _ = mean_roc(target, scores)
        auc_mean, auc_std = metrics.mean_std([roc_auc_score(target, s) for s in scores])
        spread = f" ± {auc_std:.3f}" if n > 1 else ""
        line, = ax.plot(FPR_GRID, mean, lw=1.4, label=f"{name}: AUC {auc_mean:.3f}{spread}")
        if n > 1:
            ax.fill_between(FPR_GRID, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=line.get_color(),
                            alpha=0.2, lw=0)
        drawn[name] = (FPR_GRID, mean, std)
    if n > 1:  # the band's meaning, once
        ax.fill_between([], [], [], color="grey", alpha=0.2, lw=0, label=f"± 1 SD of the TPR over {n} seeds")
    if operating_point is not None and task == metrics.BINARY:
        ax.plot([operating_point["fpr"]], [operating_point["tpr"]], "o", color="k", ms=6, mfc="w", mew=1.5,
                label=operating_point["label"])
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("False positive rate (1 − specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    overall = metrics.mean_std([metrics.auc(y_true, s, task) for s in seed_scores])
    if task != metrics.BINARY:
        ax.text(0.98, 0.02, f"macro AUC {overall[0]:.3f}" + (f" ± {overall[1]:.3f}" if n > 1 else ""), ha="right",
                va="bottom", fontsize=8, transform=ax.transAxes)
    legend = legend_below(ax, len(ax.get_legend_handles_labels()[0]))
    texts = [t.get_text() for t in legend.get_texts()]
    save(fig, path, title)
    return {"auc": overall, "legend": texts, "curves": drawn}


def operating_point(mean, positive_name, n_seeds):
    """The binary operating point metrics.json reports, from its "mean" dict: the threshold chosen on
    validation (Youden's J) where recorded, else the 0.5 cut; {"fpr", "tpr", "label"} or None."""
    seeds = f", mean of {n_seeds} seeds" if n_seeds > 1 else ""
    if "sensitivity_at_threshold" in mean and "specificity_at_threshold" in mean:
        sens, spec = mean["sensitivity_at_threshold"], mean["specificity_at_threshold"]
        how = f"P(class 1) > {mean['threshold']:.2f}, chosen on validation (Youden's J){seeds}"
    elif "sensitivity" in mean and "specificity" in mean:
        sens, spec = mean["sensitivity"], mean["specificity"]
        how = f"P(class 1) > 0.5{seeds}"
    else:
        return None
    return {"fpr": 1 - spec, "tpr": sens,
            "label": f"{how}:\nsensitivity {sens:.3f}, specificity {spec:.3f} ({positive_name} positive)"}


# ---------------------------------------------------------------- other evaluation figures
def plot_confusion(cm, path, class_names=None, title=""):
    """Write a confusion-matrix heatmap: each cell shows its count and its row percentage (true
    class = row, so the diagonal is each class's recall), coloured by that percentage so a small
    class's errors are as visible as a large one's; class names on both axes.

    A (L, 2, 2) multi-label stack is drawn as one L x 4 table, a row per label with the
    columns TN, FP, FN, TP (sklearn's [[TN, FP], [FN, TP]] order flattened), which keeps a
    single readable heatmap instead of a grid of tiny plots.
    """
    cm = np.asarray(cm)
    if cm.ndim == 3:
        data = cm.reshape(len(cm), 4)
        rows = metrics._names(class_names, len(cm), metrics.MULTI_LABEL)
        cols, xlabel, ylabel = ["TN", "FP", "FN", "TP"], "", "Label"
    elif cm.ndim == 2 and cm.shape[0] == cm.shape[1]:
        data = cm
        rows = cols = metrics._names(class_names, len(cm), metrics.MULTI_CLASS)
        xlabel, ylabel = "Predicted class", "True class"
    else:
        raise ValueError(f"cm must be (C, C) or (L, 2, 2), got {cm.shape}")
    totals = data.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * data, totals, out=np.zeros(data.shape), where=totals > 0)
    side = max(4.0, 0.75 * max(len(cols), len(rows)) + 2)
    fig, ax = new_axes(title, size=(side + 0.8, side))
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
    return save(fig, path, title)


def plot_reliability(y_true, y_score, task, path, title="", n_bins=15):
    """Write a reliability diagram: the accuracy of each confidence bin (bars; bins as in
    metrics.expected_calibration_error) against the diagonal of perfect calibration, each bin's
    mean confidence marked, and the ECE written on it. Returns the ECE."""
    task, y, s = metrics._prepare(y_true, y_score, task)
    count, confidence, accuracy = metrics._calibration_bins(*metrics._top_label(y, s, task), n_bins)
    ece = float(np.sum(count * np.abs(accuracy - confidence)) / count.sum())
    used = count > 0
    centres = (np.arange(n_bins) + 0.5) / n_bins
    fig, ax = new_axes(title)
    ax.bar(centres[used], accuracy[used], width=1 / n_bins, edgecolor="k", lw=0.5, alpha=0.75,
           label="accuracy in the bin")
    ax.plot(confidence[used], confidence[used], "r_", ms=9, mew=1.5, label="mean confidence in the bin")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.text(0.03, 0.95, f"ECE {ece:.3f} ({n_bins} bins, n={int(count.sum())})", fontsize=8, va="top",
            transform=ax.transAxes)
    ax.set_xlabel("Confidence of the predicted label")
    ax.set_ylabel("Accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    legend_below(ax, 3)
    save(fig, path, title)
    return ece


def plot_lr_range(lrs, losses, chosen, path, title="LR range test"):
    """Write the LR range test's curve (loss against lr, log scale) with the chosen lr marked."""
    fig, ax = new_axes(title)
    ax.plot(lrs, losses, lw=1)
    ax.axvline(chosen, color="r", ls="--", lw=0.8, label=f"chosen lr {chosen:.2e}")
    ax.set_xscale("log")
    if log_scale_needed(losses):
        ax.set_yscale("log")
    ax.set_xlabel("Learning rate")
    ax.set_ylabel("Training loss (smoothed)")
    ax.grid(alpha=0.3)
    legend_below(ax, 1, fontsize=8)
    return save(fig, path, title)


# ---------------------------------------------------------------- per-epoch curves
def plot_training_curves(series, path, title="", ylabel="Training loss", xlabel="Epoch", bands=None,
                         palette=None):
    """Write curves of per-epoch values: series = {label: (epochs, values)}, e.g. a pretraining
    run's loss; bands = {label: std per epoch} draws a ± 1 SD band. Each label in its colour
    (`palette`, a report's `colours`, else those of these labels); whole-epoch ticks; a log axis when the values span more than 30x; a legend below
    the axes only with two series or more (one series is named by the title)."""
    fig, ax = new_axes(title)
    palette = {**colours(series), **(palette or {})}
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, lw=1.2, label=label, color=palette[label])
        if bands and label in bands:
            ys, sd = np.asarray(ys, dtype=float), np.asarray(bands[label], dtype=float)
            ax.fill_between(xs, ys - sd, ys + sd, color=palette[label], alpha=0.2, lw=0)
    integer_epochs(ax)
    if log_scale_needed([v for _, ys in series.values() for v in ys]):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        legend_below(ax, len(series))
    return save(fig, path, title)
