#!/usr/bin/env bash
# Idempotent set-up: .venv with lthmpi and its pinned dependencies, and Fashion-MNIST where apt can get it.
# Re-running is cheap: the install is skipped while setup.cfg and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LTHMPI_VENV:-.venv}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: error: Python >= 3.10 is needed ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
  exit 1
fi

stamp="$VENV/.lthmpi-setup"
want=$(cat setup.cfg pyproject.toml run/constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: $VENV is up to date"
else
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || { echo "setup: error: cannot create $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  fi
  log="$VENV/setup.log"
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
         "$VENV/bin/python" -m pip install -q -c run/constraints.txt -e ".[local-mpi,test]"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup: error: pip could not install the dependencies (full log: $log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo "setup: installed lthmpi and its dependencies into $VENV"
fi

# Fashion-MNIST, the default dataset: Debian's dataset-fashion-mnist (IDX files, Expat licence).
FMNIST=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || [ -n "${LTHMPI_DATA_DIR:-}" ]; then
  :
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) &&
    echo "setup: installed Fashion-MNIST into $FMNIST" ||
    echo "setup: warning: could not install dataset-fashion-mnist with apt; put the four IDX files in a directory and set LTHMPI_DATA_DIR" >&2
else
  echo "setup: note: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist' or set LTHMPI_DATA_DIR to a directory with the four IDX files" >&2
fi

# The sparse kernels (lthmpi/sparse_mlp.c, for masks keeping few weights) are compiled for this CPU with the
# host's C compiler on first use and cached; build them now so that a missing compiler shows here.
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null && ! command -v clang >/dev/null && [ -z "${CC:-}" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q gcc libc6-dev >/dev/null 2>&1 ||
     { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q gcc libc6-dev >/dev/null 2>&1; }) &&
      echo "setup: installed gcc (for the sparse kernels)" || true
  fi
fi
if ! err=$("$VENV/bin/python" -m lthmpi.sparse 2>&1 >/dev/null); then
  echo "setup: warning: ${err:-the sparse kernels could not be built}; masks keeping few weights will train on the slower dense kernels (install a C compiler, e.g. 'apt-get install gcc')" >&2
fi
