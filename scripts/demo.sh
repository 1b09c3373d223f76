#!/usr/bin/env bash
# The demo behind `make demo`: BYOL pretraining (Grill et al.'s views, configs/cpu_demo_byol.yaml) on
# the PneumoniaMNIST train images (labels unused), then a linear probe and a fine-tune on
# PneumoniaMNIST and BreastMNIST of the BYOL encoder and of a random-init encoder; prints a table of
# test AUC / ACC and writes it to $RUN/table.md. About 10 minutes on 2 CPU cores.
#
#   bash scripts/demo.sh                      # or: make demo
#   CKPT=runs/x/checkpoint.pt bash scripts/demo.sh    # evaluate an existing encoder instead
#   PRETRAIN=configs/cpu_byol.yaml EVAL=configs/cpu_eval_3seeds.yaml MODES=linear_probe bash scripts/demo.sh
#
# Settings (environment): PRETRAIN, EVAL (YAML recipes), MODES (default "linear_probe finetune"),
# RUN (output folder, default runs/demo-<time>), CKPT, PY (default .venv/bin/python).
# Data: $MEDMNIST_ROOT, else the offline copy the Makefile uses when there is one, else medmnist's
# ~/.medmnist (missing files are downloaded; MEDSSL_NO_DOWNLOAD=1 forbids it).
set -euo pipefail
for arg in "$@"; do
  case $arg in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$arg' (the demo takes settings from the environment; see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRETRAIN=${PRETRAIN:-configs/cpu_demo_byol.yaml}
EVAL=${EVAL:-configs/cpu_demo_eval.yaml}
MODES=${MODES:-linear_probe finetune}
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}
CKPT=${CKPT:-}
TAG=$(basename "$EVAL" .yaml)
OFFLINE_MEDMNIST=${OFFLINE_MEDMNIST:-$(sed -n 's/^OFFLINE_MEDMNIST ?= *//p' Makefile 2>/dev/null)}  # the Makefile's default
if [[ -z ${MEDMNIST_ROOT:-} && -f $OFFLINE_MEDMNIST/pneumoniamnist.npz ]]; then
  MEDMNIST_ROOT=$(cd "$OFFLINE_MEDMNIST" && pwd)
  export MEDMNIST_ROOT
fi
[[ -x $PY ]] || { echo "error: no Python at $PY (run 'make test' once to create .venv, or set PY=...)" >&2; exit 2; }

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
