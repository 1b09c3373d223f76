"""Print a Markdown table of evaluate.py results: one row per metrics.json given.

    python scripts/table.py runs/*/metrics.json"""
import json
import os
import sys


def row(path):
    r = json.load(open(path))
    cells = [f"{r['mean'][k]:.3f} ± {r['std'][k]:.3f}" for k in ("auc", "acc")]
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"| {run} | {r['data']} | {r['mode']} | {r['encoder']} | {r['n']} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    print("| run | dataset | mode | encoder | seeds | test AUC | test ACC |")
    print("|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        print(row(path))
