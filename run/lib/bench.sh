# Shared by run/strong_scaling.sh and run/weak_scaling.sh (sourced; expects ROOT, PROG and usage()).

die() { echo "$PROG: error: $*" >&2; exit 2; }

# bench_run NAME CMD...: run one benchmark run, output to $OUT/NAME.out, command logged to benchmark.txt;
# sets BENCH_WALL to its wall time in seconds (launch to exit). A failing run ends the benchmark.
bench_run() {
  local name=$1 t0 t1
  shift
  echo "+ $(printf '%q ' "$@")" | tee -a "$OUT/benchmark.txt"
  t0=$(date +%s.%N)
  if ! "$@" > "$OUT/$name.out" 2>&1; then
    tail -n 20 "$OUT/$name.out" >&2
    die "run $name failed (output in $OUT/$name.out)"
  fi
  t1=$(date +%s.%N)
  BENCH_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
}

# bench_together I...: runs NAMES[I...] (command_for I) at the same moment, side by side, each with its own
# output ($OUT/NAME.out) and wall time (launch to exit, as bench_run); sets BENCH_WALLS, one per run, in order.
# A failing run ends the benchmark once all have ended.
bench_together() {
  local i cmd rc t0 t1 failed="" pids=()
  for i in "$@"; do
    mapfile -t cmd < <(command_for "$i")
    echo "+ $(printf '%q ' "${cmd[@]}")&" | tee -a "$OUT/benchmark.txt"
  done
  for i in "$@"; do
    ( mapfile -t cmd < <(command_for "$i")
      t0=$(date +%s.%N) rc=0
      "${cmd[@]}" > "$OUT/${NAMES[$i]}.out" 2>&1 || rc=$?
      echo "$rc $t0 $(date +%s.%N)" > "$OUT/.${NAMES[$i]}.wall" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  BENCH_WALLS=()
  for i in "$@"; do
    read -r rc t0 t1 < "$OUT/.${NAMES[$i]}.wall"
    rm -f -- "$OUT/.${NAMES[$i]}.wall"
    if [ "$rc" != 0 ]; then tail -n 20 "$OUT/${NAMES[$i]}.out" >&2; failed+=" ${NAMES[$i]}"; fi
    BENCH_WALLS+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')")
  done
  [ -z "$failed" ] || die "run(s)$failed failed (output in $OUT/<run>.out)"
}

# bench_setup: PY, MPIRUN (+ MPIRUN_EXTRA from $MPIRUN_ARGS) and CORES, refusing missing tools.
bench_setup() {
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  MPIRUN=${MPIRUN:-$ROOT/.venv/bin/mpirun}
  read -r -a MPIRUN_EXTRA <<< "${MPIRUN_ARGS:-}"
  [ -x "$PY" ] || command -v "$PY" >/dev/null || die "no Python at $PY (run run/setup.sh, or set PYTHON)"
  [ -x "$MPIRUN" ] || command -v "$MPIRUN" >/dev/null || die "no mpirun at $MPIRUN (run run/setup.sh, or set MPIRUN)"
  CORES=$(nproc)
}

# bench_check_config ARGS...: refuse a wrong --config/--set before any run starts (no TensorFlow import:
# a second); prints "quantiles" when the resolved config prunes by prune.quantiles.
bench_check_config() {
  "$PY" - "$@" <<'PYEOF' || die "the experiment's options are refused (above)"
import sys
from lthmpi.config import ConfigError
from lthmpi.validation import resolve
from lthmpi.main import parser
args = parser().parse_args(["--run-dir", "unused", *sys.argv[1:]])
try:
    cfg = resolve(args.config, args.sets)
except ConfigError as e:
    sys.exit(f"lthmpi: error: {e}")
print("quantiles" if cfg.prune.quantiles else "")
PYEOF
}

# bench_out KIND: the benchmark folder, $OUT or runs/KIND-<date>-<time>, made absolute (not in a dry run).
bench_out() {
  OUT=${OUT:-$ROOT/runs/$1-$(date +%Y%m%d-%H%M%S)}
  if [ "$DRY" = 0 ]; then
    mkdir -p "$OUT" || die "cannot create $OUT"
    OUT=$(cd "$OUT" && pwd)
  fi
}

# Options both scripts take. bench_defaults sets them; bench_option "$@" consumes one from the front of
# the arguments and sets SHIFT to the words it used (0: not one of these, the script handles it).
bench_defaults() { MAX_RANKS=2 OVERSUB="" THREADS=1 OUT="" FORCE=0 DRY=0; PASS=(); }
bench_option() {
  SHIFT=0
  case "$1" in
    --max-ranks|--oversubscribe|--threads-per-rank|--out|--set|--config)
      [ $# -ge 2 ] || die "$1 needs a $([ "$1" = --out ] && echo directory || echo value)" ;;
  esac
  case "$1" in
    --max-ranks) MAX_RANKS=$2; SHIFT=2 ;;
    --oversubscribe) OVERSUB=$2; SHIFT=2 ;;
    --threads-per-rank) THREADS=$2; SHIFT=2 ;;
    --out) OUT=$2; SHIFT=2 ;;
    --force) FORCE=1; SHIFT=1 ;;
    --dry-run) DRY=1; SHIFT=1 ;;
    --set|--config) PASS+=("$1" "$2"); SHIFT=2 ;;
    --set=*|--config=*) PASS+=("$1"); SHIFT=1 ;;
  esac
}

isint() { [[ $1 =~ ^[0-9]+$ ]]; }

# bench_parse ARGS...: the command line. The shared options (bench_option), the script's own (a function
# script_option that the script defines: it sets SHIFT to the words it took, 0 if none), -h/--help (usage),
# -- (the rest goes to lthmpi.main); anything else is refused.
bench_parse() {
  while [ $# -gt 0 ]; do
    bench_option "$@"
    [ "$SHIFT" -gt 0 ] || script_option "$@"
    if [ "$SHIFT" -gt 0 ]; then shift "$SHIFT"; continue; fi
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --) shift; PASS+=("$@"); break ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
}

# bench_check_options: the shared options are numbers in range.
bench_check_options() {
  isint "$MAX_RANKS" && [ "$MAX_RANKS" -ge 1 ] || die "--max-ranks must be an integer >= 1, not '$MAX_RANKS'"
  [ -z "$OVERSUB" ] || { isint "$OVERSUB" && [ "$OVERSUB" -ge 2 ]; } ||
    die "--oversubscribe must be an integer >= 2, not '$OVERSUB'"
  isint "$THREADS" || die "--threads-per-rank must be an integer >= 0, not '$THREADS'"
}

# bench_name P T: p<P>, with -oversubscribed when P ranks of T threads exceed the cores.
bench_name() {
  local t=$2; [ "$t" -gt 0 ] || t=1
  if [ $(( $1 * t )) -gt "$CORES" ]; then echo "p$1-oversubscribed"; else echo "p$1"; fi
}

# bench_fresh: a benchmark never resumes, so every run directory in NAMES must be new (or go, with --force).
bench_fresh() {
  local n
  for n in "${NAMES[@]}"; do
    [ -e "$OUT/$n" ] || continue
    [ "$FORCE" = 1 ] || die "$OUT/$n already exists; a benchmark does not resume: choose another --out or pass --force"
    [ "$DRY" = 1 ] || rm -rf -- "${OUT:?}/$n"
  done
}

# bench_all KIND OPTIONS TSV_HEADER: print the commands and exit in a dry run; else run NAMES[i] with
# command_for i (the script's), appending walltime_row i WALL to walltimes.tsv; fills WALL. Runs whose
# TOGETHER[i] (optional) holds the same word are one group, started together side by side (bench_together)
# where its first member comes in the order.
bench_all() {
  local i j cmd k
  local -a group
  if [ "$DRY" = 1 ]; then
    for i in "${!NAMES[@]}"; do
      mapfile -t cmd < <(command_for "$i")
      if [ -n "${TOGETHER[$i]:-}" ]; then echo "+ $(printf '%q ' "${cmd[@]}")&"; else echo "+ $(printf '%q ' "${cmd[@]}")"; fi
    done
    exit 0
  fi
  {
    echo "# $1 scaling benchmark, $(date -Is), $(hostname), $CORES cores, git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# run/$PROG $2${PASS[*]:+ $(printf '%q ' "${PASS[@]}")}"
  } > "$OUT/benchmark.txt"
  printf '%s\n' "$3" > "$OUT/walltimes.tsv"
  echo "$PROG: ${#NAMES[@]} runs into $OUT ($CORES cores): ${NAMES[*]}"
  WALL=()
  for i in "${!NAMES[@]}"; do
    [ -z "${WALL[$i]:-}" ] || continue  # ran in its group
    if [ -n "${TOGETHER[$i]:-}" ]; then
      group=()
      for j in "${!NAMES[@]}"; do [ "${TOGETHER[$j]:-}" != "${TOGETHER[$i]}" ] || group+=("$j"); done
      echo "$PROG: side by side, started together:$(for j in "${group[@]}"; do printf ' %s' "${NAMES[$j]}"; done)"
      bench_together "${group[@]}"
      for k in "${!group[@]}"; do
        j=${group[$k]}
        WALL[$j]=${BENCH_WALLS[$k]}
        walltime_row "$j" "${WALL[$j]}" >> "$OUT/walltimes.tsv"
        echo "$PROG: ${NAMES[$j]}: P = ${RANKS[$j]}: wall ${WALL[$j]} s (side by side)"
      done
      continue
    fi
    mapfile -t cmd < <(command_for "$i")
    bench_run "${NAMES[$i]}" "${cmd[@]}"
    WALL[$i]=$BENCH_WALL
    walltime_row "$i" "$BENCH_WALL" >> "$OUT/walltimes.tsv"
    echo "$PROG: ${NAMES[$i]}: P = ${RANKS[$i]}: wall $BENCH_WALL s"
  done
}
