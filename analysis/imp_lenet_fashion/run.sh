#!/usr/bin/env bash
# The IMP reference run (issue 23): LeNet-300-100 on Fashion-MNIST, IMP to 2.9% of weights left (16 levels of
# 20%, output layer 10%, layer-wise, as Frankle & Carbin), reset points 0 and 250 iterations, random re-init,
# next to a one-shot run of the same parent (same data, model, training, seed; masks at the same fractions).
# Short training (2 epochs) so that it runs in well under an hour on a shared 2-core box. From the repo root:
#   RUNS=/some/dir analysis/imp_lenet_fashion/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/imp_reference}
PY=${PY:-.venv/bin/python}
COMMON=(--set seed=0 --set data.dataset=fashion_mnist --set model.name=lenet300_100 --set train.epochs=2
        --set train.batch_size=60 --set train.optimizer=adam --set train.lr=1.2e-3 --set train.eval_every=100it
        --set prune.scope=layerwise --set 'prune.layer_rates={output=0.5}'
        --set 'reset.points=["0it", "250it"]' --set 'reset.controls=["random_reinit"]' --set parallel.threads=1)
FRACTIONS=$("$PY" -c 'print("[" + ", ".join(repr(round(0.8 ** l, 6)) for l in range(1, 17)) + "]")')
"$PY" -m lthmpi.main --quiet --run-dir "$RUNS/imp" "${COMMON[@]}" --set prune.method=imp --set prune.levels=16 \
    --set prune.imp_rate=0.2
"$PY" -m lthmpi.main --quiet --run-dir "$RUNS/oneshot" "${COMMON[@]}" --set "prune.remaining=$FRACTIONS"
"$PY" -m lthmpi.analysis "$RUNS/imp" "$RUNS/oneshot" --out analysis/imp_lenet_fashion/report
