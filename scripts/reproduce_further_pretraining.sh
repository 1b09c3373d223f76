#!/usr/bin/env bash
# Reproduces paper 003 (further pretraining for skin lesions): ResNet-50 encoders initialised with
# supervised ImageNet weights ("SL") or ImageNet Barlow Twins ("SSL"), each fine-tuned and linearly
# probed as they are and after Barlow Twins further pretraining (of all layers or of the last block
# only) on the fine-tuning images alone ("I") or on a larger unlabeled set ("I+U"). Seeded runs (35 each
# at paper scale) give accuracy and weighted F1, with Welch / Mann-Whitney tests of each further
# pretrained encoder against its base.
#
#   bash scripts/reproduce_further_pretraining.sh            # paper scale (GPU, configs/paper003_*.yaml)
#   QUICK=1 bash scripts/reproduce_further_pretraining.sh    # CPU scale (~20 min on 2 cores)
#   bash scripts/reproduce_further_pretraining.sh --dry-run  # (or DRY_RUN=1) list the runs, write the spec
#   DATA=isic2019.csv UNLABELED=path/to/unlabeled bash scripts/reproduce_further_pretraining.sh   # the paper's data
#
# DATA= (the paper's ISIC 2019 as a CSV manifest, or any labelled folder, CSV or .npz; docs/DATA.md)
# replaces the fine-tuning set "I" (DermaMNIST; QUICK: BreastMNIST) in further pretraining and in every
# evaluation; UNLABELED= (a folder or CSV, labels unused) is added to it as the larger set "I+U" in place
# of ChestMNIST (QUICK: PneumoniaMNIST); DATA_FLAGS="..." adds data flags to the runs that read DATA.
#
# Runs go to runs/[quick/]further_pretraining, the report to results/[quick/]further_pretraining.
# Finished runs are skipped, so re-running continues an interrupted reproduction; what cannot be had
# (the ImageNet weights offline) makes "not run: <reason>" rows. RUNS=, RESULTS=, PY= override the
# folders and the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER="Paper 003 (further pretraining, skin lesions)"
QUICK=${QUICK:-0}
TRAINABLE=(all last-block)
MODES=(finetune linear_probe)
# the paper's bases; ImageNet models that evaluate.py and pretrain_barlow.py load by name
declare -A BASE_INIT=([sl]=imagenet [ssl]=barlowtwins)
declare -A BASE_LABEL=([sl]="SL (supervised ImageNet)" [ssl]="SSL (Barlow Twins ImageNet)"
                       [random]="random init (stand-in for SL)" [sslq]="Barlow Twins on PneumoniaMNIST (stand-in for SSL)")
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-runs/quick/further_pretraining}
  RESULTS=${RESULTS:-results/quick/further_pretraining}
  # BreastMNIST (546 train images) is the small fine-tuning set "I"; its train images plus
  # PneumoniaMNIST's are the larger unlabeled set "I+U"; ResNet-18 at 28 px throughout
  FT_DATA=breastmnist
  EXTRA_DATA=pneumoniamnist   # what "I+U" adds to "I"
  BASES=(sl ssl random sslq)  # the paper's two (not available offline) and two stand-ins
  ARCH=(--arch resnet50)      # only the paper's bases, whose weights are ResNet-50s
  FURTHER=(--config configs/cpu_further.yaml --epochs 3 --max-steps 10)
  # 1 head epoch + 4 epochs at a fixed lr instead of 40 at a range-tested one; 3 seeds, not 35
  # --precise-bn on: 16 steps leave BN's running averages behind the weights (evaluate.py --precise-bn)
  EVAL=(--config configs/paper003_further_finetune.yaml --epochs 4 --lr 1e-3 --precise-bn on --seeds 3)
else
  RUNS=${RUNS:-runs/further_pretraining}
  RESULTS=${RESULTS:-results/further_pretraining}
  # DermaMNIST 224 px (HAM10000) stands in for ISIC2019*; MedMNIST has no second skin set, so the
  # larger unlabeled set adds ChestMNIST's 78k images: more images, not more of the same domain
  FT_DATA=dermamnist
  EXTRA_DATA=chestmnist
  BASES=(sl ssl)
  ARCH=(--arch resnet50)
  FURTHER=(--config configs/paper003_further.yaml)
  EVAL=(--config configs/paper003_further_finetune.yaml --size 224 --seeds 35)
fi
UNLABELED=${UNLABELED:-}
DATA_REPLACES="the fine-tuning set I ($FT_DATA) in further pretraining and evaluation"
source scripts/reproduce_lib.sh
parse_args "$@"
if [[ -n $DATA ]]; then
  FT_DATA=$DATA
  [[ -z $UNLABELED || -e $UNLABELED ]] || die "UNLABELED=$UNLABELED: no such file or folder"
  [[ -z $UNLABELED ]] || echo "# UNLABELED=$UNLABELED replaces $EXTRA_DATA in the larger set I+U"
  EXTRA_DATA=${UNLABELED:-$EXTRA_DATA}
fi
declare -A CORPUS=([I]=$FT_DATA [IU]=$FT_DATA,$EXTRA_DATA)
EVAL+=(--data "$FT_DATA" "${DATA_ARGS[@]}")

# ---------------------------------------------------------------- runs
# init_of BASE: the --init of a further-pretraining run; base_flags BASE: the encoder flags of evaluate.py
init_of() {
  case $1 in
    sl|ssl) echo "${BASE_INIT[$1]}" ;;
    random) echo random ;;
    sslq) echo "$RUNS/base-sslq/checkpoint.pt" ;;
  esac
}
base_flags() {
  case $1 in
    sl|ssl) echo "--init ${BASE_INIT[$1]} ${ARCH[*]}" ;;
    random) echo "--init random" ;;
    sslq) echo "--ckpt $RUNS/base-sslq/checkpoint.pt" ;;
  esac
}
if [[ $QUICK == 1 ]]; then  # the stand-in for ImageNet Barlow Twins: a short run on another dataset
  step "$RUNS/base-sslq" "$PY" pretrain_barlow.py --config configs/cpu_barlow.yaml --data pneumoniamnist \
    --epochs 3 --max-steps 15 --eval-every 0 --out "$RUNS/base-sslq"
fi
ENCODERS=()  # name|evaluate.py flags, for every encoder that is evaluated
for base in "${BASES[@]}"; do
  ENCODERS+=("$base|$(base_flags "$base")")
  for corpus in I IU; do
    for part in "${TRAINABLE[@]}"; do
      name=$base-further-$corpus-$part
      arch=()
      [[ $base == sl || $base == ssl ]] && arch=("${ARCH[@]}")
      step "$RUNS/$name" "$PY" pretrain_barlow.py "${FURTHER[@]}" "${arch[@]}" --init "$(init_of "$base")" \
        --data "${CORPUS[$corpus]}" "${DATA_ARGS[@]}" --trainable "$part" --out "$RUNS/$name"
      ENCODERS+=("$name|--ckpt $RUNS/$name/checkpoint.pt")
    done
  done
done
for encoder in "${ENCODERS[@]}"; do
  name=${encoder%%|*}
  read -ra flags <<<"${encoder#*|}"
  step "$RUNS/finetune-$name" "$PY" evaluate.py "${EVAL[@]}" "${flags[@]}" --out "$RUNS/finetune-$name"
  # paper 003's linear probe (§3.5): the same recipe with the whole encoder frozen
  step "$RUNS/linear_probe-$name" "$PY" evaluate.py "${EVAL[@]}" "${flags[@]}" --freeze layer4 \
    --out "$RUNS/linear_probe-$name"
done

# ---------------------------------------------------------------- report spec
mkdir -p "$RESULTS"
if [[ $QUICK == 1 ]]; then
  INTRO="QUICK (CPU-scale) mode, not the paper's numbers. Substitutions: BreastMNIST (28 px) is the
fine-tuning set instead of ISIC2019*, and BreastMNIST + PneumoniaMNIST train images the larger unlabeled
set; the paper's ImageNet bases cannot be had offline, so a random init and a short Barlow Twins run on
PneumoniaMNIST (3 epochs of 15 batches) stand in for SL and SSL, as ResNet-18s; further pretraining is
configs/cpu_further.yaml cut to 3 epochs of at most 10 batches; evaluation 1 head epoch + 4 epochs at lr
1e-3 (paper: 40 epochs, lr from a range test) with BatchNorm statistics recomputed before each validation
(--precise-bn on), 3 seeds instead of 35. Published numbers are for
ISIC2019* and only sit beside the paper's own rows. Only the real breastmnist.npz and
pneumoniamnist.npz were read."
else
  INTRO="Paper scale: configs/paper003_further.yaml and configs/paper003_further_finetune.yaml on
DermaMNIST 224 px (standing in for ISIC2019*), ResNet-50, 35 seeded runs per row."
fi
if [[ -n $DATA ]]; then
  INTRO="$INTRO
Own data: $DATA is the fine-tuning set I (and part of I+U, with $EXTRA_DATA) in place of the stand-in."
fi
declare -A CORPUS_LABEL=([I]="fine-tuning images" [IU]="larger unlabeled set")
# published linear-probe accuracy (paper 003 on ISIC2019*, its linear-probe table)
declare -A PUB=([linear_probe-sl]="acc: \"0.593\"" [linear_probe-ssl]="acc: \"0.663\""
                [linear_probe-ssl-further-I-last-block]="acc: \"0.694\"")
label_of() {  # label_of NAME: a row label from an encoder's name
  local base=${1%%-*}
  [[ $1 == "$base" ]] && { echo "${BASE_LABEL[$base]}"; return; }
  local rest=${1#*-further-}
  echo "${BASE_LABEL[$base]} + further (${CORPUS_LABEL[${rest%%-*}]}, ${rest#*-})"
}
{
  spec_head "reproduction"
  for mode in "${MODES[@]}"; do
    for base in "${BASES[@]}"; do
      echo "  - title: \"$(data_name "$FT_DATA"), ${mode/_/ }, ${BASE_LABEL[$base]} (test)\""
      echo "    metrics: [acc, weighted_f1, auc]"
      echo "    source: \"paper 003's published linear-probe table (ISIC2019*)\""
      echo "    rows:"
      compare=()
      for encoder in "${ENCODERS[@]}"; do
        name=${encoder%%|*}
        [[ ${name%%-*} == "$base" ]] || continue
        echo "      - {label: \"$(label_of "$name")\", runs: \"$RUNS/$mode-$name\", published: {${PUB[$mode-$name]:-}}}"
        [[ $name == "$base" ]] || compare+=("[\"$(label_of "$base")\", \"$(label_of "$name")\"]")
      done
      (IFS=,; echo "    compare: [${compare[*]}]")
    done
  done
  echo "figures:"
  echo "  - kind: lr_range"
  echo "    title: \"LR range tests of further pretraining\""
  echo "    rows:"
  for base in "${BASES[@]}"; do
    echo "      - {label: \"$(label_of "$base-further-I-last-block")\", runs: \"$RUNS/$base-further-I-last-block\"}"
  done
} >"$RESULTS/spec.yaml"
make_report
