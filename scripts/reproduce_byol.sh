#!/usr/bin/env bash
# Reproduces paper 001 (BYOL for limited-label medical images): BYOL and BYOL+ pretrained on ChestMNIST
# from an ImageNet-initialised ResNet-18, then fine-tuning, a linear probe and few-shot fine-tuning
# (20 images per class) on PneumoniaMNIST, BreastMNIST and DermaMNIST, against the ImageNet-init
# ResNet-18 itself ("base"). Tables of test AUC, ACC, precision, recall and F1 beside the published
# numbers, and confusion matrices of the fine-tuned models.
#
#   bash scripts/reproduce_byol.sh            # paper scale (GPU, configs/paper001_byol.yaml): -> runs/byol, results/byol
#   QUICK=1 bash scripts/reproduce_byol.sh    # CPU scale (~12 min on 2 quiet cores): -> runs/quick/byol, results/quick/byol
#   bash scripts/reproduce_byol.sh --dry-run  # (or DRY_RUN=1) list the runs, write the spec, train nothing
#   DATA=path/to/xrays bash scripts/reproduce_byol.sh   # pretrain on your own images instead of ChestMNIST
#
# DATA= (a folder, a CSV manifest or an .npz, labelled or not; docs/DATA.md) replaces the pretraining
# corpus (ChestMNIST; QUICK: PneumoniaMNIST's train images); DATA_FLAGS="..." adds data flags to those
# runs. The evaluations stay on the paper's MedMNIST datasets, so the published numbers still apply.
#
# Finished runs are skipped, so re-running continues an interrupted reproduction. A dataset or weights
# that cannot be had make "not run: <reason>" rows. RUNS=, RESULTS=, PY= override the folders and the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER="Paper 001 (BYOL)"
QUICK=${QUICK:-0}
DATASETS=(pneumoniamnist breastmnist dermamnist)
MODES=(finetune linear_probe fewshot)
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-runs/quick/byol}
  RESULTS=${RESULTS:-results/quick/byol}
  # PneumoniaMNIST's train images stand in for ChestMNIST (not on this machine); random init, as
  # no ImageNet weights can be downloaded; 3 epochs of 25 batches of 64 instead of 1000 epochs
  PRETRAIN=(--config configs/cpu_demo_byol.yaml --init random --epochs 3 --max-steps 25)
  PRETRAIN_DATA=(--data pneumoniamnist)
  # --precise-bn on: with 30 steps BN's running averages lag the weights (see evaluate.py --precise-bn).
  # --weight-decay 0: the committed QUICK numbers were made without weight decay (evaluate.py's default
  # is paper 001's 1e-6); the same machine and thread count regenerate them exactly
  declare -A EVAL=([finetune]="--epochs 3 --max-steps 10 --precise-bn on --weight-decay 0 --seeds 2"
                   [linear_probe]="--seeds 2" [fewshot]="--shots 20 --epochs 15 --weight-decay 0 --seeds 2")
  # the ImageNet-init base model cannot be had offline: a random-init encoder stands beside it
  BASELINES=(imagenet random)
else
  RUNS=${RUNS:-runs/byol}
  RESULTS=${RESULTS:-results/byol}
  PRETRAIN=(--config configs/paper001_byol.yaml)
  PRETRAIN_DATA=()  # the config's chestmnist
  # paper 001 §5.2-5.4: fine-tune 25 epochs Adam 1e-3; 50-epoch SGD linear head; 20 shots, 50 epochs
  declare -A EVAL=([finetune]="--seeds 3" [linear_probe]="--probe sgd --seeds 3" [fewshot]="--shots 20 --seeds 3")
  BASELINES=(imagenet)
fi
DATA_REPLACES="the pretraining corpus ($([[ $QUICK == 1 ]] && echo "PneumoniaMNIST's train images, QUICK's stand-in" || echo ChestMNIST))"
source scripts/reproduce_lib.sh
parse_args "$@"
[[ -n $DATA ]] && PRETRAIN_DATA=(--data "$DATA" "${DATA_ARGS[@]}")

# ---------------------------------------------------------------- runs
# paper 001's BYOL used lucidrains/byol-pytorch's default views (our `paper001` preset); BYOL+ adds
# cutout, contrast and brightness (`byol+`)
step "$RUNS/pretrain-byol" "$PY" pretrain_byol.py "${PRETRAIN[@]}" "${PRETRAIN_DATA[@]}" --aug paper001 \
  --out "$RUNS/pretrain-byol"
step "$RUNS/pretrain-byolplus" "$PY" pretrain_byol.py "${PRETRAIN[@]}" "${PRETRAIN_DATA[@]}" --aug byol+ \
  --out "$RUNS/pretrain-byolplus"
for data in "${DATASETS[@]}"; do
  for mode in "${MODES[@]}"; do
    read -ra flags <<<"${EVAL[$mode]}"
    for init in "${BASELINES[@]}"; do
      step "$RUNS/$data-$mode-$init" "$PY" evaluate.py --init "$init" --data "$data" --mode "$mode" "${flags[@]}" \
        --out "$RUNS/$data-$mode-$init"
    done
    for method in byol byolplus; do
      step "$RUNS/$data-$mode-$method" "$PY" evaluate.py --ckpt "$RUNS/pretrain-$method/checkpoint.pt" \
        --data "$data" --mode "$mode" "${flags[@]}" --out "$RUNS/$data-$mode-$method"
    done
  done
done

# ---------------------------------------------------------------- report spec
mkdir -p "$RESULTS"
if [[ $QUICK == 1 ]]; then
  INTRO="QUICK (CPU-scale) mode, not the paper's numbers. Substitutions: BYOL / BYOL+ pretrained on the
PneumoniaMNIST train images (labels unused) instead of ChestMNIST, from a random init instead of
ImageNet, for 3 epochs of 25 batches of 64 (paper: 1000 epochs, batch 256); fine-tuning 3 epochs of
at most 10 batches (paper: 25 epochs), few-shot 15 epochs (paper: 50), both with BatchNorm statistics
recomputed on the training images before each validation (--precise-bn on; few-shot does so at paper
scale too, as one step per epoch at lr 1e-2 otherwise leaves a one-class network), the logistic-regression probe
instead of the 50-epoch SGD head, 2 seeds. The paper's base model (ImageNet init) cannot be had offline;
a random-init row stands beside it. DermaMNIST is not on this machine. Only the real
pneumoniamnist.npz and breastmnist.npz were read."
else
  INTRO="Paper scale: configs/paper001_byol.yaml (ChestMNIST, ImageNet init, 1000 epochs, batch 256,
Adam 1e-4, EMA 0.99); evaluation as paper 001 §5, 3 seeds. Few-shot recomputes BatchNorm statistics
on the 20 images per class before each validation (evaluate.py --precise-bn, our addition)."
fi
if [[ -n $DATA ]]; then
  INTRO="$INTRO
BYOL and BYOL+ pretrained on $DATA instead of $([[ $QUICK == 1 ]] && echo "the PneumoniaMNIST train images" || echo ChestMNIST)."
fi
# published (paper 001 Tables 2-4; its AUCs came from thresholded labels, ours from scores):
# fine-tune AUC ACC / linear-probe AUC / few-shot AUC, per dataset and model
declare -A PUB=(
  [pneumoniamnist-finetune-imagenet]="auc: \"0.82\", acc: \"0.86\""
  [pneumoniamnist-finetune-byol]="auc: \"0.85\", acc: \"0.88\""
  [pneumoniamnist-finetune-byolplus]="auc: \"0.86\", acc: \"0.89\""
  [breastmnist-finetune-imagenet]="auc: \"0.79\", acc: \"0.87\""
  [breastmnist-finetune-byol]="auc: \"0.79\", acc: \"0.85\""
  [breastmnist-finetune-byolplus]="auc: \"0.84\", acc: \"0.84\""
  [dermamnist-finetune-imagenet]="auc: \"0.95\", acc: \"0.75\""
  [dermamnist-finetune-byol]="auc: \"0.93\", acc: \"0.74\""
  [dermamnist-finetune-byolplus]="auc: \"0.94\", acc: \"0.75\""
  [pneumoniamnist-linear_probe-byol]="auc: \"0.79\"" [pneumoniamnist-linear_probe-byolplus]="auc: \"0.86\""
  [breastmnist-linear_probe-byol]="auc: \"0.58\"" [breastmnist-linear_probe-byolplus]="auc: \"0.61\""
  [dermamnist-linear_probe-byol]="auc: \"0.78\"" [dermamnist-linear_probe-byolplus]="auc: \"0.81\""
  [pneumoniamnist-fewshot-byol]="auc: \"0.84\"" [pneumoniamnist-fewshot-byolplus]="auc: \"0.88\""
  [breastmnist-fewshot-byol]="auc: \"0.69\"" [breastmnist-fewshot-byolplus]="auc: \"0.69\""
  [dermamnist-fewshot-byol]="auc: \"0.81\"" [dermamnist-fewshot-byolplus]="auc: \"0.80\""
)
declare -A LABEL=([imagenet]="base (ImageNet init)" [random]="random init (stand-in for base)"
                  [byol]="BYOL" [byolplus]="BYOL+")
declare -A MODE_TITLE=([finetune]="fine-tuning" [linear_probe]="linear probe" [fewshot]="few-shot (20 per class)")
declare -A CLASSES=([pneumoniamnist]="[normal, pneumonia]" [breastmnist]="[malignant, normal/benign]")
rows() {  # rows DATA MODE: the table rows of one dataset and protocol
  local model
  for model in "${BASELINES[@]}" byol byolplus; do
    echo "      - {label: \"${LABEL[$model]}\", runs: \"$RUNS/$1-$2-$model\", published: {${PUB[$1-$2-$model]:-}}}"
  done
}
{
  spec_head "BYOL and BYOL+ for limited-label medical images"
  for data in "${DATASETS[@]}"; do
    for mode in "${MODES[@]}"; do
      echo "  - title: \"$data, ${MODE_TITLE[$mode]} (test)\""
      echo "    metrics: [auc, acc, precision, recall, f1]"
      echo "    source: \"paper 001's published tables (its AUCs are from thresholded labels)\""
      echo "    rows:"
      rows "$data" "$mode"
      echo "    compare: [[\"${LABEL[${BASELINES[-1]}]}\", \"BYOL\"], [\"${LABEL[${BASELINES[-1]}]}\", \"BYOL+\"], [\"BYOL\", \"BYOL+\"]]"
    done
  done
  echo "figures:"
  for data in "${DATASETS[@]}"; do
    echo "  - kind: confusion"
    echo "    title: \"$data fine-tuned, confusion\""
    [[ -n ${CLASSES[$data]:-} ]] && echo "    class_names: ${CLASSES[$data]}"
    echo "    rows:"
    rows "$data" finetune | sed 's/, published: {[^}]*}//'
  done
  echo "  - kind: loss"
  echo "    title: \"BYOL pretraining loss\""
  echo "    rows:"
  echo "      - {label: BYOL, runs: \"$RUNS/pretrain-byol\"}"
  echo "      - {label: BYOL+, runs: \"$RUNS/pretrain-byolplus\"}"
} >"$RESULTS/spec.yaml"
make_report
