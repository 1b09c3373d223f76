#!/usr/bin/env bash
# The label-efficiency study, second round: which method, and can fine-tuning keep the gain? Seven
# methods (BYOL, SimCLR, Barlow Twins, MoCo v2, VICReg, DINO, MAE) each pretrain on PneumoniaMNIST's
# train images (labels unused) at one budget, 3 pretraining seeds each, after a recipe sweep judged on
# the kNN monitor of the validation split alone (round one's sweep is reused for BYOL, SimCLR and Barlow
# Twins). Every encoder is then linearly probed and fine-tuned three ways (plain, LP-FT: the head first
# on the frozen encoder, then everything; layer-wise lr decay) on 1%, 10% and 100% of the labels, and
# transferred to BreastMNIST, 5 evaluation seeds per pretraining run; random inits (the ResNet-18 and
# MAE's ViT-Tiny) are the baselines. The report averages each run's evaluation seeds and compares
# pretraining runs, the independent unit (report.py's `unit: run`).
#
#   bash scripts/reproduce_label_efficiency_round2.sh              # the round (docs/REPRODUCING.md gives times)
#   for i in 1 2; do OMP_NUM_THREADS=1 bash scripts/reproduce_label_efficiency_round2.sh & done   # two workers
#   QUICK=1 bash scripts/reproduce_label_efficiency_round2.sh      # a check of the whole pipeline in minutes
#   bash scripts/reproduce_label_efficiency_round2.sh --dry-run    # (or DRY_RUN=1) list the runs, write the spec
#   METHODS="byol dino" PRETRAIN_SEEDS="0 1" bash scripts/reproduce_label_efficiency_round2.sh   # a part of it
#   DATA=path/to/xrays TRANSFER=path/to/other bash scripts/reproduce_label_efficiency_round2.sh   # your own images
#   RUN_FLAGS="--device cuda --precision fp32" bash scripts/reproduce_label_efficiency_round2.sh   # a GPU, float32
#
# A unit is one pretraining run and every evaluation of its encoder. As each run finishes, its small
# files (args.yaml, log.jsonl, provenance.json, metrics.json) and its wall time (seconds.txt) are copied
# into the results folder ($RESULTS/runs), which the report reads; an archived evaluation is never run
# again, even where the run directories ($RUNS, with the checkpoints) are gone, and a unit whose
# evaluations are all archived is marked complete. A unit cut short repeats its pretraining (seeded, so
# the same encoder on the same CPU and thread count; its encoder's hash is checked, and evaluations made
# with another encoder are run again) and runs what it lacks. Finished runs are skipped and an
# interrupted pretraining resumes from its checkpoint. Several copies may run at once (one per core):
# each takes the next run no live copy holds ($RUNS/claims), sweep runs first, a pretraining run waits
# for its method's sweep, and a copy with nothing to take waits while another pretrains. STOP_AT (seconds
# since 1970) stops new pretraining runs, evaluations go on.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER="Label efficiency, round 2"
SCALE_NAME=$([[ ${QUICK:-0} == 1 ]] && echo "QUICK (pipeline check)" || echo "study")
QUICK=${QUICK:-0}
ALL_METHODS="byol simclr barlow moco vicreg dino mae"
read -ra METHODS <<<"${METHODS:-$ALL_METHODS}"
read -ra PRETRAIN_SEEDS <<<"${PRETRAIN_SEEDS:-0 1 2}"
FRACTIONS=(0.01 0.1 1)
declare -A PERCENT=([0.01]=1% [0.1]=10% [1]=100%)
declare -A METHOD_NAMES=([random]="random init" [random_vit]="random init (ViT-Tiny)" [byol]=BYOL [simclr]=SimCLR
                         [barlow]="Barlow Twins" [moco]="MoCo v2" [vicreg]=VICReg [dino]=DINO [mae]="MAE (ViT-Tiny)")
# each method's own views, loss and optimiser, from its CPU config (DINO: ResNet-18; MAE: ViT-Tiny/4)
declare -A CONFIG=([byol]=configs/cpu_byol.yaml [simclr]=configs/cpu_simclr.yaml [barlow]=configs/cpu_barlow.yaml
                   [moco]=configs/cpu_moco.yaml [vicreg]=configs/cpu_vicreg.yaml [dino]=configs/cpu_dino.yaml
                   [mae]=configs/cpu_mae.yaml)
# round one's sweep chose crop floor 0.35 and Adam lr 1e-3 for each of its three methods (its report);
# the new methods sweep their crop floor (DINO: of its global crops) and lr: the config's lr, and 3x it
declare -A CHOSEN=([byol]="--crop-scale 0.35 1 --lr 1e-3" [simclr]="--crop-scale 0.35 1 --lr 1e-3"
                   [barlow]="--crop-scale 0.35 1 --lr 1e-3")
declare -A FLOORS=([moco]="0.08 0.35" [vicreg]="0.08 0.35" [dino]="0.14 0.4" [mae]="0.2 0.35")
declare -A LRS=([moco]="0.03 0.09" [vicreg]="0.05 0.15" [dino]="1e-3 3e-3" [mae]="1.5e-3 4.5e-3")
BATCH=256                 # one batch for every method: the same images per step and per epoch
LAYER_DECAY=0.65          # BEiT's and MAE's value for ViT-B fine-tuning
EVAL_SEEDS=5
TRANSFER=${TRANSFER:-}
if [[ $QUICK == 1 ]]; then
  FOLDER=quick/label_efficiency_round2
  EPOCHS=${EPOCHS:-2}
  SWEEP=(--epochs 1 --max-steps 2 --warmup-epochs 0 --eval-every 1)
  LIMIT=(--max-steps 2)     # QUICK caps every pretraining and fine-tuning epoch at 2 batches
  MONITOR=1
  EVAL_SEEDS=2
  BATCH=64
else
  FOLDER=label_efficiency/round2
  EPOCHS=${EPOCHS:-40}
  SWEEP=(--epochs 5 --warmup-epochs 1 --eval-every 5)   # round one's proxy of the long run
  LIMIT=()
  MONITOR=10
fi
[[ $EPOCHS =~ ^[1-9][0-9]*$ ]] || { echo "error: EPOCHS must be a positive whole number, got '$EPOCHS'" >&2; exit 2; }
WARMUP=$((EPOCHS >= 20 ? 2 : 1))
STOP_AT=${STOP_AT:-9999999999}  # a time (seconds since 1970, `date -d 18:00 +%s`) after which no pretraining starts
[[ $STOP_AT =~ ^[0-9]+$ ]] || { echo "error: STOP_AT must be seconds since 1970 (date -d 18:00 +%s), got '$STOP_AT'" >&2; exit 2; }
# RUN_FLAGS: how the runs compute, not what: --device and --precision alone (a GPU in the CPU's float32:
# RUN_FLAGS="--device cuda --precision fp32"). Each run's args.yaml records them; its command, against which an
# archived run is checked, does not, so one round may gather runs from several machines.
read -ra RUN_ARGS <<<"${RUN_FLAGS:-}"
for ((i = 0; i < ${#RUN_ARGS[@]}; i += 2)); do
  [[ "${RUN_ARGS[i]} ${RUN_ARGS[i + 1]:-}" =~ ^(--device (auto|cpu|cuda)|--precision (auto|fp32|bf16))$ ]] ||
    { echo "error: RUN_FLAGS takes --device and --precision with their values (e.g. '--device cuda --precision fp32'), got '${RUN_FLAGS}'" >&2; exit 2; }
done
DATA_REPLACES="PneumoniaMNIST (the pretraining corpus and the downstream task)"
source scripts/reproduce_lib.sh
((${#METHODS[@]})) || die "METHODS is empty; give one or more of: $ALL_METHODS"
for m in "${METHODS[@]}"; do
  [[ -v "CONFIG[$m]" ]] || die "METHODS: unknown method '$m'; give one or more of: $ALL_METHODS"
done
((${#PRETRAIN_SEEDS[@]})) || die "PRETRAIN_SEEDS is empty; give seeds such as '0 1 2'"
for s in "${PRETRAIN_SEEDS[@]}"; do
  [[ $s =~ ^[0-9]+$ ]] || die "PRETRAIN_SEEDS: '$s' is not a whole number"
done
BASELINES=(random)
[[ " ${METHODS[*]} " == *" mae "* ]] && BASELINES+=(random_vit)
[[ $EPOCHS == 40 || $QUICK == 1 ]] || FOLDER+=-e$EPOCHS
[[ -z ${DATA:-} ]] || FOLDER+=-$(data_name "$DATA")
[[ -z $TRANSFER ]] || FOLDER+=-to-$(data_name "$TRANSFER")
RUNS=${RUNS:-runs/$FOLDER}
RESULTS=${RESULTS:-results/$FOLDER}
ARCHIVE=$RESULTS/runs
parse_args "$@"
main_and_transfer
COMMON=(--in-chans 1 --batch-size "$BATCH")
VIT=(--arch vit_tiny_patch16_224 --patch-size 4 --pool mean)   # MAE's encoder, for its random init
# a ViT-Tiny fine-tunes at Adam 3e-4, not the ResNet's 1e-3: at 1e-3 from the first step a random-init ViT-Tiny
# ended below its own frozen features at 10% of the labels; best validation AUC there, evaluation seeds 0 / 1 / 2:
# 0.712 / 0.680 / 0.852 at 1e-3, 0.926 / 0.904 / 0.919 at 1e-4, 0.947 / 0.932 / 0.936 at 3e-4
VIT_LR=3e-4

# ---------------------------------------------------------------- the evaluation protocol
# fine-tuning: 100 to 360 optimiser steps at every fraction (round one's; PneumoniaMNIST: 1% = 47 images,
# 1 batch of 32 x 100 epochs; 10% = 470, 3 batches of 128 x 40; 100% = 4,708, 36 x 10); BatchNorm
# statistics recomputed before each validation; the epoch with the best validation AUC is kept, among
# those validated: every 5th epoch at 1% and every 2nd at 10% and in transfer (about every 5 steps; at 1%
# an epoch is one step, and validating after each was most of the run), every epoch at 100%.
# LP-FT (Kumar et al. 2022): the head alone on the frozen encoder for half as many epochs (Adam 2e-3),
# then everything as plain fine-tuning. Layer-wise decay: the head at the lr, each layer below at
# LAYER_DECAY times the one above (ResNet: layer4 .. stem; ViT: its blocks).
declare -A FT_EPOCHS=([0.01]=100 [0.1]=40 [1]=10)
declare -A FT_BATCH=([0.01]=32 [0.1]=128 [1]=128)
declare -A VAL_EVERY=([0.01]=5 [0.1]=2 [1]=1)
TRANSFER_EPOCHS=30 TRANSFER_VAL_EVERY=2
if [[ $QUICK == 1 ]]; then
  FT_EPOCHS=([0.01]=2 [0.1]=2 [1]=2)
  VAL_EVERY=([0.01]=1 [0.1]=1 [1]=1)
  TRANSFER_EPOCHS=2 TRANSFER_VAL_EVERY=1
fi
PROBE=(--mode linear_probe --seeds "$EVAL_SEEDS")
FINETUNE=(--mode finetune --precise-bn on --seeds "$EVAL_SEEDS" "${LIMIT[@]}")

# timed DIR PY ARGS...: step, unless DIR's results are archived already (by the same command), another
# copy holds DIR or, for a pretraining run, STOP_AT has passed. A run made by another command (its
# command.txt, archived or in DIR) runs again from the start. A run that finishes is archived with its
# command and, when this copy ran all of it, its wall time. With PLAN=1 it only adds DIR to DIRS.
declare -A COMMAND_OF=()
timed() {
  local dir=$1 start=$SECONDS name=${1##*/} other="" file resumed=0
  DIRS+=("$dir")
  local args="${*:3}"
  COMMAND_OF[$dir]=${args//"$RUNS/"/<runs>/}  # where the runs are kept is not part of the protocol
  ((PLAN)) && return 0
  if archived_run "$dir"; then [[ $DRY_RUN == 0 ]] || echo "archived $dir"; return 0; fi
  # made by another command (archived, or in DIR), or by one that was not recorded: run again from the start
  for file in "$ARCHIVE/$name/command.txt" "$dir/command.txt"; do
    [[ -f $file && $(cat "$file") != "${COMMAND_OF[$dir]}" ]] && other=$(cat "$file")
  done
  if [[ ( -f $dir/args.yaml || -f $ARCHIVE/$name/metrics.json ) && ! -f $dir/command.txt &&
        ! -f $ARCHIVE/$name/command.txt ]]; then
    other="a command that was not recorded"
  fi
  if [[ -n $other ]]; then
    [[ $DRY_RUN == 1 ]] || claim "$name" || { echo "skip    $dir (another copy runs it)"; return 0; }
    echo "rerun   $dir (made by: $other)"
    if [[ $DRY_RUN == 0 ]]; then
      rm -rf "$dir"  # and the archived copy, but for a pretraining run's records of its earlier encoder
      find "$ARCHIVE/$name" -mindepth 1 -maxdepth 1 ! -name encoder.sha256 ! -name superseded.txt \
        -exec rm -rf {} + 2>/dev/null || true
      # the unit's archived evaluations used the encoder this pretraining made: untrusted until same_encoder
      if [[ $name == pretrain-* ]]; then mkdir -p "$ARCHIVE/$name" && echo "$other" >"$ARCHIVE/$name/superseded.txt"; fi
    fi
  fi
  [[ $DRY_RUN == 1 ]] && { step "$@" "${RUN_ARGS[@]}"; return 0; }
  if finished "$dir"; then  # the copy that ran it archives it; if that copy is gone, this one does
    if claim "$name"; then archive_run "$dir" -1; fi
    return 0
  fi
  if [[ $name == pretrain-* || $name == sweep-* ]] && (($(date +%s) >= STOP_AT)); then
    echo "stop    $dir (STOP_AT has passed: no pretraining starts)"
    return 0
  fi
  claim "$name" || { echo "skip    $dir (another copy runs it)"; return 0; }
  # a run resumed from an earlier attempt's checkpoint or seeds: this attempt's time is not the run's
  if [[ -f $dir/checkpoint.pt ]] || compgen -G "$dir/seed_*.json" >/dev/null; then resumed=1; fi
  mkdir -p "$dir"
  echo "${COMMAND_OF[$dir]}" >"$dir/command.txt"
  step "$@" "${RUN_ARGS[@]}"
  if finished "$dir"; then archive_run "$dir" "$((resumed ? -1 : SECONDS - start))"; fi
}
PLAN=0

# archive_run DIR SECONDS: DIR's small files (flags, per-seed metrics, log, provenance) into
# $ARCHIVE/<name>, with its wall time in seconds.txt (the first one measured; -1: not measured) and its
# command in command.txt
archive_run() {
  local to=$ARCHIVE/${1##*/} name
  mkdir -p "$to"
  echo "${COMMAND_OF[$1]}" >"$to/command.txt"
  for name in args.yaml log.jsonl provenance.json metrics.json; do  # metrics.json last: it marks a whole copy
    if [[ -f $1/$name ]]; then cp "$1/$name" "$to/$name.$$" && mv "$to/$name.$$" "$to/$name"; fi
  done
  if [[ $2 -ge 0 && ! -f $to/seconds.txt ]]; then echo "$2" >"$to/seconds.txt"; fi
}

# made_here DIR: DIR was made by the command this copy would run (its own record, else the archive's)
made_here() {
  local file=$1/command.txt
  [[ -f $file ]] || file=$ARCHIVE/${1##*/}/command.txt
  [[ -f $file && $(cat "$file") == "${COMMAND_OF[$1]}" ]]
}

# archived_run DIR: an evaluation whose results are in $ARCHIVE, made by the command this copy would run.
# A pretraining run always runs, or resumes: its checkpoint, which its evaluations need, is never archived.
archived_run() {
  local to=$ARCHIVE/${1##*/}
  [[ ${1##*/} != pretrain-* && -f $to/metrics.json && -f $to/command.txt &&
     $(cat "$to/command.txt") == "${COMMAND_OF[$1]}" ]]
}

# encoder_sha256 CHECKPOINT: the hash of its encoder's weights (names, shapes and values)
encoder_sha256() {
  "$PY" - "$1" <<'EOF'
import hashlib, sys, torch
encoder = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["encoder"]
h = hashlib.sha256()
for name in sorted(encoder):
    h.update(f"{name}{tuple(encoder[name].shape)}".encode())
    h.update(encoder[name].float().numpy().tobytes())
print(h.hexdigest())
EOF
}

# same_encoder PRETRAIN-DIR EVAL-DIRS...: the archived evaluations of a unit were made with the encoder
# its pretraining run has now (a pretraining run repeated where the first one's checkpoint is gone is
# bit-identical on the same CPU and thread count); where it is not, or where the pretraining was
# superseded (run again by another command) with no hash recorded, they are dropped from the archive, to
# be run again on this encoder
same_encoder() {
  local pre=$1 hash to=$ARCHIVE/${1##*/} dir
  shift
  mkdir -p "$RUNS/claims"
  exec 8>"$RUNS/claims/.encoder.lock"
  flock 8  # two copies must not both find a new encoder and remove what the other has just started
  hash=$(encoder_sha256 "$pre/checkpoint.pt")
  if [[ -f $to/encoder.sha256 && $(cat "$to/encoder.sha256") != "$hash" ]] ||
     [[ -f $to/superseded.txt && ! -f $to/encoder.sha256 ]]; then
    echo "warning: $pre's encoder differs from the one its archived evaluations used; running them again"
    for dir in "$@"; do rm -rf "${ARCHIVE:?}/${dir##*/}" "$dir"; done  # and the run directories made with it
  fi
  mkdir -p "$to"
  echo "$hash" >"$to/encoder.sha256"
  rm -f "$to/superseded.txt"
  flock -u 8
}

# evaluations NAME VARIANTS...: every evaluation of one encoder (the flags FROM; evaluation seeds from
# SEED0), for the unit NAME (timed adds their run directories to DIRS)
evaluations() {
  local name=$1 variant f dir extra
  shift
  for f in "${FRACTIONS[@]}"; do
    dir=$RUNS/probe-lf$f-$name
    timed "$dir" "$PY" evaluate.py "${FROM[@]}" "${MAIN[@]}" "${PROBE[@]}" --seed "$SEED0" --label-fraction "$f" \
      --out "$dir"
    for variant in "$@"; do
      dir=$RUNS/$variant-lf$f-$name
      extra=()
      [[ $variant == lpft ]] && extra=(--head-epochs $((FT_EPOCHS[$f] > 1 ? FT_EPOCHS[$f] / 2 : 1)) --head-lr 2e-3)
      [[ $variant == ld ]] && extra=(--layer-decay "$LAYER_DECAY")
      timed "$dir" "$PY" evaluate.py "${FROM[@]}" "${MAIN[@]}" "${FINETUNE[@]}" --seed "$SEED0" --label-fraction "$f" \
        --epochs "${FT_EPOCHS[$f]}" --batch-size "${FT_BATCH[$f]}" --val-every "${VAL_EVERY[$f]}" "${extra[@]}" \
        "${FT_LR[@]}" --out "$dir"
    done
  done
  # transfer: BreastMNIST's 546 training images, 4 full batches x 30 epochs
  dir=$RUNS/transfer-probe-$name
  timed "$dir" "$PY" evaluate.py "${FROM[@]}" "${OTHER[@]}" "${PROBE[@]}" --seed "$SEED0" --out "$dir"
  dir=$RUNS/transfer-ft-$name
  timed "$dir" "$PY" evaluate.py "${FROM[@]}" "${OTHER[@]}" "${FINETUNE[@]}" --seed "$SEED0" \
    --epochs "$TRANSFER_EPOCHS" --batch-size 128 --val-every "$TRANSFER_VAL_EVERY" "${FT_LR[@]}" --out "$dir"
}

# claim UNIT: true when this copy of the script takes UNIT, which no other live copy holds (a claim
# whose process is gone is taken over); a dry run claims everything
claim() {
  [[ $DRY_RUN == 1 ]] && return 0
  mkdir -p "$RUNS/claims"
  (
    flock 9
    held_by_another "$RUNS/claims/$1" && exit 1
    echo "$$ $(started_at $$)" >"$RUNS/claims/$1"
  ) 9>"$RUNS/claims/.lock"
}
# held_by_another CLAIM-FILE: the claim names a live copy other than this one (its PID, with the same start)
held_by_another() {
  local pid="" started=""
  read -r pid started 2>/dev/null <"$1" || true
  [[ -n $pid && $pid != "$$" ]] && kill -0 "$pid" 2>/dev/null && [[ -z $started || $(started_at "$pid") == "$started" ]]
}
# started_at PID: when the process started (clock ticks since boot; empty without /proc), so that a
# claim is not held by a later process that reuses a dead copy's PID
started_at() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }  # after "pid (command) ": the state is field 3 of the line, the start time 22
  read -ra stat <<<"$stat"
  echo "${stat[19]}"
}

# ---------------------------------------------------------------- recipe sweep (validation only)
SWEPT=()
for m in "${METHODS[@]}"; do [[ -v "CHOSEN[$m]" ]] || SWEPT+=("$m"); done
sweep_dir() { echo "$RUNS/sweep-$1-crop$2-lr$3"; }
sweep_run() {  # sweep_run METHOD FLOOR LR: one candidate, unless another copy holds it
  timed "$(sweep_dir "$@")" "$PY" "pretrain_$1.py" --config "${CONFIG[$1]}" "${MAIN[@]}" "${COMMON[@]}" --seed 0 \
    "${SWEEP[@]}" --crop-scale "$2" 1 --lr "$3" "${LIMIT[@]}" --out "$(sweep_dir "$@")"
}
sweep() {  # sweep METHOD: every candidate this copy can take
  local floor lr
  [[ -f $ARCHIVE/sweep-$1.flags ]] && return 0
  for floor in ${FLOORS[$1]}; do
    for lr in ${LRS[$1]}; do swept "$(sweep_dir "$1" "$floor" "$lr")" || sweep_run "$1" "$floor" "$lr"; done
  done
}

# swept DIR: a sweep run that finished (archived, or in $RUNS) or failed; sweep_copy DIR: where its
# files are (the archived copy, where $RUNS may be gone)
swept() { [[ -f $ARCHIVE/${1##*/}/log.jsonl || -f $1/not_run.txt ]] || finished "$1"; }
sweep_copy() { if [[ -f $ARCHIVE/${1##*/}/log.jsonl ]]; then echo "$ARCHIVE/${1##*/}"; else echo "$1"; fi; }

# chosen METHOD: round one's recipe, or the flags of the sweep run with the best kNN validation AUC
# (scripts/select_recipe.py; its table in $ARCHIVE/sweep-METHOD.md), once every candidate has
# finished or failed, waiting for those another copy runs
chosen() {
  local m=$1 floor lr dir pending candidates
  if [[ -v "CHOSEN[$m]" ]]; then echo "${CHOSEN[$m]}"; return 0; fi
  [[ -f $ARCHIVE/sweep-$m.flags ]] && { cat "$ARCHIVE/sweep-$m.flags"; return 0; }
  [[ $DRY_RUN == 1 ]] && { echo "--crop-scale <chosen> 1 --lr <chosen>"; return 0; }
  while :; do
    pending=0 candidates=()
    for floor in ${FLOORS[$m]}; do
      for lr in ${LRS[$m]}; do
        dir=$(sweep_dir "$m" "$floor" "$lr")
        swept "$dir" || sweep_run "$m" "$floor" "$lr" >&2  # runs it, unless another copy does or STOP_AT passed
        swept "$dir" || pending=1
        candidates+=("$(sweep_copy "$dir")")
      done
    done
    ((pending == 0)) && break
    (($(date +%s) < STOP_AT)) || return 1  # the sweep cannot finish before no pretraining may start
    echo "waiting for the sweep of $m (another copy runs it)" >&2
    sleep 60
  done
  mkdir -p "$ARCHIVE"
  "$PY" scripts/select_recipe.py "${candidates[@]}" --print-flags --table "$ARCHIVE/sweep-$m.md" \
    >"$RUNS/sweep-$m.flags" 2>"$RUNS/sweep-$m.err" || return 1
  mv "$RUNS/sweep-$m.flags" "$ARCHIVE/sweep-$m.flags"
  cat "$ARCHIVE/sweep-$m.flags"
}

[[ $DRY_RUN == 1 ]] || mkdir -p "$RUNS"
for m in "${SWEPT[@]}"; do sweep "$m"; done

# ---------------------------------------------------------------- units: a pretraining run and its evaluations
# complete UNIT DIRS...: every evaluation of the unit is archived, made by this copy's commands; it is
# marked ($ARCHIVE/unit-UNIT.done: its runs, which the wall times read). A marked unit whose runs were
# made otherwise (the protocol changed since) loses its mark and runs what differs.
complete() {
  local unit=$1 dir marker=$ARCHIVE/unit-$1.done
  shift
  for dir in "$@"; do
    archived_run "$dir" && continue
    [[ $DRY_RUN == 1 ]] || rm -f "$marker"
    return 1
  done
  if [[ -f $marker && $(cat "$marker") == "$(printf '%s\n' "${@##*/}")" ]]; then
    ((pass > 1)) || echo "skip    unit $unit (archived)"
    return 0
  fi
  [[ $DRY_RUN == 1 ]] && return 1
  printf '%s\n' "${@##*/}" >"$marker"
  echo "archived unit $unit"
}
# one method (its baseline first) at a time, its pretraining seeds together: each method is compared
# across its pretraining runs as soon as it is done, however far the round has got
ORDER=(random)
for m in "${METHODS[@]}"; do
  [[ $m == mae ]] && ORDER+=(random_vit)
  ORDER+=("$m")
done
# another_pretrains: a live copy other than this one holds a pretraining run that has not finished, whose
# unit's evaluations this copy could then share
another_pretrains() {
  local file
  for file in "$RUNS"/claims/pretrain-*; do
    [[ -f $file ]] && held_by_another "$file" || continue
    finished "$RUNS/${file##*/}" || return 0
  done
  return 1
}
# passes over the units: the second takes up the evaluations of units whose pretraining another copy ran
# meanwhile; while another copy still pretrains, this one waits and passes again rather than end (with many
# copies, one GPU's say, most would otherwise end before the first encoder is ready)
pass=0
while :; do
  pass=$((pass + 1))
  for unit in "${ORDER[@]}"; do
    FT_LR=()
    [[ $unit == mae || $unit == random_vit ]] && FT_LR=(--lr "$VIT_LR")
    for s in "${PRETRAIN_SEEDS[@]}"; do
      name=$unit-s$s
      SEED0=$((s * EVAL_SEEDS))  # unit s: evaluation seeds 5s .. 5s+4, the same for every method and baseline
      if [[ $unit == random* ]]; then
        FROM=(--init random --in-chans 1)  # the random weights follow the evaluation seed
        [[ $unit == random_vit ]] && FROM+=("${VIT[@]}")
        DIRS=() PLAN=1
        evaluations "$name" ft
        PLAN=0 evals=("${DIRS[@]}")
        complete "$name" "${evals[@]}" && continue
        evaluations "$name" ft
        complete "$name" "${evals[@]}" || true
        continue
      fi
      pre=$RUNS/pretrain-$name
      FROM=(--ckpt "$pre/checkpoint.pt")
      if ! flags=$(chosen "$unit"); then
        echo "not run unit $name: the sweep of $unit chose nothing ($(cat "$RUNS/sweep-$unit.err" 2>/dev/null))"
        continue
      fi
      read -ra recipe <<<"$flags"
      pretrain() {
        timed "$pre" "$PY" "pretrain_$unit.py" --config "${CONFIG[$unit]}" "${MAIN[@]}" "${COMMON[@]}" --seed "$s" \
          "${recipe[@]}" --epochs "$EPOCHS" --warmup-epochs "$WARMUP" --eval-every "$MONITOR" "${LIMIT[@]}" --out "$pre"
      }
      DIRS=() PLAN=1
      pretrain
      evaluations "$name" ft lpft ld
      PLAN=0 evals=("${DIRS[@]:1}")
      # archived evaluations need no encoder, unless it was pretrained by another recipe (then it runs again)
      made=$ARCHIVE/pretrain-$name/command.txt
      if [[ -f $ARCHIVE/pretrain-$name/superseded.txt || ( -f $made && $(cat "$made") != "${COMMAND_OF[$pre]}" ) ]]; then
        [[ $DRY_RUN == 1 ]] || rm -f "$ARCHIVE/unit-$name.done"
      elif complete "$name" "${evals[@]}"; then
        continue
      fi
      DIRS=()
      pretrain
      if [[ $DRY_RUN == 0 ]]; then
        finished "$pre" && made_here "$pre" || continue  # another copy pretrains it, or STOP_AT passed
        same_encoder "$pre" "${evals[@]}"
      fi
      evaluations "$name" ft lpft ld
      complete "$name" "${evals[@]}" || true
    done
  done
  [[ $DRY_RUN == 1 ]] && break
  ((pass >= 2)) || continue
  another_pretrains || break
  echo "wait    for another copy's pretraining run"
  sleep 10
done

# ---------------------------------------------------------------- report spec
# a part of the round (METHODS, PRETRAIN_SEEDS) reports in a folder of its own, beside the whole round's
if [[ "${METHODS[*]}" != "$ALL_METHODS" || "${PRETRAIN_SEEDS[*]}" != "0 1 2" ]]; then
  RESULTS+=/part-$(IFS=-; echo "${METHODS[*]}")-s$(IFS=-; echo "${PRETRAIN_SEEDS[*]}")
fi
mkdir -p "$RESULTS"
INITS=("${BASELINES[@]}" "${METHODS[@]}")
sweeps=""
for m in "${SWEPT[@]}"; do
  [[ -f $ARCHIVE/sweep-$m.md ]] && sweeps+=$'\n'"${METHOD_NAMES[$m]}:"$'\n\n'"$(cat "$ARCHIVE/sweep-$m.md")"$'\n'
done
NO_SWEEP="(round one's for BYOL, SimCLR and Barlow Twins; the others not run yet)"
# wall_times: a Markdown table, per method, of the mean wall time of a pretraining run and of a unit's
# evaluations (for each kind of evaluation, e.g. ft-lf0.1, the mean of its timed runs, summed over the
# kinds; "–" while a kind has none), how many archived runs were timed (seconds.txt: run whole by one
# attempt) and how many units are complete
wall_times() {
  local init dir kind pre npre runs timed total units untimed s kinds
  echo "| encoder | pretraining run, min | a unit's evaluations, min | runs timed | units complete |"
  echo "|---|---|---|---|---|"
  for init in "${INITS[@]}"; do
    local -A sum=() n=()
    pre=0 npre=0 runs=0 timed=0 total=0 untimed=0 units=0
    kinds=$(( ${#FRACTIONS[@]} * ($([[ $init == random* ]] && echo 2 || echo 4)) + 2 ))  # probe + variants, transfer
    while IFS= read -r dir; do  # the archived runs of this part's pretraining seeds
      [[ -f $dir/metrics.json || -f $dir/log.jsonl ]] || continue
      dir=${dir%/} kind=${dir##*/}
      kind=${kind%-"$init"-s*} runs=$((runs + 1))
      [[ $kind == pretrain ]] || n[$kind]=$((${n[$kind]:-0}))
      [[ -f $dir/seconds.txt ]] || continue
      timed=$((timed + 1))
      if [[ $kind == pretrain ]]; then pre=$((pre + $(cat "$dir/seconds.txt"))) npre=$((npre + 1)); continue; fi
      sum[$kind]=$((${sum[$kind]:-0} + $(cat "$dir/seconds.txt"))) n[$kind]=$((n[$kind] + 1))
    done < <(for s in "${PRETRAIN_SEEDS[@]}"; do printf '%s\n' "$ARCHIVE"/*-"$init"-s"$s"; done)
    for kind in "${!n[@]}"; do
      if ((n[$kind])); then total=$((total + sum[$kind] / n[$kind])); else untimed=1; fi
    done
    for s in "${PRETRAIN_SEEDS[@]}"; do [[ ! -f $ARCHIVE/unit-$init-s$s.done ]] || units=$((units + 1)); done
    echo "| ${METHOD_NAMES[$init]} | $( ((npre)) && echo $((pre / npre / 60)) || echo –) |" \
         "$( ((${#n[@]} == kinds && !untimed)) && echo $((total / 60)) || echo –) | $timed of $runs | $units |"
    unset sum n
  done
}
INTRO=""
if [[ $QUICK == 1 ]]; then
  INTRO="QUICK mode: a check of the pipeline (1-epoch sweep runs and $EPOCHS-epoch pretraining of at most 2
batches of 64, 2 fine-tuning epochs of at most 2 batches, $EVAL_SEEDS evaluation seeds), not the study's numbers.
"
fi
INTRO="${INTRO}Pretraining: $(for m in "${METHODS[@]}"; do echo "${METHOD_NAMES[$m]}"; done | listed) on
${DATA:-PneumoniaMNIST}'s train images (labels unused), 1-channel, 28 px, batch $BATCH, $EPOCHS epochs each (warm-up
$WARMUP, the config's schedule), pretraining seeds ${PRETRAIN_SEEDS[*]}; a ResNet-18 for every method but MAE (ViT-Tiny,
patch 4, mean pooling). Each method keeps its own views, loss and optimiser (configs/cpu_<method>.yaml); BYOL, SimCLR
and Barlow Twins keep round one's sweep winner (crop floor 0.35, Adam lr 1e-3), the other methods sweep their
crop floor and lr (${SWEEP[*]}, kNN AUC on the validation split), the best going on to the full budget.
Downstream, for each pretraining run s: evaluation seeds ${EVAL_SEEDS}s .. ${EVAL_SEEDS}s+$((EVAL_SEEDS - 1)) (the label subset, the head, the
batches), the same for the random-init baseline's unit s, whose weights also follow the seed. Linear probe: logistic
regression, L2 strength chosen on validation. Fine-tuning (Adam 1e-3, a ViT-Tiny's $VIT_LR, weight decay 1e-6, BatchNorm statistics
recomputed before each validation, the best validated epoch kept, validating every ${VAL_EVERY[0.01]} / ${VAL_EVERY[0.1]} / ${VAL_EVERY[1]} epochs at
1 / 10 / 100% and every $TRANSFER_VAL_EVERY in transfer; ${FT_EPOCHS[0.01]} epochs of batch ${FT_BATCH[0.01]} at 1%,
${FT_EPOCHS[0.1]} of ${FT_BATCH[0.1]} at 10%, ${FT_EPOCHS[1]} of ${FT_BATCH[1]} at 100%; transfer: $TRANSFER_EPOCHS of 128): plain; LP-FT (Kumar
et al. 2022: the head alone on the frozen encoder for half as many epochs, Adam 2e-3, then plain fine-tuning);
layer-wise lr decay $LAYER_DECAY per layer below the head. Random inits are fine-tuned plainly. LP-FT's head epochs come
on top of the plain schedule, as in its paper, so its comparison with plain fine-tuning includes that extra training.
Statistics: each run's value is the mean over its $EVAL_SEEDS evaluation seeds, and runs are compared (n = number of
pretraining runs): the evaluation seeds of one encoder share its pretraining, so pooling them would count one
pretraining run several times. Welch's t-test on the run means; with 3 runs a side the exact Mann-Whitney test
cannot go below p = 0.100, so Welch's p < 0.05 is the criterion, without correction for the number of comparisons
(the report counts them). LP-FT and layer decay are compared with plain fine-tuning of the same encoders by the paired
t-test over pretraining runs; the pooled tables pair the runs of every method with a ResNet-18 (MAE's ViT-Tiny
fine-tunes at another lr), so their test speaks for these encoders, nested in their methods, not for methods in general.
Recipe sweep, kNN AUC on the validation split:
${sweeps:-$NO_SWEEP}

Wall time, one core each (two copies of the script on 2 cores, OMP_NUM_THREADS=1), from the archived runs that one
attempt ran whole (a run resumed after an interruption is not timed); a unit's evaluations: the mean timed run of each
kind (probe or fine-tuning variant, label fraction, transfer), summed over the kinds:

$(wall_times)"
if [[ -n $DATA || -n $TRANSFER ]]; then
  INTRO="$INTRO
Own data: ${DATA:-PneumoniaMNIST} is the corpus and the downstream task, ${TRANSFER:-BreastMNIST} the transfer task."
fi
# row LABEL NAME...: a spec row of the archived runs NAME-s<seed> for each pretraining seed (NAME may glob)
row() {
  local label=$1 name s runs=()
  shift
  for name in "$@"; do for s in "${PRETRAIN_SEEDS[@]}"; do runs+=("\"$ARCHIVE/$name-s$s\""); done; done
  echo "      - {label: \"$label\", runs: [$(IFS=,; echo "${runs[*]}")]}"
}
baseline_of() { [[ $1 == mae ]] && echo random_vit || echo random; }
table() {  # table TITLE PREFIX VARIANTS...: one row per init and variant, each method compared with its baseline
  local title=$1 prefix=$2 init v
  shift 2
  echo "  - title: \"$title\""
  echo "    metrics: [auc, acc]"
  echo "    unit: run"
  echo "    same_training: true"
  echo "    allow_mismatch: [head_epochs, layer_decay]  # LP-FT's and layer decay's own, against plain fine-tuning"
  echo "    runs_expected: ${#PRETRAIN_SEEDS[@]}"
  echo "    rows:"
  for init in "${INITS[@]}"; do
    for v in "$@"; do
      [[ $init == random* && $v != ft && $v != probe ]] && continue
      row "${VNAME[$v]}, ${METHOD_NAMES[$init]}" "$v-$prefix$init"
    done
  done
  local pairs=() paired=() m
  for m in "${METHODS[@]}"; do
    for v in "$@"; do
      [[ $v == ft || $v == probe ]] || continue
      pairs+=("[\"${VNAME[$v]}, ${METHOD_NAMES[$(baseline_of "$m")]}\", \"${VNAME[$v]}, ${METHOD_NAMES[$m]}\"]")
    done
    for v in "$@"; do
      [[ $v == lpft || $v == ld ]] && paired+=("[\"${VNAME[ft]}, ${METHOD_NAMES[$m]}\", \"${VNAME[$v]}, ${METHOD_NAMES[$m]}\"]")
    done
  done
  # which method: round one's leader (BYOL's probe, highest at every fraction) against each other method
  if [[ " ${METHODS[*]} " == *" byol "* ]]; then
    for m in "${METHODS[@]}"; do
      [[ $m == byol ]] && continue
      for v in probe ft; do
        [[ " $* " == *" $v "* ]] && pairs+=("[\"${VNAME[$v]}, BYOL\", \"${VNAME[$v]}, ${METHOD_NAMES[$m]}\"]")
      done
    done
  fi
  local IFS=,
  echo "    compare: [${pairs[*]}]"
  # LP-FT and layer decay against plain fine-tuning of the same encoders: paired by pretraining run
  echo "    compare_paired: [${paired[*]}]"
}
declare -A VNAME=([probe]=probe [ft]=fine-tune [lpft]=LP-FT [ld]="layer decay")
figure() {  # figure TITLE RUN-PREFIX [pretrained]: one curve per init (per pretrained method)
  fraction_figure "$1" run
  for init in "${INITS[@]}"; do
    [[ ${3:-} == pretrained && $init == random* ]] || row "${METHOD_NAMES[$init]}" "$2*-$init"
  done
}
{
  spec_head "which method, and can fine-tuning keep the gain?"
  for f in "${FRACTIONS[@]}"; do
    table "${DATA:-PneumoniaMNIST}, ${PERCENT[$f]} of the labels: linear probe and fine-tuning (test)" "lf$f-" probe ft lpft ld
  done
  # every ResNet-18 method's pretraining runs together: do the variants help these encoders? (MAE's ViT-Tiny,
  # fine-tuned at its own lr, has its paired rows above: pooled with them the report would refuse the lrs)
  pooled=()
  for m in "${METHODS[@]}"; do [[ $m == mae ]] || pooled+=("$m"); done
  for f in "${FRACTIONS[@]}"; do
    ((${#pooled[@]})) || break  # MAE alone: nothing to pool
    echo "  - title: \"${PERCENT[$f]} of the labels, the pretrained ResNet-18 encoders of every method together (test)\""
    echo "    metrics: [auc, acc]"
    echo "    unit: run"
    echo "    same_training: true"
    echo "    allow_mismatch: [head_epochs, layer_decay]"
    echo "    rows:"
    for v in ft lpft ld; do row "${VNAME[$v]}, every ResNet-18 method" "${pooled[@]/#/$v-lf$f-}"; done
    echo "    runs_expected: $((${#pooled[@]} * ${#PRETRAIN_SEEDS[@]}))"
    echo "    compare_paired: [[\"fine-tune, every ResNet-18 method\", \"LP-FT, every ResNet-18 method\"], [\"fine-tune, every ResNet-18 method\", \"layer decay, every ResNet-18 method\"]]"
  done
  echo "  - title: \"Transfer to ${TRANSFER:-BreastMNIST} (test)\""
  echo "    metrics: [auc, acc]"
  echo "    unit: run"
  echo "    same_training: true"
  echo "    runs_expected: ${#PRETRAIN_SEEDS[@]}"
  echo "    rows:"
  for init in "${INITS[@]}"; do
    row "probe, ${METHOD_NAMES[$init]}" "transfer-probe-$init"
    row "fine-tune, ${METHOD_NAMES[$init]}" "transfer-ft-$init"
  done
  transfer_pairs=()
  for m in "${METHODS[@]}"; do
    for v in probe fine-tune; do
      transfer_pairs+=("[\"$v, ${METHOD_NAMES[$(baseline_of "$m")]}\", \"$v, ${METHOD_NAMES[$m]}\"]")
    done
  done
  (IFS=,; echo "    compare: [${transfer_pairs[*]}]")
  echo "figures:"
  figure "Linear probe: test AUC against the label fraction" "probe-lf"
  figure "Fine-tuning: test AUC against the label fraction" "ft-lf"
  figure "LP-FT: test AUC against the label fraction" "lpft-lf" pretrained
  figure "Layer-wise lr decay: test AUC against the label fraction" "ld-lf" pretrained
  knn_figure
  for m in "${METHODS[@]}"; do echo "      - {label: \"${METHOD_NAMES[$m]}\", runs: \"$ARCHIVE/pretrain-$m-s${PRETRAIN_SEEDS[0]}\"}"; done
} >"$RESULTS/spec.yaml.$$"
# copies that finish together write the report one after the other
exec 9<"$0"
flock 9
mv "$RESULTS/spec.yaml.$$" "$RESULTS/spec.yaml"
make_report
