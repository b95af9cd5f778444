# Shared by run/strong_scaling.sh and run/weak_scaling.sh (sourced; expects OUT and die()).

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
from lthmpi.config import ConfigError, resolve
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
