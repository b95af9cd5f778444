#!/usr/bin/env bash
# The first run on a GPU machine (docs/gpu.md): a short ResNet-20 and LeNet-300-100 grid on 1 and 2 ranks per GPU
# (parallel.device = "gpu"), the same grid on the CPU (parallel.device = "cpu", as many ranks), then every task's
# device, the ms per step of each grid on GPU against CPU, and the accuracy table.
#
#   LTHMPI_DEVICE=gpu ./run/setup.sh && ./run/gpu_check.sh [--dry-run] [--out DIR] [--iterations N] [-- --set ...]
#
# Without a GPU (no nvidia-smi, or it lists none) it says so in one line and runs the CPU half only.
# --dry-run prints the runs it would make and stops. Data: digits (bundled with scikit-learn) unless
# extra arguments after -- say otherwise (e.g. -- --set data.dataset=cifar10 --set data.dir=/data/cifar10).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check
ITERS=200
DRY=
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --iterations) ITERS=${2:?--iterations needs a number}; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_check: error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
case "$ITERS" in ''|*[!0-9]*|0) echo "gpu_check: error: --iterations must be a positive integer, not '$ITERS'" >&2; exit 2 ;; esac

PY=${LTHMPI_PYTHON:-.venv/bin/python}
MPIRUN=${LTHMPI_MPIRUN:-.venv/bin/mpirun}
GPUS=0
if command -v nvidia-smi >/dev/null && out=$(nvidia-smi -L 2>/dev/null); then
  GPUS=$(printf '%s\n' "$out" | grep -c '^GPU ' || true)
fi
if [ "$GPUS" -eq 0 ]; then
  echo "gpu_check: no NVIDIA GPU found (nvidia-smi missing or listing none): running the CPU half only" >&2
  DEVICES=(cpu)
else
  echo "gpu_check: $GPUS GPU(s): $(printf '%s\n' "$out" | head -n 1)$([ "$GPUS" -gt 1 ] && echo ", ...")"
  DEVICES=(gpu cpu)
fi
N=$(( GPUS > 0 ? GPUS : 1 ))

dirs=()
for model in resnet20 lenet300_100; do
  for per in 1 2; do
    np=$(( N * per ))
    for device in "${DEVICES[@]}"; do
      dir="$OUT/${model}_${device}_${per}pergpu"
      dirs+=("$dir")
      cmd=("$MPIRUN" -np "$np" "$PY" -m lthmpi.main --run-dir "$dir" --quiet
           --set data.dataset=digits --set data.validation=200 --set model.name=$model
           --set train.iterations=$ITERS --set train.batch_size=64 --set train.eval_every=50it
           --set 'prune.remaining=[0.5, 0.2]' --set 'reset.points=["0it", "50it"]' --set 'reset.controls=[]'
           --set parallel.device=$device --set parallel.subgroups=false "${EXTRA[@]}")
      if [ -n "$DRY" ]; then
        printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
      else
        echo "gpu_check: $model on $device, $np ranks ($per per GPU) -> $dir"
        "${cmd[@]}" >/dev/null
      fi
    done
  done
done
[ -n "$DRY" ] && exit 0
"$PY" run/gpu_check_report.py "${dirs[@]}"
