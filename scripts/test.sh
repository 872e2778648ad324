#!/usr/bin/env bash
# The test suite: the fast unit tier, then the integration tier (real local Ray jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 "$@"
.venv/bin/python -m pytest -q -p no:cacheprovider -m integration --timeout 1200 --durations=15 "$@"
