"""A report of run directories: report.md, its figures (each a PDF and a 300 dpi PNG) and runs.csv
(one line per evaluation run and seed).

Without a spec, every run found is reported: name run folders, a glob, or a folder above them (walked
for evaluation runs, which hold metrics.json, and pretraining runs, which hold log.jsonl and
checkpoint.pt):

    python scripts/report.py runs/ --out results/mine

report.md then has a table of the evaluation runs (data, encoder, mode, labels used, seeds, test AUC
and ACC as mean ± sample std over seeds), the comparisons of every two runs of one protocol (as below:
Welch and Mann-Whitney over seeds, and DeLong's test or a paired bootstrap on the same test images),
"What holds" (the differences at p < 0.05, in words), the pretraining runs' loss and kNN monitor, and
each evaluation run's ROC (mean over seeds, ± 1 SD band, the reported operating point).

With a spec, a paper's report: each table with our numbers, mean ± std over seeds with n, beside the
published ones marked "quoted", Welch / Mann-Whitney p-values for the comparisons the paper makes,
and the figures it names. Rows or figures whose runs are missing say "not run: <reason>", never leave
a gap. A row label keeps one colour in every figure.

    python scripts/report.py --spec results/paper001/spec.yaml --out results/paper001

The spec (YAML or JSON; globs relative to the working directory; `runs` is one glob or a list, of run
directories or of the files themselves):

    title: "Paper 001: BYOL for limited-label medical images"
    intro: "Free Markdown under the title."
    tables:
      - title: "PneumoniaMNIST, fine-tuning (test)"
        metrics: [auc, acc]                  # keys of metrics.json's per_seed[].test
        source: "paper 001, Table 2"         # where the published numbers are quoted from
        rows:
          - {label: ImageNet init, runs: "runs/p001/pneu-ft-imagenet", published: {auc: 0.82, acc: 0.86}}
          - {label: BYOL+, runs: "runs/p001/pneu-ft-byolplus-s*", not_run: "needs a GPU", published: {auc: 0.86}}
        compare: [[ImageNet init, BYOL+]]     # A vs B: B - A, its 95% CI, Welch p, Mann-Whitney p per metric
        unit: seed                           # or run: one value per run (its seeds' mean), for nested seeds
        allow_mismatch: [mode]               # protocol fields the compared runs may differ in (or true: any)
        same_training: true                  # the compared runs must also train alike (metrics.TRAINING_FIELDS)
        compare_paired: [[fine-tune, LP-FT]] # rows whose runs pair up (same encoder checkpoint and seeds):
                                             # the paired t-test over the runs' differences
        runs_expected: 3                     # a row with fewer runs gets a "partly run" line
    figures:                                  # rows as in tables (YAML anchors avoid repeating them)
      - {kind: roc, title: "PneumoniaMNIST ROC", rows: [...]}    # overlaid, from predictions.npz
      - {kind: confusion, title: ..., rows: [...], class_names: [normal, pneumonia]}  # a PNG per row
      - {kind: curve, title: ..., rows: [...], x: label_fraction, metric: auc, log_x: true}
      - {kind: loss, title: ..., rows: [...], log_y: auto}       # from log.jsonl; auto: log when losses span >30x
      - {kind: loss, title: ..., rows: [...], key: knn_val_auc}  # any logged per-epoch value, e.g. the kNN monitor
      - {kind: lr_range, title: ..., rows: [...]}                # lr_range*.json, a PNG per row
      - {kind: saliency, title: ..., rows: [...], map: gradcam, class_names: [...]}  # or occlusion; saliency.npz

The reason of a missing row is, in order: the text of `not_run.txt` in its run directories (a
reproduce script writes the failing step's error line there, e.g. a dataset that cannot be
downloaded), the row's `not_run`, else "no <file> under <glob>". A row that is only partly there
(2 of 3 seeds) is reported with what it has, and a "partly run" line under the table.

A comparison needs runs of one protocol (data, split and grouping, size, mode, label fraction, shots,
probe, resize, positive class: common.metrics.PROTOCOL_FIELDS; with `same_training`, also epochs,
batch, lr, layer decay, head epochs and the other fields of common.metrics.TRAINING_FIELDS); a pair
that differs in a field the table's `allow_mismatch` does not list is not compared, and says why; an
allowed difference is named under the table, and a row whose own runs differ says so. Pairs whose runs scored the same test images (identical y_true in their
predictions.npz) are also tested image by image on their seed-averaged scores: DeLong's test of the
two AUCs (binary tasks) or a paired bootstrap. A note says when the numbers of seeds cannot give a
Mann-Whitney p below 0.05."""
import argparse
import csv
import fnmatch
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cli  # noqa: E402
from common.errors import UserError  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directories, globs or parent folders (walked for evaluation runs' metrics.json and "
                             "pretraining runs' log.jsonl + checkpoint.pt): a report without a spec (default: none)")
    parser.add_argument("--spec", default=None,
                        help="YAML or JSON file describing the tables and figures, instead of RUN (default: none)")
    parser.add_argument("--out", required=True, help="folder for report.md, runs.csv and the figures (PDF and PNG)")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before matplotlib loads

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from common import figures, metrics, saliency  # noqa: E402  (figures also makes matplotlib headless)
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"auc": "AUC", "acc": "ACC", "f1": "F1", "weighted_f1": "weighted F1"}
# flags of evaluate.py and finetune_beit.py that tell runs apart, for runs.csv (paths, devices and the like
# are left out; a run without a flag leaves its cell empty)
ARG_COLUMNS = ("arch", "stem", "in_chans", "resize", "model", "trainable_layers", "balance", "probe", "shots",
               "label_fraction", "freeze", "frozen_bn", "epochs", "lr", "batch_size", "weight_decay", "lr_schedule",
               "head_epochs", "train_aug", "tta", "config")


# ---------------------------------------------------------------- finding runs
def find(row, pattern):
    """(files, gap): the files matching `pattern` (metrics.json, lr_range*.json, ...) that row["runs"]
    points at, directly or inside matched directories, and what is missing: None, the reason there
    are no files at all, or, when only some matched directories lack one, which and why."""
    globs = [row["runs"]] if isinstance(row.get("runs"), str) else row.get("runs") or []
    files, empty = [], []
    for g in globs:
        for path in sorted(glob.glob(g)):
            if os.path.isdir(path):
                inside = sorted(glob.glob(os.path.join(path, pattern)))
                files += inside
                if not inside:
                    empty.append(path)
            elif fnmatch.fnmatch(os.path.basename(path), pattern):
                files.append(path)
    files = list(dict.fromkeys(files))  # overlapping globs
    notes = sorted({open(os.path.join(d, "not_run.txt")).read().strip() for d in empty
                    if os.path.isfile(os.path.join(d, "not_run.txt"))})
    if not files:
        where = (globs[0] + (f" (and {len(globs) - 1} more)" if len(globs) > 1 else "")) if globs else "(no runs)"
        return [], "; ".join(notes) or row.get("not_run") or f"no {pattern} under {where}"
    if empty:  # e.g. one seed of three failed: the pooled numbers must not hide it
        return files, f"{len(empty)} matched run directories have no {pattern}: {'; '.join(notes) or ', '.join(empty)}"
    return files, None


def read_json(path):
    """A JSON file, or a one-line error naming it (a run killed while writing leaves a torn file)."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): its run may have been interrupted "
                        f"while writing it; re-run that run or remove it from the spec")


def load_runs(row, used, where, pattern="metrics.json"):
    """find(), plus the metrics.json beside each file, recorded in `used` (path -> [contents, places])
    for runs.csv. Returns (runs, files, gap)."""
    files, gap = find(row, pattern)
    runs = []
    for f in files:
        path = os.path.join(os.path.dirname(f), "metrics.json")
        if path not in used:
            run = read_json(path)
            if not isinstance(run, dict) or not isinstance(run.get("per_seed"), list):
                raise UserError(f"{path} has no per-seed results: is it a metrics.json of evaluate.py?")
            used[path] = [run, []]
        used[path][1].append(f"{where} / {row['label']}")
        runs.append(used[path][0])
    return runs, files, gap


def pooled(runs, metric):
    """Per-seed test values of every run of a row, pooled (e.g. 3 pretraining x 3 probe seeds = 9)."""
    return [s["test"][metric] for r in runs for s in r["per_seed"] if metric in s["test"]]


def values(runs, metric, unit="seed"):
    """A row's sample: its per-seed values (unit: seed), or one value per run, the mean over its seeds
    (unit: run). With nested seeds (pretraining runs x evaluation seeds) the run is the independent
    unit: the evaluation seeds of one encoder share its pretraining, so pooling them would count one
    pretraining run as several (pseudo-replication)."""
    if unit == "seed":
        return pooled(runs, metric)
    return [float(np.mean(v)) for v in (pooled([r], metric) for r in runs) if v]


# ---------------------------------------------------------------- tables
def cell(values):
    if not values:
        return "–"
    mean, std = metrics.mean_std(values)  # sample std (ddof=1), as everywhere in the project
    if len(values) == 1:  # one value has no spread to report: "± 0.000" would claim one
        return f"{mean:.3f} (n=1)"
    return f"{mean:.3f} ± {std:.3f} (n={len(values)})"


def p_text(p):
    if p is None:
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def fields_of(table):
    """The fields a table's compared runs must share: the protocol's, and the training's with `same_training`."""
    return metrics.PROTOCOL_FIELDS + (metrics.TRAINING_FIELDS if table.get("same_training") else ())


def table_section(table, used, tests=None):
    """A table's Markdown lines; `tests`, a list, gets one entry per comparison and metric tested."""
    names, rows = table.get("metrics", ["auc", "acc"]), table["rows"]
    labels = [r["label"] for r in rows]
    if len(set(labels)) < len(labels):
        raise UserError(f"table {table['title']!r}: row labels must be unique, got {labels}")
    quoted = [m for m in names if any(m in r.get("published", {}) for r in rows)]
    header = ["method"]
    for m in names:
        header += [NAMES.get(m, m)] + ([f"{NAMES.get(m, m)}, published"] if m in quoted else [])
    lines = [f"## {table['title']}", ""] + ([table["note"].strip(), ""] if table.get("note") else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    samples, groups, gaps, seeds = {}, {}, [], set()
    unit = table.get("unit", "seed")
    for row in rows:
        runs, files, reason = load_runs(row, used, table["title"])
        if runs and reason:
            gaps.append(f"- {row['label']}: partly run: {reason}")
        mixed = metrics.group_mismatches(runs[:1], runs[1:], fields_of(table))
        if mixed:  # e.g. one pretraining run's fine-tuning made with other epochs than the others'
            gaps.append(f"- {row['label']}: its runs differ in {differences(mixed)}")
        samples[row["label"]] = {m: values(runs, m, unit) for m in names} if runs else None
        seeds |= {len(r["per_seed"]) for r in runs}
        groups[row["label"]] = [(run, os.path.dirname(f)) for run, f in zip(runs, files)]
        cells = [row["label"]]
        for i, m in enumerate(names):
            if runs:
                cells.append(cell(samples[row["label"]][m]) if samples[row["label"]][m] else f"no {m} in metrics.json")
            else:
                cells.append(f"not run: {reason}" if i == 0 else "–")
            if m in quoted:  # as written in the spec: quoting 0.82 as 0.820 would invent a digit
                value = row.get("published", {}).get(m)
                cells.append("–" if value is None else f"{value} (quoted)")
        lines.append("| " + " | ".join(cells) + " |")
        expected = table.get("runs_expected")
        if runs and expected and len(runs) < expected:
            gaps.append(f"- {row['label']}: {len(runs)} of the {expected} runs expected")
    lines.append("")
    if gaps:
        lines += gaps + [""]
    if quoted:
        lines += [f"Published values are quoted from {table.get('source', 'the paper')}, not re-measured.", ""]
    if unit == "run":
        per = " or ".join(str(n) for n in sorted(seeds)) or "its"
        lines += [f"Each value is one run's mean over {per} evaluation seeds; mean ± std and n are over runs, the "
                  f"independent unit (pretraining runs, not evaluation seeds).", ""]
    if table.get("compare"):
        lines += comparison_lines(table, names, samples, groups, results=tests, unit=unit)
    if table.get("compare_paired"):
        lines += paired_run_lines(table, names, groups, tests)
    return lines


def pair_key(run, folder):
    """What makes two evaluation runs a pair: the same encoder and the same seeds. The encoder is the
    checkpoint's content (its sha256 in the run's provenance.json) where recorded, so that a checkpoint
    moved or replaced pairs by what it holds; else its path (or the init's name)."""
    args = run.get("args", {})
    encoder = args.get("ckpt") or args.get("init")
    provenance = os.path.join(folder, "provenance.json")
    if os.path.isfile(provenance):
        encoder = (read_json(provenance).get("encoder") or {}).get("sha256") or encoder
    return encoder, tuple(s.get("seed") for s in run["per_seed"])


def paired_run_lines(table, names, groups, tests=None):
    """table["compare_paired"]: pairs of rows whose runs pair up by pair_key (e.g. one pretraining
    run fine-tuned two ways), each run one value (its seeds' mean): the paired t-test over the
    differences, which the spread between encoders does not enter as Welch's test over two rows would.
    `tests`, a list, gets one entry per pair and metric tested."""
    tests = [] if tests is None else tests
    lines = ["| paired comparison | metric | pairs | mean B − A | 95% CI | p (paired t) | B higher in |",
             "|---" * 7 + "|"]
    notes, allowed = [], allowed_fields(table)
    for pair in table["compare_paired"]:
        a, b = check_pair(table, pair, groups)
        runs_a = {pair_key(r, d): r for r, d in groups[a]}
        runs_b = {pair_key(r, d): r for r, d in groups[b]}
        keys = [k for k in runs_a if k in runs_b]
        unpaired = len(runs_a) + len(runs_b) - 2 * len(keys)
        if unpaired:
            notes.append(f"- {b} vs {a}: {unpaired} run{'s' * (unpaired > 1)} without a partner left out")
        if not keys:
            lines.append(f"| {b} vs {a} | – | 0 | – | – | not run: no runs that pair up | – |")
            continue
        refused = [f for f in metrics.group_mismatches([runs_a[k] for k in keys], [runs_b[k] for k in keys],
                                                       fields_of(table)) if f[0] not in allowed]
        if refused:
            lines.append(f"| {b} vs {a} | – | {len(keys)} | – | – | not compared: the runs differ in "
                         f"{refused[0][0]} | – |")
            continue
        for m in names:
            va, vb = values([runs_a[k] for k in keys], m, "run"), values([runs_b[k] for k in keys], m, "run")
            if len(va) != len(keys) or len(vb) != len(keys):
                lines.append(f"| {b} vs {a} | {NAMES.get(m, m)} | {len(keys)} | – | – | n/a | – |")
                continue
            c = metrics.compare_pairs(va, vb)
            tests.append((f"{b} vs {a}", m, c))
            ci = "n/a" if c["ci95_low"] is None else f"[{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}]"
            lines.append(f"| {b} vs {a} | {NAMES.get(m, m)} | {c['n']} | {c['diff']:+.3f} | {ci} | {p_text(c['p'])} | "
                         f"{c['b_higher']} of {c['n']} |")
    lines += ["", "Paired: each pair is one encoder (checkpoint or init) evaluated both ways with the same evaluation "
                  "seeds, each side its seeds' mean; the paired t-test over the pairs' differences B − A.", ""]
    return lines + (notes + [""] if notes else [])


def allowed_fields(table):
    """The protocol fields a table's comparisons may differ in (`allow_mismatch`: a list, or true for any)."""
    allow = table.get("allow_mismatch") or []
    known = set(fields_of(table)) | {"data_hash"}
    if allow is True:
        return known
    fields = [allow] if isinstance(allow, str) else allow
    if not isinstance(fields, list) or not set(fields) <= known:
        raise UserError(f"table {table['title']!r}: allow_mismatch must be true or a list of "
                        f"{', '.join(sorted(known))}; got {allow!r}")
    return set(fields) | ({"data_hash"} if "data" in fields else set())


def differences(found):
    return "; ".join(f"{field} ({'(not set)' if a is None else a} vs {'(not set)' if b is None else b})"
                     for field, a, b, _ in found)


def check_pair(table, pair, rows):
    """A comparison's two row labels, or a one-line error naming the one that is not a row of `table`."""
    for label in pair:
        if label not in rows:
            raise UserError(f"table {table['title']!r} compares {label!r}, which is not one of its rows")
    return pair


def comparison_lines(table, names, samples, groups=None, results=None, unit="seed"):
    """The comparisons of table["compare"] as Markdown lines; `results`, a list, also gets each
    (pair, metric, compare_samples result) and (pair, None, paired_runs_test result)."""
    groups = groups or {}
    results = [] if results is None else results
    allowed = allowed_fields(table)
    lines = ["| comparison | metric | A | B | B − A | 95% CI of B − A | p (Welch) | p (Mann-Whitney) |",
             "|---" * 8 + "|"]
    notes, paired, few = [], [], {}
    for pair in table["compare"]:
        a, b = check_pair(table, pair, samples)
        missing = [label for label in (a, b) if samples[label] is None]
        if missing:
            lines.append(f"| {b} vs {a} | – | – | – | – | – | not run: {', '.join(missing)} | – |")
            continue
        found = metrics.group_mismatches([r for r, _ in groups.get(a, [])], [r for r, _ in groups.get(b, [])],
                                         fields_of(table))
        refused = [f for f in found if f[0] not in allowed]
        if refused:
            lines.append(f"| {b} vs {a} | – | – | – | – | – | not compared: the runs differ in "
                         f"{refused[0][0]} | – |")
            notes.append(f"- {b} vs {a}: not compared: the runs differ in {differences(refused)}; list the field in "
                         f"the table's allow_mismatch to compare them anyway.")
            continue
        if found:
            notes.append(f"- {b} vs {a}: the runs differ in {differences(found)}; compared as the table's "
                         f"allow_mismatch permits.")
        for m in names:
            va, vb = samples[a][m], samples[b][m]
            if not va or not vb:
                lines.append(f"| {b} vs {a} | {NAMES.get(m, m)} | {cell(va)} | {cell(vb)} | – | – | n/a | n/a |")
                continue
            c = metrics.compare_samples(va, vb)
            results.append((f"{b} vs {a}", m, c))
            ci = "n/a" if c["diff_ci95_low"] is None else f"[{c['diff_ci95_low']:+.3f}, {c['diff_ci95_high']:+.3f}]"
            lines.append(f"| {b} vs {a} | {NAMES.get(m, m)} | {cell(va)} | {cell(vb)} | {c['diff']:+.3f} | {ci} | "
                         f"{p_text(c['welch_p'])} | {p_text(c['mwu_p'])} |")
            if c["mwu_p"] is not None and c["mwu_min_p"] is not None and c["mwu_min_p"] >= 0.05:
                few.setdefault((c["n_a"], c["n_b"], c["mwu_min_p"]), []).append(f"{b} vs {a}")
        if groups.get(a) and groups.get(b) and unit == "seed":  # an ensemble of seeds, not a sample of runs
            result, _ = metrics.paired_runs_test(groups[a], groups[b])
            if result is not None:
                paired.append((f"{b} vs {a}", result))
                results.append((f"{b} vs {a}", None, result))
    over = "the per-seed test values" if unit == "seed" else "the runs' means (one value per run)"
    lines += ["", "Welch's t-test (unequal variances) with its 95% interval of B − A, and the two-sided Mann-Whitney "
                  f"U test, over {over}; n/a with fewer than 2 values a side or no variance at all.", ""]
    for (n_a, n_b, p), pairs in few.items():
        notes.append(f"- {', '.join(dict.fromkeys(pairs))}: with {n_a} and {n_b} values the exact Mann-Whitney test "
                     f"cannot go below p = {p:.3f}, so p < 0.05 is out of its reach.")
    if notes:
        lines += notes + [""]
    if paired:
        lines += paired_lines(paired)
    return lines


def paired_lines(paired):
    """The comparisons whose runs scored the same test images, image by image (common.metrics.paired_runs_test)."""
    lines = ["Paired on the same test images: each row's test scores averaged over its seeds (an ensemble, so its AUC "
             "is not the table's mean), DeLong's test of the two AUCs for a binary task, a paired bootstrap of the "
             "images (1000 resamples) otherwise.", "",
             "| comparison | test images | AUC A | AUC B | B − A | 95% CI | p | test |", "|---" * 8 + "|"]
    for name, r in paired:
        lines.append(f"| {name} | {r['n_images']} | {r['auc_a']:.3f} | {r['auc_b']:.3f} | {r['diff']:+.3f} | "
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {p_text(r['p'])} | {r['method']} |")
    return lines + [""]


# ---------------------------------------------------------------- figures
def seed_roc(y_true, y_score, task, positive_class=1):
    """One seed's ROC as TPR on figures.FPR_GRID: a binary task's positive class, otherwise the macro
    average of the one-vs-rest (or per-label) curves, the curve whose area is the table's AUC."""
    curves = figures.roc_targets(y_true, [y_score], task, positive_class=positive_class)
    return np.mean([figures.roc_on_grid(target, scores[0]) for _, target, scores in curves], axis=0)


def axes(title, xlabel, ylabel):
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.set_title(figures.wrap(title, 55), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def save(fig, ax, path):
    """PDF and 300 dpi PNG (figures.save), a legend naming the rows."""
    handles = ax.get_legend_handles_labels()[0]
    if handles:  # below the axes, where it covers no curve
        figures.legend_below(ax, len(handles), fontsize=8)
    return os.path.basename(figures.save(fig, path))


def band(ax, xs, groups, label, colour=None):
    """Mean line with a ± 1 SD band (sample std) over each x's values."""
    mean, std = np.array([metrics.mean_std(g) for g in groups]).T
    line, = ax.plot(xs, mean, marker="o" if len(xs) < 20 else None, ms=4, label=label, color=colour)
    ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=line.get_color(), lw=0)


def positive_of(run):
    return (run.get("positive_class") or {}).get("index", 1)


# Each figure function gets the rows that have files, as (row, runs, files): runs are the metrics.json
# contents beside the files (an empty list for files not written by evaluate.py); and the report's
# colours, {row label: colour}.
def roc_figure(fig, path, found, palette):
    plot, ax = axes(fig["title"], "False positive rate (1 − specificity)", "True positive rate (sensitivity)")
    banded = False
    for row, runs, files in found:
        y, scores = metrics.read_predictions(os.path.dirname(files[0]))
        tprs = np.array([seed_roc(y, s, runs[0]["task"], positive_of(runs[0])) for s in scores])
        aucs = [metrics.auc(y, s, runs[0]["task"]) for s in scores]
        mean, std = metrics.mean_std(aucs)
        spread = f" ± {std:.3f}" if len(aucs) > 1 else ""
        line, = ax.plot(figures.FPR_GRID, tprs.mean(axis=0), lw=1.4, color=palette.get(row["label"]),
                        label=f"{row['label']}: AUC {mean:.3f}{spread} ({len(aucs)} seed{'s' * (len(aucs) > 1)})")
        if len(tprs) > 1:
            banded, sd = True, tprs.std(axis=0, ddof=1)
            ax.fill_between(figures.FPR_GRID, np.clip(tprs.mean(axis=0) - sd, 0, 1),
                            np.clip(tprs.mean(axis=0) + sd, 0, 1), color=line.get_color(), alpha=0.2, lw=0)
    if banded:  # the band's meaning, once
        ax.fill_between([], [], [], color="grey", alpha=0.2, lw=0, label="± 1 SD of the TPR over seeds")
    ax.plot([0, 1], [0, 1], "k--", lw=0.7)
    return [save(plot, ax, path)], ("Test split; each curve is the mean over the seeds of the row's first run "
                                    "(TPR interpolated on a common false-positive grid), the band ± 1 SD over "
                                    "those seeds; with several classes or labels, the macro average of their "
                                    "one-vs-rest curves. The AUC is the mean ± SD of the seeds' AUCs.")


def numbered(path, n):
    """figure.png -> figure_0.png ... for kinds drawn as one PNG per row."""
    return [f"{os.path.splitext(path)[0]}_{i}.png" for i in range(n)]


def confusion_figure(fig, path, found, palette):
    pngs = numbered(path, len(found))
    for png, (row, runs, files) in zip(pngs, found):
        y, scores = metrics.read_predictions(os.path.dirname(files[0]))
        summed = sum(metrics.confusion(y, s, runs[0]["task"]) for s in scores)
        seeds = f", summed over {len(scores)} seeds" if len(scores) > 1 else ""
        figures.plot_confusion(summed, png, class_names=fig.get("class_names") or runs[0].get("class_names"),
                               title=f"{fig['title']}: {row['label']}{seeds}")
    return [os.path.basename(p) for p in pngs], ("Test split, every seed of each row's first run summed; rows are "
                                                 "true classes, each cell its count and its share of the row.")


def curve_figure(fig, path, found, palette):
    x, metric = fig.get("x", "label_fraction"), fig.get("metric", "auc")
    plot, ax = axes(fig["title"], x.replace("_", " ").capitalize(), f"Test {NAMES.get(metric, metric)}")
    for row, runs, _ in found:
        by_x = {}
        for r in runs:
            if x not in r.get("args", {}):
                raise UserError(f"figure {fig['title']!r}: a run of {row['label']!r} has no flag {x!r} in its args")
            by_x.setdefault(r["args"][x], []).extend(values([r], metric, fig.get("unit", "seed")))
        band(ax, sorted(by_x), [by_x[v] for v in sorted(by_x)], row["label"], palette.get(row["label"]))
    if fig.get("log_x"):
        ax.set_xscale("log")
    over = "seeds" if fig.get("unit", "seed") == "seed" else "runs (each the mean of its seeds)"
    return [save(plot, ax, path)], f"Mean ± std (band) of the test {NAMES.get(metric, metric)} over {over} at each {x}."


def loss_series(path, key="loss"):
    """[{epoch: value of `key`}, ...], one per seed, of one log.jsonl (`key`: loss, or e.g. knn_val_auc,
    which only monitored epochs carry). evaluate.py logs all its seeds in one file, and head-only epochs
    (phase: head), which are left out; a resumed run's re-logged epoch wins."""
    series = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed mid-write tears only its last line: the epochs before it stand
                print(f"note: {path}: the last line is incomplete and was left out", file=sys.stderr)
                continue
            raise UserError(f"{path} line {number} is not valid JSON; the log is damaged: re-run that run")
        if isinstance(record, dict) and key in record and "epoch" in record and "phase" not in record:
            series.setdefault(record.get("seed"), {})[record["epoch"]] = record[key]
    return list(series.values())


def loss_figure(fig, path, found, palette):
    key = fig.get("key", "loss")
    plot, ax, empty = *axes(fig["title"], "Epoch", figures.axis_label(key)), []
    for row, _, files in found:
        series = [s for f in files for s in loss_series(f, key)]
        epochs = sorted({e for s in series for e in s})
        if not epochs:  # a run stopped before its first epoch ended
            empty.append(row["label"])
            continue
        # epochs counted from 1, as the runs' own loss.png and their progress lines count them
        band(ax, [e + 1 for e in epochs], [[s[e] for s in series if e in s] for e in epochs],
             f"{row['label']} (n={len(series)})", palette.get(row["label"]))
    figures.integer_epochs(ax)
    drawn = [v for line in ax.get_lines() for v in line.get_ydata()]
    # the spec's log_y, or a log axis by itself when the rows' losses differ by orders of magnitude
    log_y = fig.get("log_y", "auto")
    if log_y is True or (log_y == "auto" and figures.log_scale_needed(drawn)):
        ax.set_yscale("log")
    return [save(plot, ax, path)], ("Mean ± std (band) over the row's runs and seeds, per epoch."
                                    + (f" No epoch logged yet: {', '.join(empty)}." if empty else ""))


def lr_range_figure(fig, path, found, palette):
    pngs = numbered(path, len(found))
    for png, (row, _, files) in zip(pngs, found):
        r = read_json(files[0])
        figures.plot_lr_range(r["lrs"], r["losses"], r["chosen"], png, title=f"{fig['title']}: {row['label']}")
    return [os.path.basename(p) for p in pngs], "Loss against learning rate in the range test; dashed: the lr chosen."


def class_names_beside(path):
    """The class names in the metrics.json next to `path` (evaluate.py writes both), or None."""
    beside = os.path.join(os.path.dirname(path), "metrics.json")
    return read_json(beside).get("class_names") if os.path.isfile(beside) else None


def saliency_figure(fig, path, found, palette):
    key, grids = fig.get("map", "gradcam"), [(row["label"], np.load(files[0])) for row, _, files in found]
    for label, s in grids[1:]:
        if "index" in s and not np.array_equal(s["index"], grids[0][1]["index"]):
            raise UserError(f"saliency maps of {label!r} are of other test images than those of {grids[0][0]!r}")
    names = fig.get("class_names") or class_names_beside(found[0][2][0])
    name = (lambda c: names[int(c)] if names and 0 <= int(c) < len(names) else str(int(c)))  # noqa: E731
    first = grids[0][1]
    truth = [name(c) for c in first["class_idx"]] if "class_idx" in first else None
    predicted = {label: [name(c) for c in s["predicted"]] for label, s in grids if "predicted" in s}
    saliency.plot_overlay_grid(first["images"], {label: s[key] for label, s in grids}, path, title=fig["title"],
                               row_labels=truth, predicted=predicted or None)
    where = ", ".join(f"{label}: {s['layer']}" for label, s in grids if "layer" in s and key == "gradcam")
    return [os.path.basename(path)], (f"{key} maps of each row's model on the same test images, scaled per image "
                                      f"(1 = strongest evidence)" + (f"; Grad-CAM layer {where}." if where else "."))


# kind -> (draw, file each row needs, whether that file has a metrics.json beside it)
FIGURES = {"roc": (roc_figure, "predictions.npz", True), "confusion": (confusion_figure, "predictions.npz", True),
           "curve": (curve_figure, "metrics.json", True), "loss": (loss_figure, "log.jsonl", False),
           "lr_range": (lr_range_figure, "lr_range*.json", False), "saliency": (saliency_figure, "saliency.npz", False)}


def figure_section(fig, out, used, palette=None):
    if fig.get("kind") not in FIGURES:
        raise UserError(f"figure {fig['title']!r}: kind must be one of {', '.join(FIGURES)}, got {fig.get('kind')!r}")
    draw, pattern, evaluated = FIGURES[fig["kind"]]
    found, notes = [], []
    for row in fig["rows"]:
        runs, files, reason = load_runs(row, used, fig["title"], pattern) if evaluated else ([], *find(row, pattern))
        if files:
            found.append((row, runs, files))
        if reason:
            notes.append(f"- {row['label']}: {'partly run' if files else 'not run'}: {reason}")
    name = fig.get("file") or re.sub(r"[^a-z0-9]+", "_", fig["title"].lower()).strip("_") + ".png"
    pngs, caption = draw(fig, os.path.join(out, name), found, palette or {}) if found else ([], "")
    lines = [f"### {fig['title']}", ""]
    if pngs:  # several PNGs on one line sit side by side in rendered Markdown
        lines += [" ".join(f"![{fig['title']}]({png})" for png in pngs), "", caption + " " + vector_links(pngs), ""]
    return lines + (notes + [""] if notes else [])


def vector_links(pngs):
    """Links to the PDFs beside the PNGs, for a paper."""
    return "Vector: " + ", ".join(f"[{os.path.splitext(p)[0]}.pdf]({os.path.splitext(p)[0]}.pdf)" for p in pngs) + "."


# ---------------------------------------------------------------- report and CSV
def write_csv(path, used):
    lines = []
    for run_path, (run, places) in used.items():
        args = run.get("args", {})
        for s in run["per_seed"]:
            lines.append({"run": os.path.dirname(run_path), "used_in": "; ".join(dict.fromkeys(places)),
                          **{k: run.get(k) for k in ("data", "size", "mode", "encoder", "task")}, "seed": s["seed"],
                          **s["test"], **{k: v for k, v in s.items() if k not in ("seed", "test")},
                          **{k: args[k] for k in ARG_COLUMNS if k in args}})
    columns = list(dict.fromkeys(k for line in lines for k in line)) or ["run"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(lines)
    return len(lines)


def check_spec(spec):
    """One-line errors for a malformed spec, before any figure is drawn."""
    if not isinstance(spec, dict):
        raise UserError("the spec must be a mapping with `tables` and / or `figures`")
    for kind in ("tables", "figures"):
        for i, item in enumerate(spec.get(kind) or []):
            if not isinstance(item, dict) or "title" not in item or not isinstance(item.get("rows"), list):
                raise UserError(f"{kind}[{i}] needs a `title` and a list of `rows`")
            for row in item["rows"]:
                if not isinstance(row, dict) or "label" not in row:
                    raise UserError(f"{item['title']!r}: every row needs a `label` (and `runs`), got {row!r}")
            if kind == "tables":
                allowed_fields(item)
            for pair in item.get("compare_paired") or []:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise UserError(f"{item['title']!r}: compare_paired takes pairs of row labels, got {pair!r}")
            if item.get("unit", "seed") not in ("seed", "run"):
                raise UserError(f"{item['title']!r}: unit must be seed (every evaluation seed a value) or run (one "
                                f"value per run, its seeds' mean: for nested seeds), got {item['unit']!r}")


def build_report(spec, out):
    """Write report.md, runs.csv and the figures of `spec` (a dict, as in this module's docstring)
    into `out`; returns the report's path."""
    check_spec(spec)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; give a folder for report.md, runs.csv and the figures")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder --out {out}: {e.strerror}")
    used = {}  # metrics.json path -> [its contents, the tables / figures rows that use it]
    lines = [f"# {spec.get('title', 'Report')}", ""] + ([spec["intro"].strip(), ""] if spec.get("intro") else [])
    tests = []  # (comparison, metric, result) of every test the tables make
    for table in spec.get("tables", []):
        lines += table_section(table, used, tests)
    tests = [t for t in tests if any(t[2].get(k) is not None for k in ("p", "welch_p", "mwu_p"))]  # n/a: no test
    if len(tests) > 1:
        lines += [f"Multiplicity: the tables above make {len(tests)} tests (Welch's and Mann-Whitney's p of one "
                  f"pair of rows on one metric counting as one, a test of the pair on its test images as "
                  f"another), none corrected for the others: were no "
                  f"difference real, about {0.05 * len(tests):.1f} of them would still reach p < 0.05 by chance.", ""]
    lines += ["## Figures", ""] if spec.get("figures") else []
    # one colour per row label in every figure of the report
    palette = figures.colours(row["label"] for fig in spec.get("figures", []) for row in fig["rows"])
    for fig in spec.get("figures", []):
        lines += figure_section(fig, out, used, palette)
    return write_report(out, lines, used)


def write_report(out, lines, used):
    """report.md (`lines`, then a line on runs.csv) and runs.csv (every run read, one line per run and seed)."""
    n = write_csv(os.path.join(out, "runs.csv"), used)
    lines = lines + [f"Every run behind this report, one line per run and seed, with its test metrics and flags: "
                     f"[runs.csv](runs.csv) ({n} lines)."]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- a report without a spec
def discover(paths):
    """(evaluation run folders, pretraining run folders) under `paths`: run folders, metrics.json or
    log.jsonl files, globs, or parent folders walked (hidden folders, e.g. an --overwrite's .old-*,
    skipped). An evaluation run holds metrics.json; a pretraining run log.jsonl and checkpoint.pt."""
    evaluations, pretrainings = [], []
    for given in paths:
        for path in sorted(glob.glob(given)) or [given]:
            if os.path.isfile(path):
                path = os.path.dirname(path) or "."
            if not os.path.isdir(path):
                raise UserError(f"{given}: no such run folder or file; give run folders, a glob or a parent folder")
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if "metrics.json" in files:
                    evaluations.append(os.path.normpath(folder))
                elif "log.jsonl" in files and "checkpoint.pt" in files:
                    pretrainings.append(os.path.normpath(folder))
    return list(dict.fromkeys(evaluations)), list(dict.fromkeys(pretrainings))


def run_labels(folders):
    """{folder: its name}: the folder's own name, or its path below the folders' common parent when
    two share a name."""
    names = [os.path.basename(os.path.abspath(f)) for f in folders]
    if len(set(names)) < len(names):
        root = os.path.commonpath([os.path.abspath(f) for f in folders])
        names = [os.path.relpath(os.path.abspath(f), root) for f in folders]
    return dict(zip(folders, names))


def baseline_first(a, b, runs):
    """A comparison's pair ordered (A, B) with a random or ImageNet init as A, else by name."""
    plain = [label for label in (a, b) if runs[label].get("encoder") in ("random", "imagenet")]
    return (plain[0], b if plain[0] == a else a) if len(plain) == 1 else tuple(sorted((a, b)))


def what_holds(results, n_pairs):
    """The differences that hold across seeds (Welch p < 0.05) or on the same test images (paired
    test p < 0.05), as plain sentences."""
    lines = []
    for pair, metric, r in results:
        b, a = pair.split(" vs ", 1)
        if metric is not None and r["welch_p"] is not None and r["welch_p"] < 0.05:
            lines.append(f"- {b} has a {'higher' if r['diff'] > 0 else 'lower'} test {NAMES.get(metric, metric)} than "
                         f"{a}: {r['mean_b']:.3f} vs {r['mean_a']:.3f} ({r['diff']:+.3f}, 95% CI "
                         f"[{r['diff_ci95_low']:+.3f}, {r['diff_ci95_high']:+.3f}]; Welch p = {p_text(r['welch_p'])}, "
                         f"{r['n_b']} and {r['n_a']} seeds).")
        elif metric is None and r["p"] is not None and r["p"] < 0.05:
            lines.append(f"- On the same {r['n_images']} test images, {b}'s seed-averaged scores have a "
                         f"{'higher' if r['diff'] > 0 else 'lower'} AUC than {a}'s: {r['auc_b']:.3f} vs "
                         f"{r['auc_a']:.3f} ({r['method']}, p = {p_text(r['p'])}).")
    if not n_pairs:
        return ["- Nothing was compared: no two evaluation runs share a protocol (data, split, size, mode, label "
                "fraction, shots, probe, resize, positive class)."]
    if not lines:
        return ["- No difference between these runs holds at p < 0.05."]
    return lines + [f"- These p-values are not corrected for the {n_pairs} comparison{'s' * (n_pairs > 1)} made."]


def auto_report(paths, out):
    """report.md, runs.csv and the figures of every run found under `paths` (discover), without a spec:
    a table of the evaluation runs, the tests between runs of one protocol and what holds, each run's
    ROC, and the pretraining runs' loss and kNN monitor. Returns the report's path."""
    evaluations, pretrainings = discover(paths)
    if not evaluations and not pretrainings:
        raise UserError(f"no run under {', '.join(paths)}: an evaluation run holds metrics.json, a pretraining run "
                        f"log.jsonl and checkpoint.pt; give their folders or a folder above them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file; give a folder for report.md, runs.csv and the figures")
    os.makedirs(out, exist_ok=True)
    labels = run_labels(evaluations + pretrainings)
    palette = figures.colours(labels.values())
    used, runs = {}, {}
    for folder in evaluations:
        path = os.path.join(folder, "metrics.json")
        run = read_json(path)
        if not isinstance(run, dict) or not isinstance(run.get("per_seed"), list):
            raise UserError(f"{path} has no per-seed results: is it a metrics.json of evaluate.py?")
        runs[labels[folder]] = run
        used[path] = [run, ["table"]]
    lines = [f"# Report of {len(evaluations)} evaluation and {len(pretrainings)} pretraining runs", ""]
    if evaluations:
        lines += ["## Evaluation runs (test split)", "",
                  "| run | data | encoder | mode | labels | seeds | AUC | ACC |", "|---" * 8 + "|"]
        for folder in evaluations:
            run, args = runs[labels[folder]], runs[labels[folder]].get("args") or {}
            fraction = (f"{args['shots']} per class" if run.get("mode") == "fewshot" and "shots" in args else
                        f"{100 * float(args.get('label_fraction', 1.0)):g}%")
            mode = figures.MODE_NAMES.get(run.get("mode"), run.get("mode"))
            if run.get("mode") == "linear_probe" and args.get("probe"):
                mode += f" ({args['probe']})"
            data = figures.dataset_name(run.get("data")) + (f" {run['size']} px" if run.get("size") else "")
            lines.append(f"| {labels[folder]} | {data} | {figures.encoder_name(run) or '–'} | "
                         f"{mode} | {fraction} | {len(run['per_seed'])} | {cell(pooled([run], 'auc'))} | "
                         f"{cell(pooled([run], 'acc'))} |")
        lines += ["", "Mean ± sample SD over seeds (n), as each run's metrics.json reports them.", ""]
        # tests between runs of one protocol
        pairs = [baseline_first(a, b, runs) for i, a in enumerate(runs) for b in list(runs)[i + 1:]
                 if runs[a].get("task") == runs[b].get("task") and not metrics.protocol_mismatches(runs[a], runs[b])]
        if pairs:
            samples = {label: {m: pooled([run], m) for m in ("auc", "acc")} for label, run in runs.items()}
            groups = {labels[f]: [(runs[labels[f]], f)] for f in evaluations}
            results = []
            table = {"title": "Comparisons", "compare": pairs}
            lines += ["## Comparisons", ""] + comparison_lines(table, ["auc", "acc"], samples, groups, results)
        else:
            results = []
        lines += ["## What holds", ""] + what_holds(results, len(pairs)) + [""]
    lines += ["## Figures", ""] if evaluations or pretrainings else []
    if pretrainings:
        rows = [{"label": labels[f], "runs": glob.escape(f)} for f in pretrainings]
        lines += figure_section({"kind": "loss", "title": "Pretraining loss", "rows": rows}, out, used, palette)
        monitored = [row for row, f in zip(rows, pretrainings)
                     if loss_series(os.path.join(f, "log.jsonl"), "knn_val_auc")]
        if monitored:
            lines += figure_section({"kind": "loss", "title": "kNN monitor during pretraining (validation split)",
                                     "key": "knn_val_auc", "rows": monitored, "file": "knn_monitor.png"}, out, used,
                                    palette)
    for folder in evaluations:
        label, run = labels[folder], runs[labels[folder]]
        try:
            y, scores = metrics.read_predictions(folder)
        except (OSError, ValueError) as e:
            lines += [f"### Test ROC of {label}", "", f"- no ROC: {getattr(e, 'strerror', None) or e}", ""]
            continue
        names, positive = run.get("class_names"), positive_of(run)
        point = figures.operating_point(run.get("mean") or {}, names[positive] if names else str(positive),
                                        len(scores)) if run.get("task") == metrics.BINARY else None
        name = "roc_" + re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + ".png"
        figures.plot_roc(y, list(scores), run["task"], os.path.join(out, name),
                         title=figures.run_title(run, len(scores), f"Test ROC of {label}"), class_names=names,
                         positive_class=positive, operating_point=point)
        lines += [f"### Test ROC of {label}", "", f"![Test ROC of {label}]({name})", "",
                  "Mean ROC over the run's seeds (TPR interpolated on a common false-positive grid), the band ± 1 SD "
                  "over seeds, the marked point the run's reported operating point. " + vector_links([name]), ""]
    return write_report(out, lines, used)


def main():
    args = cli.parse_args(get_args_parser())
    if bool(args.runs) == bool(args.spec):
        raise UserError("give run folders (a report of every run found) or --spec FILE (a report as the spec "
                        "describes it), one of the two")
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before any figure is drawn
        raise UserError(f"--out {args.out} is a file; give a folder for report.md, runs.csv and the figures")
    if args.runs:
        print(f"wrote {auto_report(args.runs, args.out)}")
        return
    try:
        with open(args.spec) as f:
            spec = yaml.safe_load(f)  # JSON is YAML too
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the spec {args.spec}: {e}".replace("\n", " "))
    print(f"wrote {build_report(spec, args.out)}")


if __name__ == "__main__":
    cli.run_main(main)
