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
for name in ${NAMES:-lenet imp}; do  # NAMES=lenet or NAMES=imp: one of the two (run.sh was run so, twice at once)
  config=$HERE/$([ $name = lenet ] && echo lenet_fashion.toml || echo imp_fashion.toml)
  dirs=()
  for seed in $SEEDS; do
    run=$RUNS/${name}_s$seed
    /usr/bin/time -a -o "$HERE/walltimes.txt" -f "$name seed $seed: %e s wall" "$PY" -m lthmpi.main --quiet --config "$config" --set seed=$seed \
        --set parallel.threads=1 --run-dir "$run"
    mkdir -p "$HERE/runs/${name}_s$seed"
    cp "$run/results.h5" "$run/config.toml" "$HERE/runs/${name}_s$seed/"
    dirs+=("$HERE/runs/${name}_s$seed")
  done
  "$PY" -m lthmpi.analysis "${dirs[@]}" --out "$HERE/report_$name" > "$HERE/analysis_$name.txt"
done
