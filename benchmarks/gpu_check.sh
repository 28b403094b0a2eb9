#!/usr/bin/env bash
# The GPU check on a bare machine without network: the checkout's dgplug package on PYTHONPATH.
# The device image has no gguf-py: copy gguf and yaml from a venv's site-packages into .gpu_deps/ first.
#   bash benchmarks/gpu_check.sh --budget 300                      # on a GPU (default budget 230 s)
#   TRITON_INTERPRET=1 bash benchmarks/gpu_check.sh --small        # smoke run on a CPU (~4-5 min)
# Exits 1 when a section failed (its traceback is in the log), 0 otherwise. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
# on the device machine $OUT comes back: the whole log goes there as it is written (the reply
# carries only the last 12,000 characters, and a run cut at its time limit still returns $OUT)
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
# the checkout's venv where there is one (README setup), else the machine's python3 (the device image)
PY="${PYTHON:-}"; if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
PYTHONPATH="$PWD:$PWD/.gpu_deps:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py "$@"
