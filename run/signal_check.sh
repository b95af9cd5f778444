#!/usr/bin/env bash
# SIGTERM a tiny conv-net run (model.name=conv2 on digits, one process) mid-task N times, and print one row per
# try: its exit status (143 expected), how many task files were on disk when the signal came (mid-run, not at
# the start or end), and whether its stderr shows a crash (glibc "corrupted ...", "double free", Aborted,
# Segmentation fault). Issue 31: one such run once printed "corrupted size vs. prev_size" on its way out.
#
#   run/signal_check.sh [N=10]        exit 0 when every try exited 143 with a clean stderr, 1 otherwise
#
# The first try makes the parent and the masks; each try deletes the task files and resumes, and is killed
# while training tasks (once its first task file appears, plus a delay that varies per try).
set -u
N=${1:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lthmpi-signal.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RUN="$WORK/run"
CMD=("$PY" -m lthmpi.main --run-dir "$RUN" --quiet --set model.name=conv2 --set data.dataset=digits
     --set data.validation=200 --set train.epochs=2 --set train.batch_size=64 --set train.eval_every=1ep
     --set 'prune.remaining=[0.5, 0.2]' --set 'reset.points=["0ep", "1ep"]' --set 'reset.controls=["random_reinit"]'
     --set parallel.threads=1)
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CRASH='corrupted|double free|Aborted|Segmentation'

printf '%-4s %-7s %-11s %s\n' try status "tasks done" stderr
bad=0
for i in $(seq 1 "$N"); do
  rm -rf "$RUN/tasks" "$RUN/results.h5"
  [ -e "$RUN/masks.h5" ] || rm -rf "$RUN"  # a first try killed before its masks: start afresh
  "${CMD[@]}" >/dev/null 2>"$WORK/err$i" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ -z "$(ls "$RUN/tasks" 2>/dev/null | grep '\.h5$')" ]; do sleep 0.05; done
  sleep "0.$(( (i * 37) % 10 ))"  # somewhere in the next task
  done_now=$(ls "$RUN/tasks" 2>/dev/null | grep -c '\.h5$')
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"; rc=$?
  if grep -Eq "$CRASH" "$WORK/err$i"; then what="CRASH: $(grep -Em1 "$CRASH" "$WORK/err$i")"; else what=clean; fi
  [ "$rc" = 143 ] && [ "$what" = clean ] || bad=1
  printf '%-4s %-7s %-11s %s\n' "$i" "$rc" "$done_now of 8" "$what"
done
exit $bad
