"""Pick a pretraining recipe on the kNN monitor of the validation split: each run directory given is
one candidate recipe (a short pretraining run with --eval-every on); of those that finished, the one
whose last logged `knn_val_auc` is highest wins. Prints the winner's directory name (--print-flags:
its --crop-scale and --lr instead); --table writes every candidate's flags and monitor value as a
Markdown table, so the report says what was tried.

    python scripts/select_recipe.py runs/label_efficiency/sweep-byol-* --table sweep-byol.md

Only the validation split is read (through the runs' own logs): the test split plays no part in
the choice. Ties go to the first candidate given."""
import argparse
import math
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cli  # noqa: E402
from common.errors import UserError  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of the candidate recipes")
    parser.add_argument("--table", default=None, help="write the candidates as a Markdown table to this file")
    parser.add_argument("--print-flags", action="store_true",
                        help="print the winner's --crop-scale and --lr (from its args.yaml) instead of its name")
    return parser


if __name__ == "__main__":
    cli.parse_early(get_args_parser)  # --help, --version and flag errors answer before torch loads

from common.rundir import atomic_write_text, read_log  # noqa: E402

# the flags a recipe sweep varies, shown in the table in this order when a run has them
RECIPE_FLAGS = ("aug", "crop_scale", "batch_size", "lr", "optimizer", "epochs")


def last_monitor(run):
    """(epoch, knn_val_auc) of the last monitored epoch in run/log.jsonl, or None when there is none
    or it is not a finite number. A torn last line is dropped; other damage is a UserError."""
    monitored = [r for r in read_log(os.path.join(run, "log.jsonl")) if isinstance(r, dict) and "knn_val_auc" in r]
    if not monitored:
        return None
    epoch, value = monitored[-1].get("epoch"), monitored[-1]["knn_val_auc"]
    if not isinstance(epoch, int) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return epoch + 1, value


def recipe(run):
    try:
        with open(os.path.join(run, "args.yaml")) as f:
            args = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: args[k] for k in RECIPE_FLAGS if k in args} if isinstance(args, dict) else {}


def score(run):
    """The run's last monitor value, counted only when it was logged at the run's last epoch: a run
    stopped half-way is not a candidate."""
    m = last_monitor(run)
    epochs = recipe(run).get("epochs")
    return m if m and (epochs is None or m[0] >= epochs) else None


def check_output(path, flag):
    """Refuse an output file whose folder is missing or unwritable, or that is a folder, before any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'recipes.md')}")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist; create it (mkdir -p) or choose another")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write in {folder}; choose a folder you can write to")


def main():
    args = cli.parse_args(get_args_parser())
    for run in args.runs:
        if not os.path.isdir(run):
            what = "a file" if os.path.exists(run) else "it does not exist"
            raise UserError(f"{run} is not a run directory ({what}); give the pretraining runs' folders")
    if args.table:
        check_output(args.table, "--table")
    scored = [(run, score(run)) for run in args.runs]
    measured = [(run, m) for run, m in scored if m is not None]
    if not measured:
        raise UserError(f"none of the {len(args.runs)} runs finished with a kNN monitor value (knn_val_auc) in its "
                        f"log.jsonl: pretrain them to their last epoch with --eval-every N")
    best = max(measured, key=lambda item: item[1][1])[0]  # max keeps the first of equals
    if args.table:
        flags = list(dict.fromkeys(k for run, _ in scored for k in recipe(run)))
        lines = ["| candidate | " + " | ".join(f.replace("_", " ") for f in flags) + " | kNN val AUC (epoch) | chosen |",
                 "|---" * (len(flags) + 3) + "|"]
        for run, m in scored:
            r = recipe(run)
            cells = [" ".join(map(str, r[f])) if isinstance(r.get(f), list) else str(r.get(f, "")) for f in flags]
            value = f"{m[1]:.4f} ({m[0]})" if m else "not run or not finished"
            lines.append(f"| {os.path.basename(os.path.normpath(run))} | " + " | ".join(cells) +
                         f" | {value} | {'yes' if run == best else ''} |")
        atomic_write_text(args.table, "\n".join(lines) + "\n")
    if args.print_flags:
        r = recipe(best)
        if "crop_scale" not in r or "lr" not in r:
            raise UserError(f"{best}/args.yaml names no crop_scale and lr: is it a run of a pretraining script?")
        print(f"--crop-scale {r['crop_scale'][0]} {r['crop_scale'][1]} --lr {r['lr']}")
    else:
        print(os.path.basename(os.path.normpath(best)))


if __name__ == "__main__":
    cli.run_main(main)
