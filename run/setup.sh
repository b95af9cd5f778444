#!/usr/bin/env bash
# Idempotent set-up: .venv with lthmpi and its pinned dependencies, and Fashion-MNIST where apt can get it.
# Re-running is cheap: the install is skipped while setup.cfg, the constraints and LTHMPI_DEVICE are unchanged.
# LTHMPI_DEVICE=cpu (default) installs tensorflow-cpu; LTHMPI_DEVICE=gpu the CUDA build of the same TensorFlow
# (tensorflow[and-cuda]) instead, removing the other build first: the two never share one environment.
# LTHMPI_SETUP_DRY_RUN=1 prints the install commands instead of running them, and stops there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LTHMPI_VENV:-.venv}
DEVICE=${LTHMPI_DEVICE:-cpu}
DRY=${LTHMPI_SETUP_DRY_RUN:-}

case "$DEVICE" in
  cpu) extra=cpu; other=$([ "$(uname -m)" = x86_64 ] && echo tensorflow || true) ;;  # elsewhere [cpu] is tensorflow
  gpu) extra=gpu; other=tensorflow-cpu ;;
  *) echo "setup: error: LTHMPI_DEVICE=$DEVICE is unknown: use cpu (the default) or gpu (an NVIDIA GPU)" >&2; exit 2 ;;
esac
run() { if [ -n "$DRY" ]; then echo "+ $*"; else "$@"; fi; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: error: Python >= 3.10 is needed ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
  exit 1
fi

if [ "$DEVICE" = gpu ] && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "setup: note: no NVIDIA GPU or driver found (nvidia-smi missing or failing): installing the CUDA build anyway; lthmpi trains on the CPU here with parallel.device = \"auto\" and refuses parallel.device = \"gpu\"" >&2
fi

stamp="$VENV/.lthmpi-setup"
want=$({ cat setup.cfg pyproject.toml run/constraints.txt; echo "device=$DEVICE"; } | sha256sum | cut -d' ' -f1)
if [ -z "$DRY" ] && [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: $VENV is up to date ($DEVICE build of TensorFlow)"
else
  if [ ! -x "$VENV/bin/python" ]; then
    run "$PYTHON" -m venv "$VENV" || { echo "setup: error: cannot create $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  fi
  log="$VENV/setup.log"
  pip=("$VENV/bin/python" -m pip)
  has_other() { [ -n "$other" ] && [ -z "$DRY" ] && "${pip[@]}" show -q "$other" >/dev/null 2>&1; }
  if [ -n "$DRY" ]; then
    [ -n "$other" ] && echo "+ ${pip[*]} uninstall -y -q $other  (only where it is installed)"
    run "${pip[@]}" install -q -c run/constraints.txt -e ".[$extra,local-mpi,test]"
    exit 0
  fi
  if ! { "${pip[@]}" install -q --upgrade pip &&
         { ! has_other || "${pip[@]}" uninstall -y -q "$other"; } &&
         "${pip[@]}" install -q -c run/constraints.txt -e ".[$extra,local-mpi,test]"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup: error: pip could not install the dependencies (full log: $log)" >&2
    exit 1
  fi
  if has_other; then
    echo "setup: error: both tensorflow and tensorflow-cpu are installed in $VENV; remove it and rerun" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo "setup: installed lthmpi and its dependencies ($DEVICE build of TensorFlow) into $VENV"
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
# clang too (as root): the tests build the sparse kernels with it and with both compilers' sanitizers.
if ! command -v clang >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q clang >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q clang >/dev/null 2>&1; }) &&
    echo "setup: installed clang (the sparse kernels are tested with gcc and clang)" ||
    echo "setup: warning: could not install clang with apt; the clang and sanitizer tests of the sparse kernels will fail" >&2
fi
# Slurm and munge (as root): tests/test_slurm.py runs the batch scripts on a private one-node cluster
# (run/slurm/local_cluster.sh), which starts daemons of its own (own config, munge key and socket) and never uses
# the system's, whether or not the package's services run.
if ! { command -v slurmctld || [ -x /usr/sbin/slurmctld ]; } >/dev/null || ! { command -v munged || [ -x /usr/sbin/munged ]; } >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt_slurm() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 slurm-wlm munge >/dev/null 2>&1; }
    (apt_slurm || { apt-get update -q >/dev/null 2>&1 && apt_slurm; }) &&
      echo "setup: installed Slurm ($(/usr/sbin/slurmctld -V 2>/dev/null)) and munge (for the Slurm tests, run/slurm/local_cluster.sh)" ||
      echo "setup: warning: could not install slurm-wlm and munge with apt; the Slurm tests (tests/test_slurm.py) will fail" >&2
  else
    echo "setup: note: Slurm is not installed; the Slurm tests (tests/test_slurm.py) are skipped (as root, this script installs slurm-wlm and munge)" >&2
  fi
fi
if ! err=$("$VENV/bin/python" -m lthmpi.sparse 2>&1 >/dev/null); then
  echo "setup: warning: ${err:-the sparse kernels could not be built}; masks keeping few weights will train on the slower dense kernels (install a C compiler, e.g. 'apt-get install gcc')" >&2
fi
