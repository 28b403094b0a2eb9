"""The DGPLUG_* switches: one table of the values each takes and its default, read through `switch`.

A value outside its list is one error naming the variable and the values it takes (a typo would
otherwise fall back to the default without a word); true/false, yes/no and on/off read as 1/0.
The command line checks every set variable before any work (`check_all`). DGPLUG_THREADS
(dgplug.threads), DGPLUG_CACHE (a path) and DGPLUG_MOE_CONFIG (kernels.moe) have their own readers.
"""

from __future__ import annotations

import os

from .errors import InputError

ONOFF = ("0", "1")
SWITCHES: dict[str, tuple[str, tuple[str, ...]]] = {  # name: (default, values)
    "DGPLUG_OPS": ("auto", ("auto", "kernels", "reference")),  # dgplug.ops: which ops a model runs
    "DGPLUG_KERNELS": ("auto", ("auto", "torch", "triton")),  # kernels.backend: twin or Triton per call
    "DGPLUG_COMPACT": ("1", ONOFF),  # settled rows leave the batch (denoise_step)
    "DGPLUG_CUDA_GRAPHS": ("1", ONOFF),  # the denoise step replayed as CUDA graphs
    "DGPLUG_GLUE_KERNELS": ("1", ONOFF),  # the layer glue on kernels (ops)
    "DGPLUG_FUSED_PROJECTIONS": ("auto", ("auto",) + ONOFF),  # q/k/v as one matmul (model)
    "DGPLUG_UPCAST_16BIT": ("auto", ("auto",) + ONOFF),  # CPU 16-bit matmuls in fp32 (ops)
    "DGPLUG_PACKED_LINEARS": ("0", ONOFF),  # int4/int8/fp8 linears dequantised per call on a GPU too
    "DGPLUG_INT4_ORDER": ("fragments", ("fragments", "pairs")),  # int4 nibble order on CUDA
    "DGPLUG_FP8_ACTIVATIONS": ("0", ONOFF),  # fp8 experts take fp8 inputs too (kernels.moe)
    "DGPLUG_VLLM_FUSED_SAMPLER": ("1", ONOFF),  # the vLLM plugin's streaming head + sampler
    "DGPLUG_VLLM_SERVE_ORIGINAL": ("0", ONOFF),  # the plugin also takes the original architecture
    "DGPLUG_VLLM_SKIP_VERSION_CHECK": ("0", ONOFF),  # an untested vLLM version: a warning, not an error
}
_SPELLINGS = {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}


def switch(name: str) -> str:
    """The variable's value (its default when unset or empty), one of SWITCHES[name]'s values."""
    default, values = SWITCHES[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = raw.lower()
    value = _SPELLINGS.get(value, value) if values[-2:] == ONOFF else value
    if value not in values:
        raise InputError(f"{name}={raw!r}: use {', '.join(values[:-1])} or {values[-1]}"
                         + (" (or true/false, yes/no, on/off)" if values[-2:] == ONOFF else ""))
    return value


def on(name: str) -> bool:
    return switch(name) == "1"


def check_all() -> None:
    """Every DGPLUG_* switch that is set names a value it takes (the CLI calls this before any work)."""
    for name in SWITCHES:
        switch(name)
