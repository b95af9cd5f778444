#!/usr/bin/env bash
# Weak scaling: work proportional to P. Each rank gets K masks (x N reset points x controls): the run on
# P ranks prunes M = K*P masks at 0.8^1 ... 0.8^(K*P) of the weights left. P = 1, 2, 4, ... (doubling up to
# --max-ranks), optionally an oversubscribed P, each in a fresh run directory under one benchmark folder.
# Prints the wall time of every run, then the weak-scaling analysis (scaled speed-up, Gustafson).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=weak_scaling.sh

usage() {
  cat <<EOF
usage: run/$PROG [options] [--config FILE] [--set KEY=VALUE ...] [-- more lthmpi.main arguments]

Runs the experiment with M = K x P masks (prune.remaining = 0.8^1 ... 0.8^(K P)) on P = 1, 2, 4, ...
MPI ranks, so that every rank has the same work; each run in its own fresh run directory.

options:
  --masks-per-rank K    masks per rank (default 2); each mask brings its N reset points and controls
  --max-ranks N         largest P of the doubling series 1, 2, 4, ... (default 2)
  --oversubscribe P     also run P ranks even where P x threads exceeds the cores (folder pP-oversubscribed)
  --threads-per-rank T  TensorFlow threads per rank (default 1: one rank per core; 0 = automatic)
  --out DIR             benchmark folder (default runs/weak-<date>-<time> in the repository)
  --force               delete run directories that already exist in DIR (default: refuse; a benchmark never resumes)
  --dry-run             print the commands and exit
  --config FILE, --set KEY=VALUE
                        passed to every run (not prune.remaining / prune.quantiles: this script sets the masks;
                        not parallel.threads: use --threads-per-rank)
  -h, --help            this text

environment: PYTHON (default .venv/bin/python), MPIRUN (default .venv/bin/mpirun), MPIRUN_ARGS (extra mpirun options)

layout of DIR: p1/, p2/, ..., pP-oversubscribed/ (run directories), <run>.out (their output), walltimes.tsv,
  analysis/ (python -m lthmpi.analysis --weak)
example (a tiny grid in ~1 min):
  run/$PROG --out /tmp/weak --masks-per-rank 1 --set data.dataset=digits --set data.validation=200 \\
      --set train.epochs=2 --set 'reset.points=["0ep","10it"]'
EOF
}

# shellcheck source=run/lib/bench.sh
source "$ROOT/run/lib/bench.sh"

bench_defaults
K=2
script_option() {
  SHIFT=0
  case "$1" in --masks-per-rank) [ $# -ge 2 ] || die "--masks-per-rank needs a value"; K=$2; SHIFT=2 ;; esac
}
bench_parse "$@"
isint "$K" && [ "$K" -ge 1 ] || die "--masks-per-rank must be an integer >= 1, not '$K'"
bench_check_options
for a in "${PASS[@]}"; do
  case "$a" in
    prune.remaining=*|prune.quantiles=*|--set=prune.remaining=*|--set=prune.quantiles=*)
      die "do not pass ${a%%=*}: this script sets the masks (K x P of them); use --masks-per-rank" ;;
  esac
done

bench_setup
quantiles=$(bench_check_config "${PASS[@]}") || exit 2
[ "$quantiles" != quantiles ] || die "the config sets prune.quantiles; weak scaling sets the masks through prune.remaining"
bench_out weak

remaining() {  # TOML array 0.8^1 ... 0.8^n
  awk -v n="$1" 'BEGIN { s = "["; for (k = 1; k <= n; k++) s = s (k > 1 ? ", " : "") sprintf("%.10g", 0.8 ^ k); print s "]" }'
}

NAMES=() RANKS=()
p=1
while [ "$p" -le "$MAX_RANKS" ]; do NAMES+=("$(bench_name "$p" "$THREADS")"); RANKS+=("$p"); p=$((p * 2)); done
if [ -n "$OVERSUB" ] && ! printf '%s\n' "${RANKS[@]}" | grep -qx "$OVERSUB"; then
  NAMES+=("p$OVERSUB-oversubscribed"); RANKS+=("$OVERSUB")
fi

bench_fresh

command_for() {  # the command of run $1 (index), one argument per line
  local i=$1
  printf '%s\n' "$MPIRUN" "${MPIRUN_EXTRA[@]}" -np "${RANKS[$i]}" \
    "$PY" -m lthmpi.main --run-dir "$OUT/${NAMES[$i]}" --quiet --set "parallel.threads=$THREADS" \
    --set "prune.remaining=$(remaining $((K * RANKS[$i])))" "${PASS[@]}"
}

walltime_row() { printf '%s\t%s\t%s\t%s\t%s\n' "${NAMES[$1]}" "${RANKS[$1]}" $((K * RANKS[$1])) "$THREADS" "$2"; }
bench_all weak "--masks-per-rank $K --max-ranks $MAX_RANKS ${OVERSUB:+--oversubscribe $OVERSUB }--threads-per-rank $THREADS" \
  "$(printf 'run\tranks\tmasks\tthreads_per_rank\twall_seconds')"
echo
echo "wall time (seconds, launch to exit; weak efficiency T(1) / T(P): 1.00 is perfect weak scaling):"
printf '%-28s %5s %6s %10s %8s\n' run P masks wall_s T1/TP
for i in "${!NAMES[@]}"; do
  awk -v n="${NAMES[$i]}" -v p="${RANKS[$i]}" -v m=$((K * RANKS[i])) -v w="${WALL[$i]}" -v r="${WALL[0]}" \
    'BEGIN { printf "%-28s %5d %6d %10.2f %8.2f\n", n, p, m, w, r / w }'
done

DIRS=()
for n in "${NAMES[@]}"; do DIRS+=("$OUT/$n"); done
echo
echo "+ $PY -m lthmpi.analysis --weak ${DIRS[*]} --out $OUT/analysis"
"$PY" -m lthmpi.analysis --weak "${DIRS[@]}" --out "$OUT/analysis" | tee "$OUT/analysis.txt"
echo
echo "$PROG: done: $OUT (walltimes.tsv, analysis/report.md)"
