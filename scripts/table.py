"""Print a Markdown table of evaluation results (evaluate.py, finetune_beit.py): one row per
metrics.json given, with the test AUC and ACC as mean ± sample std over its seeds.

    python scripts/table.py runs/*/metrics.json"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.cli import UserError, run_main  # noqa: E402


def row(path):
    try:
        with open(path) as f:
            r = json.load(f)
        cells = [f"{r['mean'][k]:.3f} ± {r['std'][k]:.3f}" for k in ("auc", "acc")]
        run = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"| {run} | {r['data']} | {r['mode']} | {r['encoder']} | {r['n']} | " + " | ".join(cells) + " |"
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}): the run may have been interrupted; re-run it")
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is not a metrics.json of evaluate.py or finetune_beit.py (no {e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="metrics.json", help="metrics.json files, one table row each")
    args = parser.parse_args()
    rows = [row(path) for path in args.files]  # every file read before the table starts
    print("| run | dataset | mode | encoder | seeds | test AUC | test ACC |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    run_main(main)
