#!/usr/bin/env bash
# The whole test suite, after making sure the environment is set up.
# It runs on pytest-xdist workers, one more than the cores up to 4 (LTHMPI_TEST_WORKERS=N to choose, 0 for one
# process): most tests train on one TensorFlow thread or wait on subprocesses and Slurm, and with one worker per
# core the 2 cores were idle a fifth of the time; a third worker fills that (docs/testing.md). Each test module
# stays on one worker (--dist loadscope): its shared tiny run is made once.
# Extra arguments go to pytest: ./run/test.sh tests/test_imp.py -k chain; ./run/test.sh -m "battery or not battery"
# runs the slow variants too.
set -euo pipefail
cd "$(dirname "$0")/.."
./run/setup.sh
cores=$(nproc 2>/dev/null || echo 2)
workers=${LTHMPI_TEST_WORKERS:-$(( cores < 3 ? cores + 1 : 4 ))}
case "$workers" in ''|*[!0-9]*) echo "test.sh: error: LTHMPI_TEST_WORKERS must be a whole number (0 = no workers), not '$workers'" >&2; exit 2;; esac
xdist=()
# --no-loadscope-reorder: xdist would hand out the modules with the most tests first (test_data's 34 quick ones),
# not the longest: tests/conftest.py orders them by measured time instead.
[ "$workers" -gt 1 ] && xdist=(-n "$workers" --dist loadscope --no-loadscope-reorder)
exec .venv/bin/python -m pytest -q ${xdist[@]+"${xdist[@]}"} "$@"
