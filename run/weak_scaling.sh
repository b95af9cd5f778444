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

die() { echo "$PROG: error: $*" >&2; exit 2; }
# shellcheck source=run/lib/bench.sh
source "$ROOT/run/lib/bench.sh"

K=2 MAX_RANKS=2 OVERSUB="" THREADS=1 OUT="" FORCE=0 DRY=0
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --masks-per-rank) [ $# -ge 2 ] || die "--masks-per-rank needs a value"; K=$2; shift 2 ;;
    --max-ranks) [ $# -ge 2 ] || die "--max-ranks needs a value"; MAX_RANKS=$2; shift 2 ;;
    --oversubscribe) [ $# -ge 2 ] || die "--oversubscribe needs a value"; OVERSUB=$2; shift 2 ;;
    --threads-per-rank) [ $# -ge 2 ] || die "--threads-per-rank needs a value"; THREADS=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --set|--config) [ $# -ge 2 ] || die "$1 needs a value"; PASS+=("$1" "$2"); shift 2 ;;
    --set=*|--config=*) PASS+=("$1"); shift ;;
    --) shift; PASS+=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

isint() { [[ $1 =~ ^[0-9]+$ ]]; }
isint "$K" && [ "$K" -ge 1 ] || die "--masks-per-rank must be an integer >= 1, not '$K'"
isint "$MAX_RANKS" && [ "$MAX_RANKS" -ge 1 ] || die "--max-ranks must be an integer >= 1, not '$MAX_RANKS'"
[ -z "$OVERSUB" ] || { isint "$OVERSUB" && [ "$OVERSUB" -ge 2 ]; } || die "--oversubscribe must be an integer >= 2, not '$OVERSUB'"
isint "$THREADS" || die "--threads-per-rank must be an integer >= 0, not '$THREADS'"
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
name_for() {
  local t=$THREADS; [ "$t" -gt 0 ] || t=1
  if [ $(( $1 * t )) -gt "$CORES" ]; then echo "p$1-oversubscribed"; else echo "p$1"; fi
}
p=1
while [ "$p" -le "$MAX_RANKS" ]; do NAMES+=("$(name_for "$p")"); RANKS+=("$p"); p=$((p * 2)); done
if [ -n "$OVERSUB" ] && ! printf '%s\n' "${RANKS[@]}" | grep -qx "$OVERSUB"; then
  NAMES+=("p$OVERSUB-oversubscribed"); RANKS+=("$OVERSUB")
fi

for n in "${NAMES[@]}"; do
  if [ -e "$OUT/$n" ]; then
    if [ "$FORCE" = 1 ]; then
      [ "$DRY" = 1 ] || rm -rf -- "${OUT:?}/$n"
    else
      die "$OUT/$n already exists; a benchmark does not resume: choose another --out or pass --force"
    fi
  fi
done

command_for() {  # the command of run $1 (index), one argument per line
  local i=$1
  printf '%s\n' "$MPIRUN" "${MPIRUN_EXTRA[@]}" -np "${RANKS[$i]}" \
    "$PY" -m lthmpi.main --run-dir "$OUT/${NAMES[$i]}" --quiet --set "parallel.threads=$THREADS" \
    --set "prune.remaining=$(remaining $((K * RANKS[$i])))" "${PASS[@]}"
}

if [ "$DRY" = 1 ]; then
  for i in "${!NAMES[@]}"; do mapfile -t cmd < <(command_for "$i"); echo "+ $(printf '%q ' "${cmd[@]}")"; done
  exit 0
fi
{
  echo "# weak scaling benchmark, $(date -Is), $(hostname), $CORES cores, git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "# run/$PROG --masks-per-rank $K --max-ranks $MAX_RANKS ${OVERSUB:+--oversubscribe $OVERSUB }--threads-per-rank $THREADS $(printf '%q ' "${PASS[@]}")"
} > "$OUT/benchmark.txt"
printf 'run\tranks\tmasks\tthreads_per_rank\twall_seconds\n' > "$OUT/walltimes.tsv"

echo "$PROG: ${#NAMES[@]} runs into $OUT ($CORES cores, $K masks per rank): ${NAMES[*]}"
WALL=()
for i in "${!NAMES[@]}"; do
  mapfile -t cmd < <(command_for "$i")
  bench_run "${NAMES[$i]}" "${cmd[@]}"
  w=$BENCH_WALL
  WALL+=("$w")
  printf '%s\t%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${RANKS[$i]}" $((K * RANKS[i])) "$THREADS" "$w" >> "$OUT/walltimes.tsv"
  echo "$PROG: ${NAMES[$i]}: P = ${RANKS[$i]}, M = $((K * RANKS[i])) masks: wall ${w} s"
done

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
