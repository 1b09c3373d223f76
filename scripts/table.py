"""Print a Markdown table of evaluation results (evaluate.py, finetune_beit.py): one row per
metrics.json given, with the test AUC and ACC as mean ± sample std over its seeds.

    python scripts/table.py runs/*/metrics.json

Rows must be comparable: two runs that name the same dataset but scored different data (their
data_hash differs: another image size, an edited folder, another split) are refused, naming both;
--mixed-data lists them anyway, with a column of each row's data hash to tell them apart."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.cli import one_line_errors, run_main  # noqa: E402
from common.errors import UserError, escape  # noqa: E402


def read(path):
    """The metrics.json at `path` (or in the run directory `path`): (path, its dict)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    try:
        with open(path) as f:
            r = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; pass metrics.json files or run directories")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path} is not valid JSON ({why}): the run may have been interrupted; re-run it")
    if not isinstance(r, dict):
        raise UserError(f"{path} is not a metrics.json of evaluate.py or finetune_beit.py (not a JSON object)")
    return path, r


def row(path, r, with_hash=False):
    try:
        cells = [f"{r['mean'][k]:.3f} ± {r['std'][k]:.3f}" for k in ("auc", "acc")]
        run = os.path.basename(os.path.dirname(os.path.abspath(path)))
        data = [escape(r["data"])] + ([str(r.get("data_hash") or "not recorded")[:12]] if with_hash else [])
        return (f"| {escape(run)} | " + " | ".join(data) + f" | {escape(r['mode'])} | {escape(r['encoder'])} | "
                f"{r['n']} | " + " | ".join(cells) + " |")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a metrics.json of evaluate.py or finetune_beit.py (no {e})")


def same_name_other_data(runs):
    """The first two runs that name the same dataset with different data hashes, or None. Runs that
    record no hash (older ones) cannot be told apart and pass."""
    first = {}
    for path, r in runs:
        name, digest = r.get("data"), r.get("data_hash")
        if digest is None or not isinstance(name, str):
            continue
        seen = first.setdefault(name, (path, digest))
        if seen[1] != digest:
            return name, seen, (path, digest)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="metrics.json",
                        help="metrics.json files (or run directories), one table row each")
    parser.add_argument("--mixed-data", action="store_true",
                        help="list runs of the same dataset name scored on different data (data_hash), with a "
                             "data hash column, instead of refusing them")
    args = one_line_errors(parser).parse_args()
    runs = [read(path) for path in args.files]  # every file read before the table starts
    clash = same_name_other_data(runs)
    if clash and not args.mixed_data:
        name, (a, ha), (b, hb) = clash
        raise UserError(f"{a} and {b} both name {escape(name)} but scored different data (data_hash "
                        f"{ha[:12]} vs {hb[:12]}): one table would mix them; table them apart, or pass "
                        f"--mixed-data to list them with their hashes")
    with_hash = bool(clash)
    rows = [row(path, r, with_hash) for path, r in runs]
    print("| run | dataset | " + ("data hash | " if with_hash else "") +
          "mode | encoder | seeds | test AUC | test ACC |")
    print("|---" * (8 if with_hash else 7) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    run_main(main)
