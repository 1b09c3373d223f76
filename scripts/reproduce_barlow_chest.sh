#!/usr/bin/env bash
# Reproduces paper 002 (Barlow Twins on chest X-rays): a 1-channel ResNet-18 pretrained with Barlow
# Twins, with its scans of the augmentation set, the projector (512, 1024, 2048, 512-512, 512-1024,
# 512-2048) and lambda (1e-4 .. 1e-1), each judged by a linear probe; linear head vs full network;
# fine-tuning on 1, 5, 10, 25, 50 and 100% of the labels against random and ImageNet init; the
# layer-freezing study; Grad-CAM of the pretrained vs the random-init fine-tuned model; and the
# downstream hyperparameter random search (55 trials at paper scale). Downstream task: PneumoniaMNIST.
#
#   bash scripts/reproduce_barlow_chest.sh            # paper scale (GPU, configs/paper002_*.yaml): -> runs/barlow_chest
#   QUICK=1 bash scripts/reproduce_barlow_chest.sh    # CPU scale (~25 min on 2 cores): -> runs/quick/barlow_chest
#   bash scripts/reproduce_barlow_chest.sh --dry-run  # (or DRY_RUN=1) list the runs, write the spec, train nothing
#   DATA=COVID-19_Radiography_Dataset/covid.csv bash scripts/reproduce_barlow_chest.sh   # the paper's own X-rays
#
# DATA= (the paper's COVID-19 Radiography database or CheXpert as a CSV manifest or folder, or any
# labelled chest X-ray source; docs/DATA.md) replaces both the pretraining corpus (ChestMNIST; QUICK:
# PneumoniaMNIST's train images) and the downstream task (PneumoniaMNIST); DATA_FLAGS="..." adds data
# flags, e.g. DATA_FLAGS='--label-columns "Atelectasis,Cardiomegaly,Pleural Effusion" --uncertain-label one'
# for CheXpert.
#
# Reports go to results/[quick/]barlow_chest. Finished runs are skipped, so re-running continues an
# interrupted reproduction; what cannot be had makes "not run: <reason>" rows. RUNS=, RESULTS=, PY=
# override the folders and the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER="Paper 002 (Barlow Twins, chest X-rays)"
QUICK=${QUICK:-0}
FINAL_AUG=base+vflip+equalize+perspective+blur+noise    # paper 002's final set (the default run)
PROJECTORS=(512 1024 2048 512-512 512-1024 512-2048)    # 512 is the default run
LAMBDAS=(1e-4 1e-3 5e-3 1e-2 1e-1)                      # 5e-3 is the default run
FRACTIONS=(0.01 0.05 0.1 0.25 0.5 1)
FREEZE=(stem layer1 layer2 layer3 layer4)
SEARCH_SEED=2002
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-runs/quick/barlow_chest}
  RESULTS=${RESULTS:-results/quick/barlow_chest}
  # PneumoniaMNIST's train images (labels unused) stand in for the chest X-ray corpus, at 28 px;
  # 2 epochs of 10 batches of 128 per pretraining run, so that the 12 scan points fit in ~10 min
  PRETRAIN=(--config configs/cpu_barlow.yaml --in-chans 1 --epochs 2 --max-steps 10 --eval-every 0)
  PRETRAIN_DATA=()   # the config's pneumoniamnist
  EVAL_DATA=(--data pneumoniamnist)
  PROBE=(--mode linear_probe --seeds 1)   # logistic regression on frozen features: deterministic
  # --precise-bn on: after 16 steps BN's running averages lag the weights and a random-init network
  # gave every test image the majority class (ACC 0.625 at every label fraction; evaluate.py --precise-bn)
  FINETUNE=(--config configs/paper002_barlow_finetune.yaml --epochs 2 --max-steps 8 --precise-bn on --seeds 1)
  LF_SEEDS=(--seeds 3)   # the label-efficiency curve's error bands need more than one seed
  AUGS=(base base+vflip+equalize "$FINAL_AUG")
  SEARCH_TRIALS=3
  SALIENCY=8
else
  RUNS=${RUNS:-runs/barlow_chest}
  RESULTS=${RESULTS:-results/barlow_chest}
  PRETRAIN=(--config configs/paper002_barlow.yaml)
  PRETRAIN_DATA=()   # the config's chestmnist
  EVAL_DATA=(--data pneumoniamnist --size 224)   # the pretraining resolution
  PROBE=(--mode linear_probe --seeds 3)
  FINETUNE=(--config configs/paper002_barlow_finetune.yaml --seeds 3)
  LF_SEEDS=()
  # the paper grew its set one transformation at a time
  AUGS=(base base+vflip base+vflip+equalize base+vflip+equalize+perspective
        base+vflip+equalize+perspective+blur "$FINAL_AUG")
  SEARCH_TRIALS=55
  SALIENCY=16
fi
DATA_REPLACES="the pretraining corpus and the downstream task (PneumoniaMNIST)"
source scripts/reproduce_lib.sh
parse_args "$@"
if [[ -n $DATA ]]; then
  PRETRAIN_DATA=(--data "$DATA" "${DATA_ARGS[@]}")
  EVAL_DATA=(--data "$DATA" "${DATA_ARGS[@]}" "${EVAL_DATA[@]:2}")   # the same --size
fi
DEFAULT=$RUNS/pretrain-default   # final augmentations, projector 512, lambda 5e-3

# ---------------------------------------------------------------- pretraining scans
# pretrain NAME FLAGS...: a Barlow Twins run and its linear probe. Scan points equal to the default
# run are not repeated: aug_dir / projector_dir / lambda_dir map them onto it.
pretrain() {
  local name=$1
  shift
  step "$RUNS/pretrain-$name" "$PY" pretrain_barlow.py "${PRETRAIN[@]}" "${PRETRAIN_DATA[@]}" "$@" \
    --out "$RUNS/pretrain-$name"
  step "$RUNS/probe-$name" "$PY" evaluate.py --ckpt "$RUNS/pretrain-$name/checkpoint.pt" "${EVAL_DATA[@]}" \
    "${PROBE[@]}" --out "$RUNS/probe-$name"
}
aug_dir() { [[ $1 == "$FINAL_AUG" ]] && echo default || echo "aug-${1//+/_}"; }
projector_dir() { [[ $1 == 512 ]] && echo default || echo "projector-$1"; }
lambda_dir() { [[ $1 == 5e-3 ]] && echo default || echo "lambda-$1"; }

pretrain default --aug "$FINAL_AUG" --projector 512 --lambd 5e-3
for a in "${AUGS[@]}"; do [[ $(aug_dir "$a") == default ]] || pretrain "$(aug_dir "$a")" --aug "$a"; done
for p in "${PROJECTORS[@]}"; do [[ $p == 512 ]] || pretrain "$(projector_dir "$p")" --projector "$p"; done
for l in "${LAMBDAS[@]}"; do [[ $l == 5e-3 ]] || pretrain "$(lambda_dir "$l")" --lambd "$l"; done

# ---------------------------------------------------------------- downstream
# label fractions for the three inits; the 100% runs are also "full network" and carry the Grad-CAM maps
declare -A INIT_FLAGS=([barlow]="--ckpt $DEFAULT/checkpoint.pt" [random]="--init random --in-chans 1"
                       [imagenet]="--init imagenet")
for init in barlow random imagenet; do
  read -ra init_flags <<<"${INIT_FLAGS[$init]}"
  for f in "${FRACTIONS[@]}"; do
    extra=()
    [[ $f == 1 && $init != imagenet ]] && extra=(--saliency "$SALIENCY")
    # 1% of PneumoniaMNIST is 47 images, fewer than the recipe's batch of 96 (1% of paper 002's
    # ~16k labelled images was ~160): a batch of 32 there
    [[ $f == 0.01 ]] && extra+=(--batch-size 32)
    step "$RUNS/ft-lf$f-$init" "$PY" evaluate.py "${init_flags[@]}" "${EVAL_DATA[@]}" "${FINETUNE[@]}" \
      "${LF_SEEDS[@]}" --label-fraction "$f" "${extra[@]}" --out "$RUNS/ft-lf$f-$init"
  done
done
# layer freezing: --freeze X freezes the encoder up to and including X (layer4 = the head alone)
for layer in "${FREEZE[@]}"; do
  step "$RUNS/ft-freeze-$layer" "$PY" evaluate.py --ckpt "$DEFAULT/checkpoint.pt" "${EVAL_DATA[@]}" \
    "${FINETUNE[@]}" --freeze "$layer" --out "$RUNS/ft-freeze-$layer"
done
# the random search: lr and weight decay log-uniform, batch from the paper's menu; drawn by Python's
# seeded generator so that every machine (and every re-run) lists the same trials
mapfile -t TRIALS < <("$PY" -c "
import random
r = random.Random($SEARCH_SEED)
for i in range($SEARCH_TRIALS):
    print(f'{i} {10 ** r.uniform(-4, -2):.2e} {r.choice([32, 64, 96, 128])} {10 ** r.uniform(-6, -3):.2e}')")
for trial in "${TRIALS[@]}"; do
  read -r i lr bs wd <<<"$trial"
  step "$RUNS/search-$i" "$PY" evaluate.py --ckpt "$DEFAULT/checkpoint.pt" "${EVAL_DATA[@]}" "${FINETUNE[@]}" \
    --lr "$lr" --batch-size "$bs" --weight-decay "$wd" --out "$RUNS/search-$i"
done

# ---------------------------------------------------------------- report spec
mkdir -p "$RESULTS"
if [[ $QUICK == 1 ]]; then
  INTRO="QUICK (CPU-scale) mode, not the paper's numbers. Substitutions: the PneumoniaMNIST train images
(28 px, labels unused) stand in for the paper's chest X-ray pretraining corpus (ChestMNIST is not on this
machine), and PneumoniaMNIST is the downstream task; each Barlow Twins run is 2 epochs of 10 batches of
128 (paper: 300 epochs); 3 of the augmentation sets; fine-tuning 2 epochs of at most 8 batches (paper:
15 epochs) with BatchNorm statistics recomputed before each validation (--precise-bn on), 1 seed (3 for the label fractions; at 1% a batch of 32, as 1% of PneumoniaMNIST is 47
images); $SEARCH_TRIALS random-search trials instead of 55. ImageNet weights cannot be had
offline. Only the real pneumoniamnist.npz was read."
else
  INTRO="Paper scale: configs/paper002_barlow.yaml (ChestMNIST 224 px, 300 epochs) and
configs/paper002_barlow_finetune.yaml on PneumoniaMNIST 224 px, 3 seeds; 55 random-search trials. At 1% of
the labels (47 images) the batch is 32 instead of the recipe's 96."
fi
if [[ -n $DATA ]]; then
  INTRO="$INTRO
Own data: $DATA is both the pretraining corpus (its train split, labels unused) and the downstream task,
in place of the MedMNIST stand-ins."
fi
row() { echo "      - {label: \"$1\", runs: \"$RUNS/$2\"}"; }
table() {  # table TITLE: the header of a table of test AUC / ACC (rows follow)
  echo "  - title: \"$1\""
  echo "    metrics: [auc, acc, f1]"
  echo "    rows:"
}
{
  spec_head "reproduction"
  table "Augmentation scan (linear probe, test)"
  for a in "${AUGS[@]}"; do row "$a" "probe-$(aug_dir "$a")"; done
  table "Projector scan (linear probe, test)"
  for p in "${PROJECTORS[@]}"; do row "projector $p" "probe-$(projector_dir "$p")"; done
  table "Lambda scan (linear probe, test)"
  for l in "${LAMBDAS[@]}"; do row "lambda $l" "probe-$(lambda_dir "$l")"; done
  table "Linear head vs full network (test)"
  row "linear head" probe-default
  row "full network" ft-lf1-barlow
  echo "    compare: [[\"linear head\", \"full network\"]]"
  echo "    allow_mismatch: [mode]"  # the two modes are what this comparison is about
  table "Label fractions, fine-tuning (test)"
  for init in barlow random imagenet; do
    for f in "${FRACTIONS[@]}"; do row "$init init, $f of the labels" "ft-lf$f-$init"; done
  done
  echo "    compare: [[\"random init, 0.01 of the labels\", \"barlow init, 0.01 of the labels\"]," \
       "[\"random init, 1 of the labels\", \"barlow init, 1 of the labels\"]]"
  table "Layer freezing, Barlow Twins init (test)"
  row "nothing frozen" ft-lf1-barlow
  for layer in "${FREEZE[@]}"; do row "frozen up to $layer" "ft-freeze-$layer"; done
  table "Downstream random search, Barlow Twins init (test)"
  for trial in "${TRIALS[@]}"; do
    read -r i lr bs wd <<<"$trial"
    row "trial $i: lr $lr, batch $bs, weight decay $wd" "search-$i"
  done
  echo "figures:"
  echo "  - kind: curve"
  echo "    title: \"Test AUC against the label fraction\""
  echo "    x: label_fraction"
  echo "    metric: auc"
  echo "    log_x: true"
  echo "    rows:"
  for init in barlow random imagenet; do row "$init init" "ft-lf*-$init"; done
  echo "  - kind: saliency"
  echo "    title: \"Grad-CAM, fine-tuned on all labels\""
  echo "    map: gradcam"
  echo "    rows:"
  row "Barlow Twins init" ft-lf1-barlow
  row "random init" ft-lf1-random
  echo "  - kind: saliency"
  echo "    title: \"Occlusion sensitivity, fine-tuned on all labels\""
  echo "    map: occlusion"
  echo "    rows:"
  row "Barlow Twins init" ft-lf1-barlow
  row "random init" ft-lf1-random
  echo "  - kind: loss"
  echo "    title: \"Barlow Twins loss, lambda scan\""
  echo "    log_y: auto"  # log only when the lambdas' losses differ by orders of magnitude
  echo "    rows:"
  for l in "${LAMBDAS[@]}"; do row "lambda $l" "pretrain-$(lambda_dir "$l")"; done
} >"$RESULTS/spec.yaml"
make_report
