"""Compare per-seed test metrics of two GROUPS of evaluate.py runs, each group given as one or more
metrics.json files whose per-seed values are pooled (e.g. 3 further-pretraining seeds x 3 probe
seeds = 9 runs), with Welch's t-test and Mann-Whitney U (common.metrics.compare_samples).

    python scripts/pool_compare.py --a runs/base/metrics.json --b runs/further-s*/metrics.json"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.metrics import compare_samples  # noqa: E402


def pooled(paths, metric):
    return [run["test"][metric] for path in paths for run in json.load(open(path))["per_seed"]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--a", nargs="+", required=True, help="metrics.json files of group A")
    parser.add_argument("--b", nargs="+", required=True, help="metrics.json files of group B")
    parser.add_argument("--metrics", default="auc,acc,weighted_f1")
    args = parser.parse_args()
    print("| metric | A mean ± std (n) | B mean ± std (n) | B - A | p (Welch) | p (Mann-Whitney) |")
    print("|---|---|---|---|---|---|")
    for m in args.metrics.split(","):
        c = compare_samples(pooled(args.a, m), pooled(args.b, m))
        p = {k: "n/a" if c[k] is None else f"{c[k]:.3g}" for k in ("welch_p", "mwu_p")}
        print(f"| {m} | {c['mean_a']:.4f} ± {c['std_a']:.4f} ({c['n_a']}) | {c['mean_b']:.4f} ± {c['std_b']:.4f} "
              f"({c['n_b']}) | {c['diff']:+.4f} | {p['welch_p']} | {p['mwu_p']} |")
