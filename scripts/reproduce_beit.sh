#!/usr/bin/env bash
# Reproduces paper 000 (BEiT on MedMNIST): BEiT fine-tuned on 28 px images upsampled to 224 ("BEiT (28)")
# and on MedMNIST+ 224 px images ("BEiT (224)"), each on all training images and on a class-balanced
# undersample (minority share 0.4 on BreastMNIST, 0.5 on PneumoniaMNIST), beside MedMNIST v2's
# ResNet-18/50 (28)/(224) baselines (configs/medmnist_resnet*.yaml through evaluate.py). Test AUC / ACC
# tables with the published numbers (the AutoML rows are quoted only) and ROC plots.
#
#   bash scripts/reproduce_beit.sh            # paper scale (GPU): -> runs/beit, results/beit
#   QUICK=1 bash scripts/reproduce_beit.sh    # CPU scale (~20 min on 2 busy cores): -> runs/quick/beit, results/quick/beit
#   bash scripts/reproduce_beit.sh --dry-run  # (or DRY_RUN=1) list the runs, write the spec, train nothing
#   DATA=path/to/labelled bash scripts/reproduce_beit.sh   # the same rows on your own labelled images
#
# DATA= (any labelled source: a folder of class folders, a CSV manifest or an .npz; docs/DATA.md)
# replaces BreastMNIST and PneumoniaMNIST in every row; DATA_BALANCE= is its balanced rows' minority
# share (default 0.5) and DATA_FLAGS="..." adds data flags. Published numbers are MedMNIST's, so its
# rows have none.
#
# Finished runs are skipped, so re-running continues an interrupted reproduction. BEiT needs
# microsoft/beit-large-patch16-224 from the Hugging Face hub (or BEIT=<local folder>); without it the
# BEiT rows say "not run: <the error>". RUNS=, RESULTS=, PY= override the folders and the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER="Paper 000 (BEiT)"
QUICK=${QUICK:-0}
DATASETS=(breastmnist pneumoniamnist)
declare -A BALANCE=([breastmnist]=0.4 [pneumoniamnist]=0.5)   # the paper's minority shares
BEIT=${BEIT:-microsoft/beit-large-patch16-224}
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-runs/quick/beit}
  RESULTS=${RESULTS:-results/quick/beit}
  # BEiT-large cannot train on 2 CPU cores in minutes: one capped epoch is only there to show the step works
  BEIT_FLAGS=(--epochs 1 --max-steps 2 --seeds 1)
  # MedMNIST v2's protocol cut to 2 epochs of 3 batches of 128, 1 seed: the small-stem ResNets keep
  # 28x28 feature maps in layer1 and train at ~20 images/s on a CPU core; the (224) rows upsample to
  # 64 px instead of 224 (a ResNet at 224 px costs ~60x more per image)
  RESNET_FLAGS=(--epochs 2 --max-steps 3 --seeds 1)
  # float32 as the committed QUICK numbers were computed (auto takes bf16 at 64 px on a CPU that has it)
  RESNET_224_FLAGS=(--resize 64 --precision fp32)
  # what a CPU can show of the BEiT rows: the same pipeline (resize + normalise, top-k layers,
  # one-logit BCE, best-validation epoch) on a tiny randomly initialised BEiT (4 layers, width 32,
  # 32 px input) made here with save_pretrained. Its numbers say nothing about BEiT-large.
  TINY_BEIT=$RUNS/tiny-random-beit
  TINY_BEIT_FLAGS=(--epochs 3 --trainable-layers 2 --batch-size 64 --lr 1e-3 --seeds 2)
else
  RUNS=${RUNS:-runs/beit}
  RESULTS=${RESULTS:-results/beit}
  BEIT_FLAGS=(--seeds 3)   # the paper's 5 epochs, AdamW 3e-4, top 5 layers are finetune_beit.py's defaults
  RESNET_FLAGS=()          # configs/medmnist_resnet*.yaml as they are: 100 epochs, 3 seeds
  RESNET_224_FLAGS=()
fi
DATA_REPLACES="BreastMNIST and PneumoniaMNIST in every row"
source scripts/reproduce_lib.sh
parse_args "$@"
declare -A SOURCE=([breastmnist]=breastmnist [pneumoniamnist]=pneumoniamnist)   # run name -> --data
if [[ -n $DATA ]]; then
  name=$(data_name "$DATA")
  DATASETS=("$name")
  SOURCE[$name]=$DATA
  BALANCE[$name]=${DATA_BALANCE:-0.5}
fi

# ---------------------------------------------------------------- runs
if [[ $QUICK == 1 && $DRY_RUN == 0 && ! -f $TINY_BEIT/config.json ]]; then
  "$PY" - "$TINY_BEIT" <<'EOF2'
import sys, torch
from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor
torch.manual_seed(0)
config = BeitConfig(image_size=32, patch_size=8, num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                    intermediate_size=64, use_mean_pooling=True, use_relative_position_bias=True)
BeitForImageClassification(config).save_pretrained(sys.argv[1])
BeitImageProcessor(size={"height": 32, "width": 32}).save_pretrained(sys.argv[1])
EOF2
fi
for data in "${DATASETS[@]}"; do
  data_src=(--data "${SOURCE[$data]}" "${DATA_ARGS[@]}")
  for net in resnet18 resnet50; do
    step "$RUNS/$data-$net-28" "$PY" evaluate.py --config "configs/medmnist_${net}_28.yaml" "${data_src[@]}" \
      "${RESNET_FLAGS[@]}" --out "$RUNS/$data-$net-28"
    step "$RUNS/$data-$net-224" "$PY" evaluate.py --config "configs/medmnist_${net}_224.yaml" "${data_src[@]}" \
      "${RESNET_FLAGS[@]}" "${RESNET_224_FLAGS[@]}" --out "$RUNS/$data-$net-224"
  done
  for size in 28 224; do
    step "$RUNS/$data-beit-$size" "$PY" finetune_beit.py --model "$BEIT" "${data_src[@]}" --size "$size" \
      "${BEIT_FLAGS[@]}" --out "$RUNS/$data-beit-$size"
    step "$RUNS/$data-beit-$size-balanced" "$PY" finetune_beit.py --model "$BEIT" "${data_src[@]}" --size "$size" \
      --balance "${BALANCE[$data]}" "${BEIT_FLAGS[@]}" --out "$RUNS/$data-beit-$size-balanced"
  done
  if [[ $QUICK == 1 ]]; then
    step "$RUNS/$data-tinybeit-28" "$PY" finetune_beit.py --model "$TINY_BEIT" "${data_src[@]}" --size 28 \
      "${TINY_BEIT_FLAGS[@]}" --out "$RUNS/$data-tinybeit-28"
    step "$RUNS/$data-tinybeit-28-balanced" "$PY" finetune_beit.py --model "$TINY_BEIT" "${data_src[@]}" --size 28 \
      --balance "${BALANCE[$data]}" "${TINY_BEIT_FLAGS[@]}" --out "$RUNS/$data-tinybeit-28-balanced"
  fi
done

# ---------------------------------------------------------------- report spec
mkdir -p "$RESULTS"
if [[ $QUICK == 1 ]]; then
  INTRO="QUICK (CPU-scale) mode, not the paper's numbers. Substitutions: the ResNet baselines ran 2 epochs
of at most 3 batches of 128 (MedMNIST v2: 100 epochs, lr x0.1 at 50 and 75) with 1 seed, and their (224) rows
upsample the 28 px images to 64 px, not 224; BEiT was given 1 epoch of 2 batches and 1 seed (it needs
the BEiT-large weights, which this machine cannot download, and the MedMNIST+ 224 px files, which it
lacks). The \"tiny random BEiT\" rows run the same BEiT pipeline on a 4-layer, width-32, 32 px BEiT
initialised at random (3 epochs, top 2 layers, AdamW 1e-3, 2 seeds): a check that the pipeline runs
on real data, not an estimate of BEiT-large. Only the real breastmnist.npz and pneumoniamnist.npz were read."
else
  INTRO="Paper scale: finetune_beit.py's paper defaults (5 epochs, AdamW 3e-4, top 5 layers of BEiT-large)
with 3 seeds; the ResNet rows follow MedMNIST v2's protocol (configs/medmnist_resnet*.yaml)."
fi
if [[ -n $DATA ]]; then
  INTRO="$INTRO
Every row ran on $DATA instead of BreastMNIST and PneumoniaMNIST (balanced rows: minority share
${BALANCE[${DATASETS[0]}]}); the published numbers are MedMNIST's and are not shown."
fi
# published AUC / ACC: MedMNIST v2 Table 3 (ResNets, AutoML) and paper 000's table (BEiT);
# written as strings so that 0.910 keeps its last digit in the report
declare -A PUB=(
  [breastmnist-resnet18-28]="0.901 0.863" [breastmnist-resnet18-224]="0.891 0.833"
  [breastmnist-resnet50-28]="0.857 0.812" [breastmnist-resnet50-224]="0.866 0.842"
  [breastmnist-beit-28]="0.910 0.891" [breastmnist-beit-28-balanced]="0.910 0.872"
  [breastmnist-beit-224]="0.904 0.885" [breastmnist-beit-224-balanced]="0.908 0.878"
  [breastmnist-auto-sklearn]="0.836 0.803" [breastmnist-AutoKeras]="0.871 0.831"
  [breastmnist-Google AutoML Vision]="0.919 0.861"
  [pneumoniamnist-resnet18-28]="0.944 0.854" [pneumoniamnist-resnet18-224]="0.956 0.864"
  [pneumoniamnist-resnet50-28]="0.948 0.854" [pneumoniamnist-resnet50-224]="0.962 0.884"
  [pneumoniamnist-beit-28]="0.979 0.881" [pneumoniamnist-beit-28-balanced]="0.974 0.926"
  [pneumoniamnist-beit-224]="0.985 0.912" [pneumoniamnist-beit-224-balanced]="0.983 0.918"
  [pneumoniamnist-auto-sklearn]="0.942 0.855" [pneumoniamnist-AutoKeras]="0.947 0.878"
  [pneumoniamnist-Google AutoML Vision]="0.991 0.946"
)
row() {  # row DATA RUN LABEL: one table row, with its published AUC / ACC (own data: none)
  local pub=(${PUB[$1-$2]:-})
  if [[ ${#pub[@]} == 2 ]]; then
    echo "      - {label: \"$3\", runs: \"$RUNS/$1-$2\", published: {auc: \"${pub[0]}\", acc: \"${pub[1]}\"}}"
  else
    echo "      - {label: \"$3\", runs: \"$RUNS/$1-$2\"}"
  fi
}
rows() {  # the measured rows of one dataset (tables and ROC figures share them)
  row "$1" resnet18-28 "ResNet-18 (28)"; row "$1" resnet18-224 "ResNet-18 (224)"
  row "$1" resnet50-28 "ResNet-50 (28)"; row "$1" resnet50-224 "ResNet-50 (224)"
  row "$1" beit-28 "BEiT (28)"; row "$1" beit-28-balanced "BEiT (28) balanced ${BALANCE[$1]}"
  row "$1" beit-224 "BEiT (224)"; row "$1" beit-224-balanced "BEiT (224) balanced ${BALANCE[$1]}"
  if [[ $QUICK == 1 ]]; then
    echo "      - {label: \"tiny random BEiT (28), pipeline check\", runs: \"$RUNS/$1-tinybeit-28\"}"
    echo "      - {label: \"tiny random BEiT (28) balanced ${BALANCE[$1]}, pipeline check\", runs: \"$RUNS/$1-tinybeit-28-balanced\"}"
  fi
}
{
  spec_head "BEiT vs ResNet and AutoML on BreastMNIST and PneumoniaMNIST"
  for data in "${DATASETS[@]}"; do
    echo "  - title: \"$data (test)\""
    echo "    metrics: [auc, acc]"
    [[ -n $DATA ]] || echo "    source: \"the papers' published tables (MedMNIST v2 Table 3; paper 000)\""
    echo "    rows:"
    rows "$data"
    [[ -n $DATA ]] && automls=() || automls=(auto-sklearn AutoKeras "Google AutoML Vision")
    for automl in "${automls[@]}"; do
      pub=(${PUB[$data-$automl]})
      echo "      - {label: \"$automl\", runs: [], not_run: \"AutoML systems are not re-run here; published numbers quoted\"," \
           "published: {auc: \"${pub[0]}\", acc: \"${pub[1]}\"}}"
    done
    echo "    compare: [[\"ResNet-18 (28)\", \"BEiT (28)\"], [\"BEiT (28)\", \"BEiT (28) balanced ${BALANCE[$data]}\"]]"
    echo "    allow_mismatch: [mode]"  # ResNet-18 fine-tuned by evaluate.py against BEiT by finetune_beit.py
  done
  echo "figures:"
  for data in "${DATASETS[@]}"; do
    echo "  - kind: roc"
    echo "    title: \"$data ROC (test)\""
    echo "    rows:"
    rows "$data" | sed 's/, published: {[^}]*}//'
  done
} >"$RESULTS/spec.yaml"
make_report
