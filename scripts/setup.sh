#!/usr/bin/env bash
# Creates .venv with the right PyTorch build for this machine, then this package.
# CUDA build where an NVIDIA GPU answers, CPU build everywhere else (no multi-GB download).
# pip's own output goes to .venv/setup.log (shown only when a step fails), so the terminal
# shows what the job prints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
LOG=.venv/setup.log
: > "$LOG"
quiet() {
  if ! "$@" >>"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "set-up failed: $* (full log: $LOG)" >&2
    exit 1
  fi
}
quiet python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  quiet python -m pip install -q "torch==2.13.0"
else
  quiet python -m pip install -q --retries 0 --timeout 10 "torch==2.13.0" \
    --extra-index-url https://download.pytorch.org/whl/cpu
fi
quiet python -m pip install -q -e ".[dev,notebooks]"
python -m ipykernel install --user --name selfcorrect >/dev/null 2>&1 || true
echo "set-up done: $(python -c 'import torch; print("torch", torch.__version__)') (pip's log: $LOG)"
