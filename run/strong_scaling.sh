#!/usr/bin/env bash
# Strong scaling: the same experiment (default: the default M x N grid) on P = 1, 2, 4, ... MPI ranks, each in a
# fresh run directory under one benchmark folder, plus a baseline of the same work as ONE process without
# mpirun with TensorFlow using all cores. Prints the wall time of every run, then the analysis (speed-up,
# efficiency, Amdahl / Karp-Flatt) over all runs, E(P) on the training phase and on wall time next to the
# wall-time E that each run's own serial phases allow (python -m lthmpi.analysis efficiency), and the scaling
# model fitted on the P = 1 run, checked against the other runs; with two or more MPI runs beyond P = 1, also
# the model calibrated on the smaller half of them (how start-up and task times grow with P) and checked
# against the larger half.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=strong_scaling.sh

usage() {
  cat <<EOF
usage: run/$PROG [options] [--config FILE] [--set KEY=VALUE ...] [-- more lthmpi.main arguments]

Runs the same experiment on P = 1, 2, 4, ... (doubling up to --max-ranks) MPI ranks and once as one
process without mpirun using all cores; each run in its own fresh run directory under the benchmark folder.

options:
  --max-ranks N         largest P of the doubling series 1, 2, 4, ... (default 2)
  --oversubscribe P     also run P ranks even where P x threads exceeds the cores (folder pP-oversubscribed)
  --threads-per-rank T  TensorFlow threads per rank in the MPI runs (default 1: one rank per core;
                        0 = automatic, cores // ranks on the host). Equal threads give identical results over P.
  --out DIR             benchmark folder (default runs/strong-<date>-<time> in the repository)
  --no-baseline         skip the one-process, all-cores baseline
  --force               delete run directories that already exist in DIR (default: refuse; a benchmark never resumes)
  --dry-run             print the commands and exit
  --config FILE, --set KEY=VALUE
                        passed to every run (shrink the work with them; do not set parallel.threads here)
  -h, --help            this text

environment: PYTHON (default .venv/bin/python), MPIRUN (default .venv/bin/mpirun), MPIRUN_ARGS (extra mpirun options)

layout of DIR: p1/, p2/, ..., pP-oversubscribed/, baseline-1proc-<cores>threads/ (run directories),
  <run>.out (their output), walltimes.tsv, analysis/ (python -m lthmpi.analysis), efficiency.txt,
  model.txt (scaling model),
  model_calibrated.txt (with two or more MPI runs beyond P = 1)
example (a tiny grid in ~1 min):
  run/$PROG --out /tmp/strong --set data.dataset=digits --set data.validation=200 --set train.epochs=2 \\
      --set 'prune.remaining=[0.5,0.2,0.1]' --set 'reset.points=["0ep","10it"]'
EOF
}

# shellcheck source=run/lib/bench.sh
source "$ROOT/run/lib/bench.sh"

bench_defaults
BASELINE=1
script_option() {
  SHIFT=0
  case "$1" in --no-baseline) BASELINE=0; SHIFT=1 ;; esac
}
bench_parse "$@"
bench_check_options

bench_setup
bench_check_config "${PASS[@]}" > /dev/null || exit 2
bench_out strong

# The runs: name, ranks, threads per rank, launcher (mpi|serial).
NAMES=() RANKS=() THR=() HOW=()
add() { NAMES+=("$1"); RANKS+=("$2"); THR+=("$3"); HOW+=("$4"); }
p=1
while [ "$p" -le "$MAX_RANKS" ]; do add "$(bench_name "$p" "$THREADS")" "$p" "$THREADS" mpi; p=$((p * 2)); done
if [ -n "$OVERSUB" ] && ! printf '%s\n' "${RANKS[@]}" | grep -qx "$OVERSUB"; then
  add "p$OVERSUB-oversubscribed" "$OVERSUB" "$THREADS" mpi
fi
[ "$BASELINE" = 1 ] && add "baseline-1proc-${CORES}threads" 1 "$CORES" serial

bench_fresh

command_for() {  # prints the command of run $1 (index), one argument per line
  local i=$1 dir="$OUT/${NAMES[$1]}"
  if [ "${HOW[$i]}" = mpi ]; then
    printf '%s\n' "$MPIRUN" "${MPIRUN_EXTRA[@]}" -np "${RANKS[$i]}"
  fi
  printf '%s\n' "$PY" -m lthmpi.main --run-dir "$dir" --quiet --set "parallel.threads=${THR[$i]}" "${PASS[@]}"
}

walltime_row() { printf '%s\t%s\t%s\t%s\n' "${NAMES[$1]}" "${RANKS[$1]}" "${THR[$1]}" "$2"; }
bench_all strong "--max-ranks $MAX_RANKS ${OVERSUB:+--oversubscribe $OVERSUB }--threads-per-rank $THREADS" \
  "$(printf 'run\tranks\tthreads_per_rank\twall_seconds')"
echo
echo "wall time (seconds, launch to exit; speed-up against p1 and against the one-process baseline):"
ref=${WALL[0]} base=""
[ "$BASELINE" = 1 ] && base=${WALL[$((${#WALL[@]} - 1))]}
printf '%-32s %5s %8s %10s %8s %11s\n' run P threads wall_s S_vs_p1 S_vs_base
for i in "${!NAMES[@]}"; do
  awk -v n="${NAMES[$i]}" -v p="${RANKS[$i]}" -v t="${THR[$i]}" -v w="${WALL[$i]}" -v r="$ref" -v b="$base" \
    'BEGIN { printf "%-32s %5d %8d %10.2f %8.2f %11s\n", n, p, t, w, r / w, (b == "" ? "-" : sprintf("%.2f", b / w)) }'
done

DIRS=() CHECK=()
for i in "${!NAMES[@]}"; do
  DIRS+=("$OUT/${NAMES[$i]}")
  [ "$i" -gt 0 ] && [ "${HOW[$i]}" = mpi ] && CHECK+=("$OUT/${NAMES[$i]}")
done
echo
echo "+ $PY -m lthmpi.analysis ${DIRS[*]} --out $OUT/analysis"
"$PY" -m lthmpi.analysis "${DIRS[@]}" --out "$OUT/analysis" | tee "$OUT/analysis.txt"

if [ ${#CHECK[@]} -gt 0 ]; then  # E(P) on the training phase and on wall time, and the bound of the serial phases
  echo
  echo "+ $PY -m lthmpi.analysis efficiency $OUT/${NAMES[0]} ${CHECK[*]}"
  "$PY" -m lthmpi.analysis efficiency "$OUT/${NAMES[0]}" "${CHECK[@]}" | tee "$OUT/efficiency.txt"
  echo "(E_train = training phase at P = 1 / (P x at P); E_wall likewise on wall time; bound = the wall-time E that"
  echo " the run's own serial phases (start-up, parent, masks, gather, merge) allow with a perfect training phase)"
fi

# The model's P: the measured ones, then doubling to 64 (what more ranks would give on this work).
ranks_list=$(printf '%s\n' "${RANKS[@]}" 1 2 4 8 16 32 64 | sort -n | uniq | paste -sd, -)
model=("$PY" -m lthmpi.analysis model "$OUT/${NAMES[0]}" --cores "$CORES" --ranks "$ranks_list")
[ ${#CHECK[@]} -gt 0 ] && model+=(--check "${CHECK[@]}")
echo
echo "+ ${model[*]}"
"${model[@]}" | tee "$OUT/model.txt"
done_files="walltimes.tsv, analysis/report.md, efficiency.txt, model.txt"
if [ ${#CHECK[@]} -ge 2 ]; then  # calibrate on the smaller half, check on the rest: honest predictions
  half=$((${#CHECK[@]} / 2))
  model=("$PY" -m lthmpi.analysis model "$OUT/${NAMES[0]}" --cores "$CORES" --ranks "$ranks_list"
         --calibrate "${CHECK[@]:0:$half}" --check "${CHECK[@]:$half}")
  echo
  echo "+ ${model[*]}"
  "${model[@]}" | tee "$OUT/model_calibrated.txt"
  done_files+=", model_calibrated.txt"
fi
echo
echo "$PROG: done: $OUT ($done_files)"
