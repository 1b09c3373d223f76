# Shared by scripts/reproduce_*.sh (sourced, not run): argument parsing, the run-or-skip step and the
# report. Each reproduce script sets PAPER, DATA_REPLACES and INTRO, then calls parse_args "$@", step ...
# for every run, writes $RESULTS/spec.yaml (starting with spec_head) and finally calls make_report.
#
# DATA=path: the paper's own dataset (a folder, a CSV manifest or an .npz; docs/DATA.md) in place of
# the MedMNIST stand-in(s) named by DATA_REPLACES; DATA_FLAGS="..." adds data flags (e.g. --label-columns
# or --split-ratio, quoted as in a shell) to every command that reads DATA.
#
# Why a step never stops the script: a paper has dozens of runs, and one that cannot be done here
# (a dataset or weights that cannot be downloaded, a GPU-sized run) must become a "not run: <reason>"
# line in the report, not abort the reproduction or leave a silent gap.

PY=${PY:-.venv/bin/python}
QUICK=${QUICK:-0}
DRY_RUN=${DRY_RUN:-0}
DATA=${DATA:-}
DATA_FLAGS=${DATA_FLAGS:-}

die() {  # one line on stderr, exit 2: the convention of every Python tool here
  echo "error: $*" >&2
  exit 2
}

parse_args() {
  local arg
  for arg in "$@"; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      *) die "unknown argument '$arg' (accepted: --dry-run, --help; QUICK=1 selects the CPU-scale mode)" ;;
    esac
  done
  [[ $QUICK == 0 || $QUICK == 1 ]] || die "QUICK must be 0 or 1, got '$QUICK'"
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
  [[ -x $PY ]] || die "no Python at $PY (run 'make test' once to create .venv, or set PY=...)"
  if [[ $QUICK == 1 ]]; then
    # QUICK only ever reads the real files offline: nothing is downloaded behind the report's back
    export MEDSSL_NO_DOWNLOAD=1
    # without MEDMNIST_ROOT: the offline copy the Makefile reads (its OFFLINE_MEDMNIST), when there is one
    local offline=${OFFLINE_MEDMNIST:-$(sed -n 's/^OFFLINE_MEDMNIST ?= *//p' Makefile 2>/dev/null)}
    if [[ -z ${MEDMNIST_ROOT:-} && -n $offline && -d $offline ]]; then
      MEDMNIST_ROOT=$(cd "$offline" && pwd)
      export MEDMNIST_ROOT
    fi
  fi
  DATA_ARGS=()
  if [[ -n $DATA ]]; then
    # a path must exist; a bare name (a MedMNIST flag such as chestmnist) is checked by the Python tools
    [[ -e $DATA || ( $DATA != */* && $DATA != *.* ) ]] ||
      die "DATA=$DATA: no such file or folder; give the dataset as a folder, a CSV manifest or an .npz (docs/DATA.md)"
    eval "DATA_ARGS=($DATA_FLAGS)" 2>/dev/null || die "DATA_FLAGS is not a valid list of flags: $DATA_FLAGS"
  fi
  echo "# $PAPER: ${SCALE_NAME:-$([[ $QUICK == 1 ]] && echo QUICK \(CPU-scale\) || echo paper-scale)} mode," \
       "runs in $RUNS, report in $RESULTS$([[ $DRY_RUN == 1 ]] && echo ', dry run: nothing is trained')"
  if [[ -n $DATA ]]; then
    echo "# DATA=$DATA${DATA_FLAGS:+ ($DATA_FLAGS)} replaces $DATA_REPLACES"
  fi
}

# data_name SOURCE: a run-directory name for a --data value (a path's file or folder name)
data_name() {
  local name=${1%/}
  name=${name##*/}
  name=${name%.*}
  echo "${name//[^A-Za-z0-9_-]/_}"
}

# finished DIR: true when DIR holds a finished evaluation or a pretraining checkpoint whose epoch has
# reached the run's --epochs. evaluate.py and finetune_beit.py write metrics.json last (atomically) and
# an --overwrite re-run removes it before anything else, so metrics.json means finished; one older than
# args.yaml belongs to an earlier command and does not count. The Python tools refuse to relaunch a
# finished run, so this check, not their error, is what lets an interrupted reproduction continue.
finished() {
  local dir=$1
  [[ -f $dir/metrics.json && ! $dir/args.yaml -nt $dir/metrics.json ]] && return 0
  [[ -f $dir/checkpoint.pt && -f $dir/args.yaml ]] || return 1
  "$PY" - "$dir" <<'EOF'
import sys, torch, yaml
d = sys.argv[1]
epochs = yaml.safe_load(open(f"{d}/args.yaml"))["epochs"]
sys.exit(0 if torch.load(f"{d}/checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] >= epochs else 1)
EOF
}

# step DIR COMMAND...: run COMMAND (whose --out is DIR) unless DIR is finished. Its output goes to
# DIR/output.log; on failure the tool's one-line error goes to DIR/not_run.txt, which report.py
# prints as the row's "not run" reason, and the reproduction goes on.
step() {
  local dir=$1 arg start rc=0 reason last
  shift
  if finished "$dir"; then
    echo "skip    $dir (finished)"
    return 0
  fi
  if [[ $DRY_RUN == 1 ]]; then
    echo "run     $*"
    return 0
  fi
  mkdir -p "$dir"
  # a run on the checkpoint of a step that could not run says why, instead of "file not found"
  for arg in "$@"; do
    if [[ $arg == */checkpoint.pt && -f ${arg%/*}/not_run.txt ]]; then
      echo "needs ${arg%/*}, not run: $(cat "${arg%/*}/not_run.txt")" >"$dir/not_run.txt"
      echo "not run $dir: $(cat "$dir/not_run.txt")"
      return 0
    fi
  done
  rm -f "$dir/not_run.txt"  # an earlier failure may be gone (weights downloaded since, a GPU now)
  start=$SECONDS
  "$@" >"$dir/output.log" 2>&1 || rc=$?
  if ((rc == 0)); then
    echo "done    $dir ($((SECONDS - start)) s)"
    return 0
  fi
  # killed by a signal (Ctrl-C, kill, the OOM killer): stop; the next launch resumes this step
  if ((rc > 128)); then
    echo "stopped $dir (signal $((rc - 128)))" >&2
    exit "$rc"
  fi
  # exit 2 is a tool's "cannot do this" line (error: ...); anything else is a crash, said as such
  reason=$(grep '^error:' "$dir/output.log" | tail -n 1 || true)
  last=$(tail -n 1 "$dir/output.log")
  [[ -n $reason ]] || reason="failed with exit code $rc${last:+: $last}"
  echo "$reason" >"$dir/not_run.txt"
  echo "not run $dir: $reason"
}

# spec_head TITLE: the report spec's first lines: "$PAPER: TITLE", $INTRO as a YAML block, "tables:"
spec_head() {
  echo "title: \"$PAPER: $1\""
  echo "intro: |"
  sed 's/^/  /' <<<"$INTRO"
  echo "tables:"
}

# make_report: scripts/report.py on $RESULTS/spec.yaml (written by the script). A dry run
# writes the spec too, so that it can be checked, but builds no report.
make_report() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "report  $PY scripts/report.py --spec $RESULTS/spec.yaml --out $RESULTS"
    return 0
  fi
  "$PY" scripts/report.py --spec "$RESULTS/spec.yaml" --out "$RESULTS"
}

# ---------------------------------------------------------------- the label-efficiency scripts
# main_and_transfer: MAIN, the corpus and downstream task (DATA, else PneumoniaMNIST), and OTHER, the
# transfer task (TRANSFER, else BreastMNIST); a TRANSFER path must exist, a bare name (a MedMNIST flag
# such as dermamnist) is checked by evaluate.py
main_and_transfer() {
  MAIN=(--data pneumoniamnist)
  OTHER=(--data breastmnist)
  [[ -n $DATA ]] && MAIN=(--data "$DATA" "${DATA_ARGS[@]}")
  if [[ -n ${TRANSFER:-} ]]; then
    [[ -e $TRANSFER || ( $TRANSFER != */* && $TRANSFER != *.* ) ]] ||
      die "TRANSFER=$TRANSFER: no such file or folder; give a MedMNIST flag, a folder, a CSV manifest or an .npz (docs/DATA.md)"
    OTHER=(--data "$TRANSFER")
    echo "# TRANSFER=$TRANSFER replaces BreastMNIST"
  fi
}

listed() { paste -sd, - | sed 's/,\([^,]*\)$/ and \1/; s/,/, /g'; }  # lines on stdin as "a, b and c"

# fraction_figure TITLE [UNIT]: a spec figure's head, test AUC against the label fraction (rows follow)
fraction_figure() {
  echo "  - kind: curve"
  echo "    title: \"$1\""
  echo "    x: label_fraction"
  echo "    metric: auc"
  echo "    log_x: true"
  [[ -z ${2:-} ]] || echo "    unit: $2"
  echo "    rows:"
}

# knn_figure: a spec figure's head, the pretraining runs' kNN monitor (rows follow)
knn_figure() {
  echo "  - kind: loss"
  echo "    title: \"Pretraining: kNN AUC on the validation split\""
  echo "    key: knn_val_auc"
  echo "    log_y: false"
  echo "    rows:"
}
