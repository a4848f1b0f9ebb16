#!/usr/bin/env bash
# Set up ./.venv and run ruff, mypy and the test suite (slow tests included; add -m "not slow"
# to skip them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${FASTSKIP_VENV:-.venv}/bin/python" -m ruff check fastskip kernels tests bench
"${FASTSKIP_VENV:-.venv}/bin/python" -m mypy
"${FASTSKIP_VENV:-.venv}/bin/python" -m pytest -q "$@"
