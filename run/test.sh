#!/usr/bin/env bash
# The whole test suite, after making sure the environment is set up.
set -euo pipefail
cd "$(dirname "$0")/.."
./run/setup.sh
exec .venv/bin/python -m pytest -q "$@"
