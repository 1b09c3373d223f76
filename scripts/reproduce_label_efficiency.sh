#!/usr/bin/env bash
# The label-efficiency study: does self-supervised pretraining pay when labels are scarce? BYOL,
# Barlow Twins and SimCLR each pretrain a 1-channel ResNet-18 on PneumoniaMNIST's train images (labels
# unused) with the same budget (epochs, batch, 28 px), after a recipe sweep judged on the kNN monitor
# of the validation split alone. Every encoder and a random init are then fine-tuned and linearly
# probed on 1%, 10% and 100% of PneumoniaMNIST's labels, and transferred to BreastMNIST, 5 seeds each;
# the report has test AUC / ACC as mean ± std (n), Welch and Mann-Whitney p against random init, and
# the test AUC against the label fraction with ±1 std bands.
#
#   bash scripts/reproduce_label_efficiency.sh              # the study (150 epochs each; docs/REPRODUCING.md gives times)
#   EPOCHS=1000 bash scripts/reproduce_label_efficiency.sh  # the same at 1000 epochs (a GPU)
#   QUICK=1 bash scripts/reproduce_label_efficiency.sh      # a check of the whole pipeline in minutes: -> runs/quick/...
#   bash scripts/reproduce_label_efficiency.sh --dry-run    # (or DRY_RUN=1) list the runs, write the spec, train nothing
#   DATA=path/to/xrays TRANSFER=path/to/other bash scripts/reproduce_label_efficiency.sh   # your own images
#   METHODS=barlow bash scripts/reproduce_label_efficiency.sh   # one method (or two) against random init
#
# DATA= (a labelled folder, CSV manifest or .npz, or a MedMNIST flag; docs/DATA.md) replaces
# PneumoniaMNIST as both the pretraining corpus (its train split) and the downstream task; TRANSFER=
# (the same kinds, e.g. dermamnist) replaces BreastMNIST;
# DATA_FLAGS="..." adds data flags to the runs that read DATA. METHODS= (a space-separated subset of
# "byol barlow simclr") sweeps, pretrains and evaluates those methods only: their runs are the same
# commands as in the whole study, so they share its folders and a later full run skips them.
#
# Finished runs are skipped, and an interrupted pretraining resumes from its checkpoint, so re-running
# continues the study. RUNS=, RESULTS=, PY= override the folders and the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER="Label efficiency"
SCALE_NAME=$([[ ${QUICK:-0} == 1 ]] && echo "QUICK (pipeline check)" || echo "study")
QUICK=${QUICK:-0}
ALL_METHODS="byol barlow simclr"
read -ra METHODS <<<"${METHODS:-$ALL_METHODS}"
FRACTIONS=(0.01 0.1 1)
declare -A PERCENT=([0.01]=1% [0.1]=10% [1]=100%)
declare -A METHOD_NAMES=([random]="random init" [byol]=BYOL [barlow]="Barlow Twins" [simclr]=SimCLR)
# each method's own views (byol: Grill et al.'s set; paper002: the chest X-ray paper's final set;
# simclr: Chen et al.'s) and loss settings, from its CPU config; the sweep varies what the configs
# chose by hand for other batch sizes: the crop floor and the Adam lr
declare -A CONFIG=([byol]=configs/cpu_byol.yaml [barlow]=configs/cpu_barlow.yaml [simclr]=configs/cpu_simclr.yaml)
CROP_FLOORS=(0.08 0.35)   # 0.08: the methods' ImageNet value; 0.35: what keeps a lesion in a 28 px crop
LRS=(1e-3 3e-3)
BATCH=256                 # one batch for every method: the same images per step and per epoch
TRANSFER=${TRANSFER:-}
if [[ $QUICK == 1 ]]; then
  FOLDER=quick/label_efficiency
  EPOCHS=${EPOCHS:-2}
  SWEEP=(--epochs 1 --max-steps 3 --warmup-epochs 0 --eval-every 1)
  LIMIT=(--max-steps 3)     # QUICK caps every pretraining and fine-tuning epoch at 3 batches
  MONITOR=1
  SEEDS=2
  BATCH=64
else
  FOLDER=label_efficiency
  EPOCHS=${EPOCHS:-150}
  # 5 epochs per candidate: a short proxy of the long run, the same for every method
  SWEEP=(--epochs 5 --warmup-epochs 1 --eval-every 5)
  LIMIT=()
  MONITOR=10                # the kNN monitor every 10 epochs of the long runs
  SEEDS=5
fi
[[ $EPOCHS =~ ^[1-9][0-9]*$ ]] || { echo "error: EPOCHS must be a positive whole number, got '$EPOCHS'" >&2; exit 2; }
WARMUP=$((EPOCHS >= 100 ? 10 : 1))
DATA_REPLACES="PneumoniaMNIST (the pretraining corpus and the downstream task)"
source scripts/reproduce_lib.sh
((${#METHODS[@]})) || die "METHODS is empty; give one or more of: $ALL_METHODS"
for m in "${METHODS[@]}"; do
  [[ -v "CONFIG[$m]" ]] || die "METHODS: unknown method '$m'; give one or more of: $ALL_METHODS"
done
INITS=(random "${METHODS[@]}")
# another budget or dataset gets folders of its own: a finished run is skipped whatever its flags were
[[ $EPOCHS == 150 || $QUICK == 1 ]] || FOLDER+=-e$EPOCHS
[[ -z ${DATA:-} ]] || FOLDER+=-$(data_name "$DATA")
[[ -z $TRANSFER ]] || FOLDER+=-to-$(data_name "$TRANSFER")
RUNS=${RUNS:-runs/$FOLDER}
RESULTS=${RESULTS:-results/$FOLDER}
parse_args "$@"
main_and_transfer
COMMON=(--in-chans 1 --batch-size "$BATCH" --seed 0)

# ---------------------------------------------------------------- recipe sweep (validation only)
declare -A CANDIDATES
for m in "${METHODS[@]}"; do
  for floor in "${CROP_FLOORS[@]}"; do
    for lr in "${LRS[@]}"; do
      dir=$RUNS/sweep-$m-crop$floor-lr$lr
      CANDIDATES[$m]+="$dir"$'\n'
      step "$dir" "$PY" "pretrain_$m.py" --config "${CONFIG[$m]}" "${MAIN[@]}" "${COMMON[@]}" "${SWEEP[@]}" \
        --crop-scale "$floor" 1 --lr "$lr" "${LIMIT[@]}" --out "$dir"
    done
  done
done

# chosen METHOD: the flags (--crop-scale, --lr) of the sweep run of METHOD with the best kNN
# validation AUC (scripts/select_recipe.py), its table written to $RUNS/sweep-METHOD.md and its
# error, if any, to $RUNS/sweep-METHOD.err; a dry run writes neither and names the winner only when
# the sweep has run
chosen() {
  local candidates
  mapfile -t candidates <<<"${CANDIDATES[$1]%$'\n'}"
  local c logs=0
  for c in "${candidates[@]}"; do [[ -f $c/log.jsonl ]] && logs=1; done
  if [[ $logs == 0 ]]; then  # nothing to choose from (e.g. a dry run before the sweep): no Python to start
    [[ $DRY_RUN == 1 ]] || { mkdir -p "$RUNS"; echo "no sweep run of $1 has logged anything" >"$RUNS/sweep-$1.err"; }
    return 1
  fi
  if [[ $DRY_RUN == 1 ]]; then
    "$PY" scripts/select_recipe.py "${candidates[@]}" --print-flags 2>/dev/null
  else
    "$PY" scripts/select_recipe.py "${candidates[@]}" --print-flags --table "$RUNS/sweep-$1.md" 2>"$RUNS/sweep-$1.err"
  fi
}

# ---------------------------------------------------------------- pretraining, one budget for all
for m in "${METHODS[@]}"; do
  flags=$(chosen "$m") || flags=""
  if finished "$RUNS/pretrain-$m"; then  # trained with the recipe chosen then: the sweep runs are finished too
    echo "skip    $RUNS/pretrain-$m (finished)"
    continue
  elif [[ -z $flags && $DRY_RUN == 1 ]]; then
    recipe=(--crop-scale "<chosen>" 1 --lr "<chosen>")
  elif [[ -z $flags ]]; then
    mkdir -p "$RUNS/pretrain-$m"
    echo "needs the recipe sweep, not run: $(cat "$RUNS/sweep-$m.err")" >"$RUNS/pretrain-$m/not_run.txt"
    echo "not run $RUNS/pretrain-$m: $(cat "$RUNS/pretrain-$m/not_run.txt")"
    continue
  else
    read -ra recipe <<<"$flags"
  fi
  step "$RUNS/pretrain-$m" "$PY" "pretrain_$m.py" --config "${CONFIG[$m]}" "${MAIN[@]}" "${COMMON[@]}" \
    "${recipe[@]}" --epochs "$EPOCHS" --warmup-epochs "$WARMUP" --eval-every "$MONITOR" "${LIMIT[@]}" \
    --out "$RUNS/pretrain-$m"
done

# ---------------------------------------------------------------- downstream, 5 seeds each
# fine-tuning: 100 to 360 optimiser steps at every fraction, where epochs alone would give 10 steps
# at 1% (PneumoniaMNIST: 1% = 47 images, 1 full batch of 32 per epoch x 100 = 100 steps; 10% = 470,
# 3 batches x 40 = 120; 100% = 4,708, 36 batches x 10 = 360);
# BatchNorm statistics recomputed before each validation, as a few steps per epoch leave them behind
declare -A FT_EPOCHS=([0.01]=100 [0.1]=40 [1]=10)
TRANSFER_EPOCHS=30
if [[ $QUICK == 1 ]]; then
  FT_EPOCHS=([0.01]=2 [0.1]=2 [1]=2)
  TRANSFER_EPOCHS=2
fi
declare -A FT_BATCH=([0.01]=32 [0.1]=128 [1]=128)
FINETUNE=(--mode finetune --precise-bn on --seeds "$SEEDS" "${LIMIT[@]}")
PROBE=(--mode linear_probe --seeds "$SEEDS")
for init in "${INITS[@]}"; do
  from=(--ckpt "$RUNS/pretrain-$init/checkpoint.pt")
  [[ $init == random ]] && from=(--init random --in-chans 1)
  for f in "${FRACTIONS[@]}"; do
    step "$RUNS/probe-lf$f-$init" "$PY" evaluate.py "${from[@]}" "${MAIN[@]}" "${PROBE[@]}" --label-fraction "$f" \
      --out "$RUNS/probe-lf$f-$init"
    step "$RUNS/ft-lf$f-$init" "$PY" evaluate.py "${from[@]}" "${MAIN[@]}" "${FINETUNE[@]}" --label-fraction "$f" \
      --epochs "${FT_EPOCHS[$f]}" --batch-size "${FT_BATCH[$f]}" --out "$RUNS/ft-lf$f-$init"
  done
  # transfer: BreastMNIST's 546 training images, 4 full batches x 30 epochs
  step "$RUNS/transfer-probe-$init" "$PY" evaluate.py "${from[@]}" "${OTHER[@]}" "${PROBE[@]}" \
    --out "$RUNS/transfer-probe-$init"
  step "$RUNS/transfer-ft-$init" "$PY" evaluate.py "${from[@]}" "${OTHER[@]}" "${FINETUNE[@]}" --epochs "$TRANSFER_EPOCHS" \
    --batch-size 128 --out "$RUNS/transfer-ft-$init"
done

# ---------------------------------------------------------------- report spec
mkdir -p "$RESULTS"
sweeps=""
for m in "${METHODS[@]}"; do
  if [[ -f $RUNS/sweep-$m.md ]]; then
    sweeps+=$'\n'"${METHOD_NAMES[$m]}:"$'\n\n'"$(cat "$RUNS/sweep-$m.md")"$'\n'
  fi
done
INTRO=""
if [[ $QUICK == 1 ]]; then
  INTRO="QUICK mode: a check of the pipeline (1-epoch sweep runs and $EPOCHS-epoch pretraining of at most 3
batches of 64, 2 fine-tuning epochs of at most 3 batches, $SEEDS seeds), not the study's numbers.
"
fi
names=$(for m in "${METHODS[@]}"; do echo "${METHOD_NAMES[$m]}"; done | listed)
views=$(for m in "${METHODS[@]}"; do sed -n 's/^aug: *//p' "${CONFIG[$m]}"; done | listed)
INTRO="${INTRO}Pretraining: $names on ${DATA:-PneumoniaMNIST}'s train images (labels unused),
1-channel ResNet-18, 28 px, batch $BATCH, $EPOCHS epochs each (warm-up $WARMUP, cosine), seed 0, each with its own
views (preset${METHODS[1]:+s} $views). Recipe: for each method, crop floor {${CROP_FLOORS[*]}} x Adam lr
{${LRS[*]}}, each a short run (${SWEEP[*]}), judged on the kNN monitor (k = 20) of the validation split; the
best went on to the full budget. Downstream: $SEEDS seeds (seed 0 ...), each drawing its own stratified label subset; the
linear probe is a logistic regression whose L2 strength is chosen on validation; fine-tuning is Adam 1e-3
with weight decay 1e-6, BatchNorm statistics recomputed before each validation, the epoch with the best
validation AUC kept (${FT_EPOCHS[0.01]} epochs of batch ${FT_BATCH[0.01]} at 1%, ${FT_EPOCHS[0.1]} of ${FT_BATCH[0.1]} at 10%, ${FT_EPOCHS[1]} of ${FT_BATCH[1]} at 100%; transfer: $TRANSFER_EPOCHS of 128).
The seeds vary the label subset, the head and the order of the batches (and a random init's weights), not
the pretraining: each method is one pretraining run (seed 0), so the spread is the downstream one and a
pretrained encoder's linear probe on all labels has none. Welch's t-test and the two-sided Mann-Whitney U
test compare each pretrained encoder with random init, without correction for the number of comparisons;
with $SEEDS values a side the smallest two-sided Mann-Whitney p is $(awk -v n="$SEEDS" 'BEGIN { c = 1; for (i = 1; i <= n; i++) c *= (n + i) / i; printf "%.3f", 2 / c }'), and a difference counts where both p < 0.05.
Labels outside the fraction are used twice, for choices not for training: the kNN monitor's memory is the
whole train split, and every run selects its epoch (or L2 strength) on the whole validation split.
Recipe sweep, kNN AUC on the validation split:
${sweeps:-(not run yet)}"
if [[ -n $DATA || -n $TRANSFER ]]; then
  INTRO="$INTRO
Own data: ${DATA:-PneumoniaMNIST} is the corpus and the downstream task, ${TRANSFER:-BreastMNIST} the transfer task."
fi
row() { echo "      - {label: \"$1\", runs: \"$RUNS/$2\"}"; }
compare() {  # the compare line of a table whose rows are "<prefix><init name>"
  local pairs=() m
  for m in "${METHODS[@]}"; do pairs+=("[\"$1${METHOD_NAMES[random]}\", \"$1${METHOD_NAMES[$m]}\"]"); done
  local IFS=,
  echo "    compare: [${pairs[*]}]"
}
table() {  # table TITLE RUN-PREFIX ROW-PREFIX
  echo "  - title: \"$1\""
  echo "    metrics: [auc, acc]"
  echo "    rows:"
  for init in "${INITS[@]}"; do row "$3${METHOD_NAMES[$init]}" "$2$init"; done
  compare "$3"
}
figure() {  # figure TITLE RUN-PREFIX
  fraction_figure "$1"
  for init in "${INITS[@]}"; do row "${METHOD_NAMES[$init]}" "$2*-$init"; done
}
{
  spec_head "does self-supervised pretraining pay when labels are scarce?"
  for f in "${FRACTIONS[@]}"; do
    table "${DATA:-PneumoniaMNIST}, fine-tuning on ${PERCENT[$f]} of the labels (test)" "ft-lf$f-" "fine-tune, "
    table "${DATA:-PneumoniaMNIST}, linear probe on ${PERCENT[$f]} of the labels (test)" "probe-lf$f-" "probe, "
  done
  table "Transfer to ${TRANSFER:-BreastMNIST}, fine-tuning (test)" "transfer-ft-" "fine-tune, "
  table "Transfer to ${TRANSFER:-BreastMNIST}, linear probe (test)" "transfer-probe-" "probe, "
  echo "figures:"
  figure "Fine-tuning: test AUC against the label fraction" "ft-lf"
  figure "Linear probe: test AUC against the label fraction" "probe-lf"
  for m in "${METHODS[@]}"; do  # one plot each: the three losses differ by orders of magnitude
    echo "  - kind: loss"
    echo "    title: \"${METHOD_NAMES[$m]} pretraining loss\""
    echo "    rows:"
    row "${METHOD_NAMES[$m]}" "pretrain-$m"
  done
  knn_figure
  for m in "${METHODS[@]}"; do row "${METHOD_NAMES[$m]}" "pretrain-$m"; done
} >"$RESULTS/spec.yaml"
make_report
