#!/usr/bin/env bash
# `make demo`: BYOL+ pretraining on the PneumoniaMNIST train images (labels unused), then a linear
# probe and a fine-tune on PneumoniaMNIST and BreastMNIST of the BYOL encoder and of a random-init
# encoder; prints a table of test AUC / ACC.
# The same script measures the README's quality bar with other recipes, e.g.
#   PRETRAIN=configs/cpu_byol.yaml EVAL=configs/cpu_eval_3seeds.yaml MODES=linear_probe bash scripts/demo.sh
# and CKPT=<checkpoint.pt> evaluates an existing encoder instead of pretraining one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRETRAIN=${PRETRAIN:-configs/cpu_demo_byol.yaml}
EVAL=${EVAL:-configs/cpu_demo_eval.yaml}
MODES=${MODES:-linear_probe finetune}
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
CKPT=${CKPT:-}
TAG=$(basename "$EVAL" .yaml)

if [ -z "$CKPT" ]; then
  $PY pretrain_byol.py --config "$PRETRAIN" --out "$RUN/byol"
  CKPT=$RUN/byol/checkpoint.pt
fi
for data in pneumoniamnist breastmnist; do
  for mode in $MODES; do
    $PY evaluate.py --config "$EVAL" --data "$data" --mode "$mode" \
      --ckpt "$CKPT" --out "$RUN/$data-$mode-byol-$TAG" | tail -n 1
    $PY evaluate.py --config "$EVAL" --data "$data" --mode "$mode" \
      --init random --out "$RUN/$data-$mode-random-$TAG" | tail -n 1
  done
done
echo
$PY scripts/table.py "$RUN"/*-*-*-*/metrics.json | tee "$RUN/table.md"
