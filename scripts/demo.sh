#!/usr/bin/env bash
# Set up ./.venv and run the main job: the notebook's plans on the notebook's prompts.
# Extra arguments go to `fastskip demo` (e.g. --model gpt2-small).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${FASTSKIP_VENV:-.venv}/bin/fastskip" demo "$@"
