"""Compare the per-seed test metrics of two groups of evaluation runs (evaluate.py or
finetune_beit.py): each group is one or more metrics.json files (or their run directories) whose
per-seed values are pooled, e.g. 3 pretraining seeds x 3 probe seeds = 9 values. Per metric, as a
Markdown table: mean ± sample std (n) of each group, B - A with the 95% interval of that difference
(Welch), Welch's t-test (unequal variances) and the two-sided Mann-Whitney U test
(common.metrics.compare_samples, on scipy). p-values read "n/a" with fewer than 2 values a side (and
Welch's with no variance at all).

    python scripts/compare.py --a runs/random/metrics.json --b runs/byol/metrics.json
    python scripts/compare.py --a runs/base --b runs/further-s*/ --metrics auc,acc,sensitivity --json out.json

The groups are named from their metrics.json (encoder, mode, data and size, label fraction) unless
--names is given. Runs must share the protocol: data (its hash), split and grouping, image size,
mode, label fraction, shots, probe, --resize and positive class; the first difference is refused
with both values, unless --allow-mismatch (then a warning line, and "mismatch": true in the JSON).

When both groups scored the same test images (one data hash, identical y_true in every run's
predictions.npz), they are also compared on those images, a pair of scores per image: DeLong's test
of the two AUCs for a binary task, a paired bootstrap of the AUC difference otherwise, on each
group's scores averaged over its seeds (an ensemble of them, so its AUC is not the table's mean).
With few seeds the Mann-Whitney test cannot reach p < 0.05 at all (3 a side: p >= 0.1); a line says
so."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cli  # noqa: E402
from common.errors import UserError  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, metavar="RUN", help="metrics.json files or run directories of group A")
    parser.add_argument("--b", nargs="+", required=True, metavar="RUN", help="metrics.json files or run directories of group B")
    parser.add_argument("--metrics", default="auc,acc,weighted_f1",
                        help="comma-separated test metrics to compare (default: %(default)s)")
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), default=None,
                        help="names of the two groups in the table's header (default: from their metrics.json: "
                             "encoder, mode, data and size, label fraction)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare runs whose protocol differs (data, split, size, mode, label fraction, shots, "
                             "probe, resize, positive class) with a warning, instead of refusing")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the paired bootstrap on the test images (non-binary tasks; default: 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the comparison as JSON to FILE")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before scipy and sklearn load

from common.metrics import compare_samples, group_mismatches, group_name, paired_runs_test  # noqa: E402


def read_run(path):
    """The metrics.json at `path` (or inside the run directory `path`), checked for per-seed results."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    try:
        with open(path) as f:
            run = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; pass metrics.json files or run directories")
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): the run may have been "
                        f"interrupted while writing it; re-run it")
    if not isinstance(run, dict) or not isinstance(run.get("per_seed"), list) or not run["per_seed"]:
        raise UserError(f"{path} has no per-seed results: is it a metrics.json of evaluate.py or finetune_beit.py?")
    return path, run


def pooled(runs, metric):
    values = []
    for path, run in runs:
        for s in run["per_seed"]:
            if metric not in s.get("test", {}):
                have = ", ".join(s.get("test", {})) or "none"
                raise UserError(f"{path} has no test metric {metric!r} (it has: {have}); choose --metrics from those")
            values.append(s["test"][metric])
    return values


def p_text(p):
    return "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def ci_text(low, high, digits=4):
    return "n/a" if low is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def table(rows, name_a, name_b):
    lines = [f"| metric | A: {name_a} | B: {name_b} | B − A | 95% CI of B − A (Welch) | p (Welch) | "
             f"p (Mann-Whitney) |", "|---" * 7 + "|"]
    for m, c in rows.items():
        lines.append(f"| {m} | {c['mean_a']:.4f} ± {c['std_a']:.4f} (n={c['n_a']}) | {c['mean_b']:.4f} ± "
                     f"{c['std_b']:.4f} (n={c['n_b']}) | {c['diff']:+.4f} | "
                     f"{ci_text(c['diff_ci95_low'], c['diff_ci95_high'])} | {p_text(c['welch_p'])} | "
                     f"{p_text(c['mwu_p'])} |")
    return lines


def shown(value):
    return "(not set)" if value is None else str(value)


def mismatch_error(found, paths):
    field, a, b, i = found[0]
    return (f"runs differ in {field}: {paths[0]} has {shown(a)}, {paths[i]} has {shown(b)}; compare runs of one "
            f"protocol, or pass --allow-mismatch to compare them anyway")


def mismatch_warning(found):
    fields = "; ".join(f"{field} ({shown(a)} vs {shown(b)})" for field, a, b, _ in found)
    return f"warning: the runs differ in {fields}: compared anyway (--allow-mismatch)"


def paired_line(result, why):
    if result is None:
        return f"no paired test on the test images: {why}"
    test = ("DeLong's test" if result["method"] == "DeLong"
            else f"a paired bootstrap of the images ({result['n_boot']} resamples)")
    return (f"paired on the same {result['n_images']} test images, {test}, each group's scores averaged over its "
            f"{result['n_scores_a']} and {result['n_scores_b']} seeds: AUC {result['auc_a']:.4f} vs "
            f"{result['auc_b']:.4f}, B − A {result['diff']:+.4f}, 95% CI "
            f"{ci_text(result['ci_low'], result['ci_high'])}, p = {p_text(result['p'])}")


def min_p_line(rows):
    """One line when the Mann-Whitney test cannot reach p < 0.05 with these numbers of values."""
    short = [c for c in rows.values() if c["mwu_min_p"] is not None and c["mwu_min_p"] >= 0.05]
    if not short:
        return None
    c = short[0]
    below = any(r["mwu_p"] is not None and r["mwu_p"] < r["mwu_min_p"] for r in short)
    return (f"note: with {c['n_a']} and {c['n_b']} values the exact two-sided Mann-Whitney test cannot go below "
            f"p = {c['mwu_min_p']:.3f}, so it cannot reach p < 0.05 whatever the difference"
            + (" (a lower p above is scipy's normal approximation for tied values)" if below else "")
            + "; 4 seeds a side can reach 0.029")


def check_output(path):
    """--json's file can be written: not a folder, in an existing writable folder (checked before any work)."""
    if os.path.isdir(path):
        raise UserError(f"--json {path} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--json {path}: the folder {folder} does not exist; create it or give another file")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--json {path}: the folder {folder} is not writable; give a file in another folder")


def main():
    args = cli.parse_args(get_args_parser())
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not names:
        raise UserError("--metrics is empty; give e.g. --metrics auc,acc")
    if args.json:
        check_output(args.json)
    a, b = [read_run(p) for p in args.a], [read_run(p) for p in args.b]
    paths = [p for p, _ in a + b]
    found = group_mismatches([r for _, r in a], [r for _, r in b])
    if found and not args.allow_mismatch:
        raise UserError(mismatch_error(found, paths))
    if args.names:
        name_a, name_b = args.names
    else:
        name_a, name_b = (group_name([r for _, r in g], [p for p, _ in g]) for g in (a, b))
        if name_a == name_b:  # the same description: tell the groups apart by their folders
            name_a, name_b = group_name([], [p for p, _ in a]), group_name([], [p for p, _ in b])
    rows = {m: compare_samples(pooled(a, m), pooled(b, m)) for m in names}
    paired, why = paired_runs_test([(r, os.path.dirname(p)) for p, r in a], [(r, os.path.dirname(p)) for p, r in b],
                                   seed=args.seed)
    lines = ([mismatch_warning(found)] if found else []) + table(rows, name_a, name_b) + [""]
    lines += [line for line in (paired_line(paired, why), min_p_line(rows)) if line]
    print("\n".join(lines))
    if args.json:
        saved = {"a": [p for p, _ in a], "b": [p for p, _ in b], "names": {"a": name_a, "b": name_b},
                 "mismatch": bool(found), "mismatches": [{"field": f, "a": va, "b": vb, "run": paths[i]}
                                                         for f, va, vb, i in found],
                 "metrics": rows, "paired": paired, "paired_not_done": why}
        try:
            with open(args.json, "w") as f:
                json.dump(saved, f, indent=2)
        except OSError as e:
            raise UserError(f"cannot write --json {args.json}: {e.strerror}")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    cli.run_main(main)
