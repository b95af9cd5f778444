#!/usr/bin/env bash
# Strong scaling: the same experiment (default: the default M x N grid) on P = 1, 2, 4, ... MPI ranks, each in a
# fresh run directory under one benchmark folder, plus a baseline of the same work as ONE process without
# mpirun with TensorFlow using all cores. Prints the wall time of every run, then the analysis (speed-up,
# efficiency, Amdahl / Karp-Flatt) over all runs, E(P) on the training phase and on wall time next to the
# wall-time E that each run's own serial phases allow (python -m lthmpi.analysis efficiency), and the scaling
# model fitted on the P = 1 run, checked against the other runs; with two or more MPI runs beyond P = 1, also
# the model calibrated on the smaller half of them (how start-up and task times grow with P) and checked
# against the larger half. --parent-dp both runs every P > 1 with the parent data-parallel and with it on rank 0;
# --pair-bound adds two independent one-rank runs of p1's work side by side, the ceiling of E(2) on this host;
# with either, a summary of the parent phase, E and the model's predictions (summary.txt).
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
  --parent-dp MODE      the parent of every run with P > 1: auto (default: as the config says, folder pP; auto trains
                        a conv net's parent data-parallel), on (pP-parent-dp, --set parallel.parent_data_parallel=true),
                        off (pP-parent-serial, =false: rank 0 trains it while the others compile, or train the
                        dense stability pairs), both (the two runs for every P; the summary sets them side by side)
  --parent-efficiency E the parent's parallel efficiency the model assumes to predict a checked run whose parent was
                        data-parallel (default 0.8: Conv-2's 0.805 over 2 ranks, once on this 2-core box,
                        docs/performance.md); the check prints the efficiency the run measured next to it
  --pair-bound          also two independent runs of p1's work (one rank, one thread each: needs --threads-per-rank 1)
                        started together side by side, pinned with taskset to two cores where taskset exists
                        (p1-pair-a, p1-pair-b, right after p1): E = t(p1) / max(t pair), what two busy cores of this
                        host allow two ranks with no communication at all, the ceiling of E(2) (pair_bound.txt)
  --force               delete run directories that already exist in DIR (default: refuse; a benchmark never resumes)
  --dry-run             print the commands and exit
  --config FILE, --set KEY=VALUE
                        passed to every run (shrink the work with them; do not set parallel.threads here)
  -h, --help            this text

environment: PYTHON (default .venv/bin/python), MPIRUN (default .venv/bin/mpirun), MPIRUN_ARGS (extra mpirun options)

layout of DIR: p1/, p2/, ..., pP-oversubscribed/, baseline-1proc-<cores>threads/ (run directories; with
  --parent-dp on/off/both pP-parent-dp/, pP-parent-serial/; with --pair-bound p1-pair-a/, p1-pair-b/),
  <run>.out (their output), walltimes.tsv (every run's wall time, the pair's included), analysis/ (python -m
  lthmpi.analysis: every run but the pair), efficiency.txt, model.txt and model.json (scaling model),
  model_calibrated.txt (with MPI runs beyond P = 1 at two or more P: calibrated on the smaller half of those P),
  pair_bound.txt (--pair-bound), summary.txt (with --parent-dp other than auto, or --pair-bound)
example (a tiny grid in ~1 min):
  run/$PROG --out /tmp/strong --set data.dataset=digits --set data.validation=200 --set train.epochs=2 \\
      --set 'prune.remaining=[0.5,0.2,0.1]' --set 'reset.points=["0ep","10it"]'
  the same with the parent both ways at P = 2 and the pair (~2 min): add --parent-dp both --pair-bound
  (digits is a Dense net: auto keeps its parent on rank 0; a conv net, e.g. --set model.name=conv2, is what
  data-parallel parents are for)
EOF
}

# shellcheck source=run/lib/bench.sh
source "$ROOT/run/lib/bench.sh"

bench_defaults
BASELINE=1 PARENT_DP=auto PARENT_E=0.8 PAIR=0
script_option() {
  SHIFT=0
  case "$1" in --parent-dp|--parent-efficiency) [ $# -ge 2 ] || die "$1 needs a value" ;; esac
  case "$1" in
    --no-baseline) BASELINE=0; SHIFT=1 ;;
    --parent-dp) PARENT_DP=$2; SHIFT=2 ;;
    --parent-efficiency) PARENT_E=$2; SHIFT=2 ;;
    --pair-bound) PAIR=1; SHIFT=1 ;;
  esac
}
bench_parse "$@"
bench_check_options
case "$PARENT_DP" in auto|on|off|both) ;; *) die "--parent-dp must be auto, on, off or both, not '$PARENT_DP'" ;; esac
awk -v e="$PARENT_E" 'BEGIN { exit !(e ~ /^([0-9]*[.])?[0-9]+$/ && e > 0 && e <= 1) }' ||
  die "--parent-efficiency must be a number in (0, 1], not '$PARENT_E'"
if [ "$PARENT_DP" != auto ]; then
  for a in "${PASS[@]}"; do
    case "$a" in *parallel.parent_data_parallel=*)
      die "do not pass parallel.parent_data_parallel with --parent-dp $PARENT_DP: the option sets it per run" ;;
    esac
  done
fi
[ "$PAIR" = 0 ] || [ "$THREADS" = 1 ] || die "--pair-bound needs --threads-per-rank 1 (two one-thread runs, one per core)"

bench_setup
bench_check_config "${PASS[@]}" > /dev/null || exit 2
[ "$PAIR" = 0 ] || [ "$CORES" -ge 2 ] || die "--pair-bound needs two cores, this host has $CORES"
bench_out strong

# The runs: name, ranks, threads per rank, launcher (mpi|serial|pair), the parent's setting (""|true|false),
# the core a pair run is pinned to ("" unpinned), and TOGETHER (bench_all: runs started side by side).
NAMES=() RANKS=() THR=() HOW=() PDP=() PIN=() TOGETHER=()
add() { NAMES+=("$1"); RANKS+=("$2"); THR+=("$3"); HOW+=("$4"); PDP+=("${5:-}"); PIN+=("${6:-}"); TOGETHER+=("${7:-}"); }
add_mpi() {  # P, name: the run(s) of P ranks that --parent-dp asks for
  case "$1:$PARENT_DP" in
    1:*|*:auto) add "$2" "$1" "$THREADS" mpi ;;
    *:on) add "$2-parent-dp" "$1" "$THREADS" mpi true ;;
    *:off) add "$2-parent-serial" "$1" "$THREADS" mpi false ;;
    *:both) add "$2-parent-dp" "$1" "$THREADS" mpi true; add "$2-parent-serial" "$1" "$THREADS" mpi false ;;
  esac
}
pair_cores() {  # the first two cores this process may run on (taskset -c), or nothing without taskset
  command -v taskset > /dev/null || return 0
  "$PY" -c 'import os; print(*sorted(os.sched_getaffinity(0))[:2])'
}
p=1
while [ "$p" -le "$MAX_RANKS" ]; do
  add_mpi "$p" "$(bench_name "$p" "$THREADS")"
  if [ "$p" = 1 ] && [ "$PAIR" = 1 ]; then
    read -r -a cores <<< "$(pair_cores)"
    add p1-pair-a 1 1 pair "" "${cores[0]:-}" pair
    add p1-pair-b 1 1 pair "" "${cores[1]:-}" pair
  fi
  p=$((p * 2))
done
if [ -n "$OVERSUB" ] && ! printf '%s\n' "${RANKS[@]}" | grep -qx "$OVERSUB"; then
  add_mpi "$OVERSUB" "p$OVERSUB-oversubscribed"
fi
[ "$BASELINE" = 1 ] && add "baseline-1proc-${CORES}threads" 1 "$CORES" serial

bench_fresh

command_for() {  # prints the command of run $1 (index), one argument per line
  local i=$1 dir="$OUT/${NAMES[$1]}"
  [ -z "${PIN[$i]}" ] || printf '%s\n' taskset -c "${PIN[$i]}"
  if [ "${HOW[$i]}" != serial ]; then  # a pair run is launched as p1 is
    printf '%s\n' "$MPIRUN" "${MPIRUN_EXTRA[@]}" -np "${RANKS[$i]}"
  fi
  printf '%s\n' "$PY" -m lthmpi.main --run-dir "$dir" --quiet --set "parallel.threads=${THR[$i]}" "${PASS[@]}"
  [ -z "${PDP[$i]}" ] || printf '%s\n' --set "parallel.parent_data_parallel=${PDP[$i]}"
}

walltime_row() { printf '%s\t%s\t%s\t%s\n' "${NAMES[$1]}" "${RANKS[$1]}" "${THR[$1]}" "$2"; }
opts="--max-ranks $MAX_RANKS ${OVERSUB:+--oversubscribe $OVERSUB }--threads-per-rank $THREADS --parent-dp $PARENT_DP"
[ "$PAIR" = 0 ] || opts+=" --pair-bound"
bench_all strong "$opts" \
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

DIRS=() CHECK=() PAIRS=()
for i in "${!NAMES[@]}"; do
  case "${HOW[$i]}" in
    pair) PAIRS+=("$i"); continue ;;  # the same work at P = 1 again: the ceiling below, not a point of the series
    mpi) [ "$i" -gt 0 ] && CHECK+=("$i") ;;
  esac
  DIRS+=("$OUT/${NAMES[$i]}")
done
dirs_of() { local i; for i in "$@"; do printf '%s\n' "$OUT/${NAMES[$i]}"; done; }

if [ ${#PAIRS[@]} -gt 0 ]; then  # the ceiling of E(2): two runs that never communicate, on two busy cores
  a=${PAIRS[0]} b=${PAIRS[1]}
  bound=$(awk -v r="$ref" -v x="${WALL[$a]}" -v y="${WALL[$b]}" 'BEGIN { printf "%.3f", r / (x > y ? x : y) }')
  where=""
  [ -z "${PIN[$a]}" ] || where=" (taskset: ${NAMES[$a]} on core ${PIN[$a]}, ${NAMES[$b]} on core ${PIN[$b]})"
  [ -n "$where" ] || where=" (not pinned: no taskset)"
  {
    echo "# two independent one-rank runs of p1's work, started together side by side$where,"
    echo "# against p1 alone; wall seconds, launch to exit. E_pair = t(p1) / max(t pair): the ceiling of E(2) here."
    printf '%s\t%s\n' "${NAMES[0]}" "$ref" "${NAMES[$a]}" "${WALL[$a]}" "${NAMES[$b]}" "${WALL[$b]}" E_pair "$bound"
  } > "$OUT/pair_bound.txt"
  echo
  echo "pair bound$where: E = t(p1) / max(t pair) = $ref / max(${WALL[$a]}, ${WALL[$b]}) = $bound" \
    "(the ceiling of E(2) on this host; $OUT/pair_bound.txt)"
fi

echo
echo "+ $PY -m lthmpi.analysis ${DIRS[*]} --out $OUT/analysis"
"$PY" -m lthmpi.analysis "${DIRS[@]}" --out "$OUT/analysis" | tee "$OUT/analysis.txt"

mapfile -t CHECK_DIRS < <(dirs_of "${CHECK[@]}")
if [ ${#CHECK[@]} -gt 0 ]; then  # E(P) on the training phase and on wall time, and the bound of the serial phases
  echo
  echo "+ $PY -m lthmpi.analysis efficiency $OUT/${NAMES[0]} ${CHECK_DIRS[*]}"
  "$PY" -m lthmpi.analysis efficiency "$OUT/${NAMES[0]}" "${CHECK_DIRS[@]}" | tee "$OUT/efficiency.txt"
  echo "(E_train = training phase at P = 1 / (P x at P); E_wall likewise on wall time; bound = the wall-time E that"
  echo " the run's own serial phases (start-up, parent, masks, gather, merge) allow with a perfect training phase)"
  # which checked runs trained their parent data-parallel (what auto resolved to is in their provenance)
  dp=$("$PY" - "${CHECK_DIRS[@]}" <<'PYEOF'
import sys
from lthmpi.analysis.scaling_measured import load_one, parent_dp_of
for path in sys.argv[1:]:
    print(int(parent_dp_of(load_one(path))))
PYEOF
)
  mapfile -t DP <<< "$dp"
fi
any_dp() { local k; for k in "$@"; do [ "${DP[$k]}" = 1 ] && return 0; done; return 1; }  # positions in CHECK

# The model's P: the measured ones, then doubling to 64 (what more ranks would give on this work).
ranks_list=$(printf '%s\n' "${RANKS[@]}" 1 2 4 8 16 32 64 | sort -n | uniq | paste -sd, -)
model=("$PY" -m lthmpi.analysis model "$OUT/${NAMES[0]}" --cores "$CORES" --ranks "$ranks_list")
if [ ${#CHECK[@]} -gt 0 ]; then
  model+=(--check "${CHECK_DIRS[@]}")
  # a run whose parent was data-parallel is predicted at an assumed parent efficiency (none of its own)
  any_dp "${!CHECK[@]}" && model+=(--parent-efficiency "$PARENT_E")
fi
echo
echo "+ ${model[*]}"
"${model[@]}" | tee "$OUT/model.txt"
"${model[@]}" --json > "$OUT/model.json"
done_files="walltimes.tsv, analysis/report.md, efficiency.txt, model.txt"

# Calibrated on the runs at the smaller half of the P beyond 1 (both runs of a P, with --parent-dp both),
# checked on the rest: honest predictions. A data-parallel parent among the calibration runs measures the
# parent's efficiency; else a checked one is predicted at --parent-efficiency.
mapfile -t PS < <(for i in "${CHECK[@]}"; do echo "${RANKS[$i]}"; done | sort -n | uniq)
if [ ${#PS[@]} -ge 2 ]; then
  cut=${PS[$(( ${#PS[@]} / 2 - 1 ))]}
  CAL=() CHK=() cal_k=() chk_k=()
  for k in "${!CHECK[@]}"; do
    i=${CHECK[$k]}
    if [ "${RANKS[$i]}" -le "$cut" ]; then CAL+=("$OUT/${NAMES[$i]}"); cal_k+=("$k"); else CHK+=("$OUT/${NAMES[$i]}"); chk_k+=("$k"); fi
  done
  model=("$PY" -m lthmpi.analysis model "$OUT/${NAMES[0]}" --cores "$CORES" --ranks "$ranks_list"
         --calibrate "${CAL[@]}" --check "${CHK[@]}")
  ! any_dp "${chk_k[@]}" || any_dp "${cal_k[@]}" || model+=(--parent-efficiency "$PARENT_E")
  echo
  echo "+ ${model[*]}"
  "${model[@]}" | tee "$OUT/model_calibrated.txt"
  done_files+=", model_calibrated.txt"
fi

if [ ${#PAIRS[@]} -gt 0 ] || [ "$PARENT_DP" != auto ]; then  # the parent phase both ways, E(P), the ceiling, the model
  summary=("$PY" "$ROOT/run/strong_summary.py" --walltimes "$OUT/walltimes.tsv" --model "$OUT/model.json"
           --p1 "$OUT/${NAMES[0]}")
  [ ${#PAIRS[@]} -eq 0 ] || summary+=(--pair "$OUT/${NAMES[${PAIRS[0]}]}" "$OUT/${NAMES[${PAIRS[1]}]}")
  summary+=("${CHECK_DIRS[@]}")
  echo
  echo "+ ${summary[*]}"
  "${summary[@]}" | tee "$OUT/summary.txt"
  done_files+=", summary.txt"
  [ ${#PAIRS[@]} -eq 0 ] || done_files+=", pair_bound.txt"
fi
echo
echo "$PROG: done: $OUT ($done_files)"
