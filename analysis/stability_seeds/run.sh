#!/usr/bin/env bash
# The stability reference runs over seeds (issue 32), from the repository root:
#   RUNS=/some/dir analysis/stability_seeds/run.sh
# One process, one TensorFlow thread per run (the box is shared); seeds 0, 1, 2 of each config. The run directories
# (parent checkpoints, endpoint weights: ~30 MB each) stay under $RUNS; their results.h5 and config.toml are copied
# into analysis/stability_seeds/runs/ and the analysis of the seeds together is written to report_*/ and *.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=analysis/stability_seeds
RUNS=${RUNS:-runs/stability_seeds}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
# EPOCHS=N: T = N epochs instead of the config's 3 (the lenet runs at T = 5 and 10); runs and reports take a _T<N>
# suffix. JOBS=2: the seeds two at a time.
# FULL=1: the full Fashion-MNIST training set (data.subset = 0; 5,000 of it for validation), suffix _full; an
# epoch is then 916 iterations, so the reset points are ordered 0, 100 it, 500 it, 1 ep.
EPOCHS=${EPOCHS:-}
JOBS=${JOBS:-1}
FULL=${FULL:-}
suffix=${EPOCHS:+_T$EPOCHS}${FULL:+_full}
for name in ${NAMES:-lenet imp}; do  # NAMES=lenet or NAMES=imp: one of the two (run.sh was run so, twice at once)
  config=$HERE/$([ $name = lenet ] && echo lenet_fashion.toml || echo imp_fashion.toml)
  dirs=()
  one() {  # one seed: train, then copy its results.h5 and config.toml beside this script
    local seed=$1 run=$RUNS/${name}${suffix}_s$1
    /usr/bin/time -a -o "$HERE/walltimes.txt" -f "$name$suffix seed $seed: %e s wall" "$PY" -m lthmpi.main --quiet \
        --config "$config" --set seed=$seed ${EPOCHS:+--set train.epochs=$EPOCHS} ${FULL:+--set data.subset=0 --set reset.points=[\"0ep\",\"100it\",\"500it\",\"1ep\"]} --set parallel.threads=1 --run-dir "$run"
    mkdir -p "$HERE/runs/${name}${suffix}_s$seed"
    cp "$run/results.h5" "$run/config.toml" "$HERE/runs/${name}${suffix}_s$seed/"
  }
  pids=()
  for seed in $SEEDS; do
    one "$seed" & pids+=($!)
    if [ ${#pids[@]} -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    dirs+=("$HERE/runs/${name}${suffix}_s$seed")
  done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p"; done
  "$PY" -m lthmpi.analysis "${dirs[@]}" --out "$HERE/report_$name$suffix" > "$HERE/analysis_$name$suffix.txt"
done
