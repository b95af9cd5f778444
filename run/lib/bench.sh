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
