#!/usr/bin/env bash
# The GPU check on a bare machine without network: dgplug's folders laid out as one package on PYTHONPATH.
# The device image has no gguf-py: copy gguf and yaml from a venv's site-packages into .gpu_deps/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
# on the device machine $OUT comes back: the whole log goes there as it is written (the reply
# carries only the last 12,000 characters, and a run cut at its time limit still returns $OUT)
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
SITE="$(mktemp -d)"; mkdir -p "$SITE/dgplug" && cp -r dgplug/. "$SITE/dgplug/" && for d in converters kernels integrations; do cp -r "$d" "$SITE/dgplug/$d"; done
PYTHONPATH="$SITE:$PWD/.gpu_deps:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py "$@"
