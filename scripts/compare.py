"""Compare the per-seed test metrics of two groups of evaluation runs (evaluate.py or
finetune_beit.py): each group is one or more metrics.json files (or their run directories) whose
per-seed values are pooled, e.g. 3 pretraining seeds x 3 probe seeds = 9 values. Per metric: mean ±
sample std (n) of each group, B - A, Welch's t-test (unequal variances) and the two-sided
Mann-Whitney U test (common.metrics.compare_samples, on scipy), as a Markdown table. p-values read
"n/a" with fewer than 2 values a side (and Welch's with no variance at all).

    python scripts/compare.py --a runs/random/metrics.json --b runs/byol/metrics.json
    python scripts/compare.py --a runs/base --b runs/further-s*/ --metrics auc,acc,sensitivity --json out.json

With n = 3 a side the Mann-Whitney p cannot go below 0.1 (two-sided, exact): more seeds are needed
for it to reach 0.05."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.cli import UserError, run_main  # noqa: E402
from common.metrics import compare_samples  # noqa: E402


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


def table(rows, name_a, name_b):
    lines = [f"| metric | A: {name_a} | B: {name_b} | B − A | p (Welch) | p (Mann-Whitney) |", "|---" * 6 + "|"]
    for m, c in rows.items():
        lines.append(f"| {m} | {c['mean_a']:.4f} ± {c['std_a']:.4f} (n={c['n_a']}) | {c['mean_b']:.4f} ± "
                     f"{c['std_b']:.4f} (n={c['n_b']}) | {c['diff']:+.4f} | {p_text(c['welch_p'])} | "
                     f"{p_text(c['mwu_p'])} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, metavar="RUN", help="metrics.json files or run directories of group A")
    parser.add_argument("--b", nargs="+", required=True, metavar="RUN", help="metrics.json files or run directories of group B")
    parser.add_argument("--metrics", default="auc,acc,weighted_f1",
                        help="comma-separated test metrics to compare (default: %(default)s)")
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), default=("A", "B"),
                        help="names of the two groups in the table's header (default: A B)")
    parser.add_argument("--json", metavar="FILE", help="also write the comparison as JSON to FILE")
    args = parser.parse_args()
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not names:
        raise UserError("--metrics is empty; give e.g. --metrics auc,acc")
    if args.json and os.path.isdir(args.json):
        raise UserError(f"--json {args.json} is a directory; give a file name")
    a, b = [read_run(p) for p in args.a], [read_run(p) for p in args.b]
    rows = {m: compare_samples(pooled(a, m), pooled(b, m)) for m in names}
    print("\n".join(table(rows, *args.names)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": [p for p, _ in a], "b": [p for p, _ in b], "metrics": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)
