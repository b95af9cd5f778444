#!/usr/bin/env bash
# Set up, run the default experiment (LeNet-300-100 on Fashion-MNIST, 20 masks x 5 reset points,
# random re-init control) on NP MPI ranks (default 2), then print where the results are and the tables.
# Extra arguments go to lthmpi.main, e.g. ./run/quickstart.sh --set train.epochs=5
# LTHMPI_DEVICE=gpu ./run/quickstart.sh sets up the CUDA build of TensorFlow instead (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
./run/setup.sh
NP=${NP:-2}
RUN_DIR=${RUN_DIR:-runs/quickstart}
echo "quickstart: running the default experiment on $NP ranks into $RUN_DIR (rerun to resume)"
.venv/bin/mpirun -np "$NP" .venv/bin/python -m lthmpi.main --run-dir "$RUN_DIR" "$@"
.venv/bin/python -m lthmpi.analysis "$RUN_DIR" --out "$RUN_DIR-analysis"
echo "quickstart: results in $RUN_DIR/results.h5, plots and report in $RUN_DIR-analysis/report.md"
