#!/usr/bin/env bash
# bf16 against float32 at the demo's scale: does pretraining (and evaluating) in bf16 autocast give the
# same encoder? BYOL pretrains on PneumoniaMNIST with configs/cpu_demo_byol.yaml (6 epochs, 28 px) from
# seeds 0, 1, 2 in each precision; each encoder is then linearly probed and fine-tuned
# (configs/cpu_demo_eval.yaml) on PneumoniaMNIST in the same precision. The report gives the test AUC as
# mean ± std over the 3 pretraining seeds, their difference against one seed std, and the loss curves.
# At 28 px `auto` takes float32 (bf16 is slower there), so both are forced: what is measured is bf16's
# arithmetic, which `auto` takes from 48 px up on a CPU with native bf16.
#
#   bash scripts/precision_parity.sh             # ~1 h on 2 cores; runs in runs/precision_parity, report in results/precision_parity
#   bash scripts/precision_parity.sh --dry-run   # list the runs
#
# Finished runs are skipped and an interrupted pretraining resumes, so re-running continues.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER="Precision parity"
SCALE_NAME="demo-scale"
RUNS=${RUNS:-runs/precision_parity}
RESULTS=${RESULTS:-results/precision_parity}
SEEDS=(0 1 2)
PRECISIONS=(fp32 bf16)
source scripts/reproduce_lib.sh
parse_args "$@"
export MEDSSL_NO_DOWNLOAD=1

one_seed() {  # the pretraining of one seed and precision, then its probe and fine-tuning
  local p=$1 s=$2 dir=$RUNS/$1-seed$2
  step "$dir/byol" "$PY" pretrain_byol.py --config configs/cpu_demo_byol.yaml --seed "$s" --precision "$p" \
    --out "$dir/byol"
  for mode in linear_probe finetune; do
    step "$dir/$mode" "$PY" evaluate.py --config configs/cpu_demo_eval.yaml --ckpt "$dir/byol/checkpoint.pt" \
      --data pneumoniamnist --mode "$mode" --seed "$s" --precision "$p" --out "$dir/$mode"
  done
}

# two workers of one thread each: the same seed's two precisions side by side, on the same load
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for s in "${SEEDS[@]}"; do
  one_seed fp32 "$s" &
  one_seed bf16 "$s" &
  wait
done
[[ $DRY_RUN == 1 ]] && exit 0

mkdir -p "$RESULTS"
"$PY" - "$RUNS" "$RESULTS" "${SEEDS[*]}" <<'PYEOF'
import json, os, sys
import numpy as np
from common import metrics

runs, results, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split()]
rows, curves, missing = [], {}, []
for mode in ("linear_probe", "finetune"):
    values = {}
    for p in ("fp32", "bf16"):
        got = []
        for s in seeds:
            path = os.path.join(runs, f"{p}-seed{s}", mode, "metrics.json")
            if os.path.isfile(path):
                got.append(json.load(open(path))["mean"]["auc"])
            else:
                missing.append(path)
        values[p] = got
    a, b = np.array(values["fp32"]), np.array(values["bf16"])
    if len(a) and len(b):
        std = max(a.std(ddof=1) if len(a) > 1 else 0, b.std(ddof=1) if len(b) > 1 else 0)
        diff = b.mean() - a.mean()
        rows.append(f"| {mode} | {a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0:.3f} (n={len(a)}) | "
                    f"{b.mean():.3f} ± {b.std(ddof=1) if len(b) > 1 else 0:.3f} (n={len(b)}) | {diff:+.3f} | "
                    f"{'yes' if abs(diff) <= std else 'no'} |")
for p in ("fp32", "bf16"):
    for s in seeds:
        log = os.path.join(runs, f"{p}-seed{s}", "byol", "log.jsonl")
        if os.path.isfile(log):
            records = [json.loads(line) for line in open(log)]
            curves[f"{p}, seed {s}"] = ([r["epoch"] + 1 for r in records], [r["loss"] for r in records])
metrics.plot_training_curves(curves, os.path.join(results, "loss.png"),
                             title="BYOL pretraining loss, PneumoniaMNIST 28 px: float32 and bf16", ylabel="loss")
times = {}
for p in ("fp32", "bf16"):
    per = []
    for s in seeds:
        log = os.path.join(runs, f"{p}-seed{s}", "byol", "log.jsonl")
        if os.path.isfile(log):
            per.append(np.mean([json.loads(line)["images_per_sec"] for line in open(log)]))
    times[p] = f"{np.mean(per):.0f} img/s" if per else "not run"
text = ["# bf16 against float32 at the demo's scale", "",
        "BYOL pretrained with configs/cpu_demo_byol.yaml (6 epochs, PneumoniaMNIST train images, 28 px) from "
        f"seeds {', '.join(map(str, seeds))} in each precision, each encoder probed (logistic regression) and "
        "fine-tuned (configs/cpu_demo_eval.yaml: 5 epochs, 1 evaluation seed = the pretraining seed) in the "
        "same precision. Test AUC, mean ± std over the pretraining seeds; `within` = |bf16 - fp32| <= the "
        "larger of the two seed stds.", "",
        "| evaluation | fp32 | bf16 | bf16 - fp32 | within one seed std |", "|---|---|---|---|---|", *rows, "",
        f"Pretraining speed, one thread per run, the two precisions side by side on a shared machine: fp32 "
        f"{times['fp32']}, bf16 {times['bf16']} (`auto` takes float32 at 28 px, where bf16 does not pay).", "",
        "![loss curves](loss.png)", "", "Command: `bash scripts/precision_parity.sh`."]
if missing:
    text += ["", "Not run: " + ", ".join(missing)]
open(os.path.join(results, "README.md"), "w").write("\n".join(text) + "\n")
print("\n".join(text))
PYEOF
