"""Fused mixture-of-experts for DiffusionGemma: Triton grouped GEMMs and their PyTorch twin.

    out[t] = sum_k w[t,k] * down[e_k] @ (gelu_tanh(gate[e_k] @ x[t]) * up[e_k] @ x[t])

with e_k = topk_index[t, k], w = topk_weights (fp32), gate = gate_up[e, :I], up = gate_up[e, I:],
accumulated in fp32 and returned in x.dtype. Index values outside [0, E) are dropped (transformers
uses E as a "no expert" sentinel).

Public API
----------
moe_forward(x, topk_index, topk_weights, gate_up, down, *, impl=None) -> [T, D] in x.dtype
moe_forward_torch(x, topk_index, topk_weights, gate_up, down) -> same, plain PyTorch (CPU path)
QuantizedWeight                      the packed-weight contract shared with dgplug/converters/
moe_flops_bytes(T, D, I, E, K, scheme) -> (flops, bytes read) of one call
repack_int4_halves(qw, block_k) -> the int4 weight in the halves nibble order
repack_int4_fragments(qw, block_k) -> the int4 weight in the fragments order (the GPU's)

impl: None = auto (Triton when x.is_cuda and triton imports), "triton", "torch". The environment
variable DGPLUG_KERNELS=torch|triton overrides auto; an explicit `impl` argument wins over both.

The packed weights (int4, int8, fp8: QuantizedWeight; GGUF blocks: kernels.ggml.GGMLWeight) and
their layouts are in dgplug/kernels/quantized_weight.py; the Triton grouped GEMMs and how they run, in
dgplug/kernels/moe_triton.py.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from dgplug import settings

from .backend import HAS_TRITON, pick_impl
from .quantized_weight import QuantizedWeight, expert_weight, repack_int4_fragments, repack_int4_halves  # noqa: F401

__all__ = [
    "QuantizedWeight",
    "repack_int4_halves",
    "repack_int4_fragments",
    "moe_forward",
    "moe_forward_torch",
    "moe_flops_bytes",
    "HAS_TRITON",
]


def _wshape(w) -> tuple:
    return tuple(w.shape)


def _check_args(x, topk_index, topk_weights, gate_up, down):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got {tuple(x.shape)}")
    T, D = x.shape
    if topk_index.dim() != 2 or topk_index.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_index.shape):
        raise ValueError("topk_index and topk_weights must both be [T, K]")
    gu, dn = _wshape(gate_up), _wshape(down)
    if len(gu) != 3 or len(dn) != 3 or gu[2] != D or gu[1] % 2 or dn[0] != gu[0] or dn[1] != D \
            or dn[2] != gu[1] // 2:
        raise ValueError(f"expected gate_up [E, 2I, {D}] and down [E, {D}, I]; got {gu} and {dn}")
    return T, D, gu[0], gu[1] // 2, topk_index.shape[1]


# ---------------------------------------------------------------------------------------------
# PyTorch twin (reference and CPU path)
# ---------------------------------------------------------------------------------------------


def moe_forward_torch(x, topk_index, topk_weights, gate_up, down):
    """Plain PyTorch: sort pairs by expert, one pair of matmuls per expert hit, fp32 sum.

    Quantized weights are dequantised one expert at a time. On CPU (and for fp32 inputs) the
    matmuls run in fp32; on CUDA with half inputs they run in x.dtype with fp32 accumulation,
    except the down matmul with fp16 inputs: gelu_tanh(gate) * up stays fp32 there (as the Triton
    path keeps it: in fp16 it overflows above 65504 while the output can be finite).
    Deterministic: CPU index_add_, or on CUDA a per-pair buffer summed over the K slots.
    """
    T, D, E, I, K = _check_args(x, topk_index, topk_weights, gate_up, down)
    out_dtype = x.dtype
    if T == 0 or K == 0:
        return torch.zeros_like(x)
    on_cpu = x.device.type == "cpu"
    cdt = torch.float32 if (on_cpu or x.dtype == torch.float32) else x.dtype
    hdt = torch.float32 if cdt == torch.float16 else cdt  # the down matmul's inputs (h and its weight)

    flat_e = topk_index.reshape(-1).long()
    key = torch.where((flat_e >= 0) & (flat_e < E), flat_e, torch.full_like(flat_e, E))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1).tolist()
    tok_sorted = torch.div(order, K, rounding_mode="floor")
    w_sorted = topk_weights.reshape(-1).float()[order]
    xs_all = x[tok_sorted].to(cdt)

    if on_cpu:
        out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    else:
        pairs = torch.zeros(T * K, D, dtype=torch.float32, device=x.device)
    start = 0
    for e in range(E):
        n = counts[e]
        if n == 0:
            continue
        sl = slice(start, start + n)
        start += n
        wgu = expert_weight(gate_up, e, cdt)
        h = F.linear(xs_all[sl], wgu).float()
        del wgu
        act = (F.gelu(h[:, :I], approximate="tanh") * h[:, I:]).to(hdt)
        wd = expert_weight(down, e, hdt)
        y = F.linear(act, wd).float() * w_sorted[sl, None]
        del wd
        if on_cpu:
            out.index_add_(0, tok_sorted[sl], y)
        else:
            pairs[order[sl]] = y
    if not on_cpu:
        out = pairs.view(T, K, D).sum(dim=1)
    return out.to(out_dtype)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic fp8 (e4m3): (x / s) in float8_e4m3fn and s = max |x| / 448 (1 for a zero row),
    the fp8 weights' own quantizer applied to activation rows."""
    q = QuantizedWeight.quantize(x, "fp8")
    return q.qweight, q.scale


def moe_forward_fp8_activations_torch(x, topk_index, topk_weights, gate_up, down, block_k: int):
    """The twin of the Triton path with fp8 activations (config A8; fp8 weights): x in fp8 with one
    scale per token, fp8 x fp8 products summed in fp32, h = gelu_tanh(gate) * up in fp8 with one scale
    per row and K tile of `block_k` (the down step's), each tile's products scaled before the sum.
    Not transformers' arithmetic (it keeps activations in 16 bits): what vLLM's fp8 MoE does."""
    T, D, E, I, K = _check_args(x, topk_index, topk_weights, gate_up, down)
    if not all(isinstance(w, QuantizedWeight) and w.scheme == "fp8" for w in (gate_up, down)):
        raise ValueError("fp8 activations need fp8 expert weights")
    x8, sx = fp8_rows(x)
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    pad = -I % block_k
    for e in range(E):
        tok, slot = torch.where(topk_index == e)
        if tok.numel() == 0:
            continue
        gu = (x8[tok].float() @ gate_up.qweight[e].float().T) * gate_up.scale[e].float() * sx[tok, None]
        h = F.gelu(gu[:, :I], approximate="tanh") * gu[:, I:]
        tiles = F.pad(h, (0, pad)).view(h.shape[0], -1, block_k)
        amax = tiles.abs().amax(-1)
        hs = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        h8 = (tiles / hs[..., None]).to(torch.float8_e4m3fn).float()
        wd = F.pad(down.qweight[e].float(), (0, pad)).view(D, -1, block_k)
        y = (torch.einsum("rtk,dtk->rdt", h8, wd) * hs[:, None, :]).sum(-1) * down.scale[e].float()
        out.index_add_(0, tok, y * topk_weights[tok, slot].float()[:, None])
    return out.to(x.dtype)




A8_TILE = 64  # h's fp8 scale tile with fp8 activations: the kernels' BLOCK_N1 = BLOCK_K2 by default


def fp8_activations(gate_up, down) -> bool:
    """DGPLUG_FP8_ACTIVATIONS=1 and fp8 experts: the MoE runs fp8 x fp8 (moe_forward_fp8_activations_torch)."""
    return settings.on("DGPLUG_FP8_ACTIVATIONS") and all(
        isinstance(w, QuantizedWeight) and w.scheme == "fp8" for w in (gate_up, down))


def env_config() -> dict:
    """DGPLUG_MOE_CONFIG="num_warps=8,ONE_DOT=1": tile settings over the defaults for every call of
    moe_forward's Triton path (the GPU check times `generate` with its sweep's fastest this way)."""
    return dict(_parse_moe_config(os.environ.get("DGPLUG_MOE_CONFIG", "").strip()))


@functools.cache
def _parse_moe_config(text: str) -> tuple:
    """The variable's items as (key, int) pairs (parsed once per distinct value: moe_forward is hot)."""
    out = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip() or not val.strip().lstrip("-").isdigit():
            raise ValueError(f"DGPLUG_MOE_CONFIG={text!r}: {item!r} is not KEY=integer")
        out[key.strip()] = int(val)
    return tuple(out.items())


def moe_forward(x, topk_index, topk_weights, gate_up, down, *, impl: str | None = None):
    """Fused MoE experts: [T, D] in x.dtype (see the module docstring for the contract)."""
    a8 = fp8_activations(gate_up, down)
    if pick_impl(x, impl) == "triton":
        from .moe_triton import moe_forward_triton

        config = dict(A8=True, BLOCK_N1=A8_TILE, BLOCK_K2=A8_TILE) if a8 else {}
        return moe_forward_triton(x, topk_index, topk_weights, gate_up, down, config={**env_config(), **config})
    if a8:
        return moe_forward_fp8_activations_torch(x, topk_index, topk_weights, gate_up, down, A8_TILE)
    if torch.compiler.is_compiling() and isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        return torch.ops.dgplug.moe_torch(x, topk_index, topk_weights, gate_up, down)
    return moe_forward_torch(x, topk_index, topk_weights, gate_up, down)


# Under torch.compile the twin is one opaque operator: its loop runs over the experts actually hit
# (a data-dependent count), which no graph can hold; the operator runs the very same code.
@torch.library.custom_op("dgplug::moe_torch", mutates_args=())
def _moe_torch_op(x: torch.Tensor, topk_index: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor) -> torch.Tensor:
    return moe_forward_torch(x, topk_index, topk_weights, gate_up, down)


@_moe_torch_op.register_fake
def _(x, topk_index, topk_weights, gate_up, down):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# Cost model for reports
# ---------------------------------------------------------------------------------------------

_WEIGHT_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0,
                 "float16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5}


def moe_flops_bytes(T: int, D: int, I: int, E: int, K: int, scheme: str = "bf16",
                    group_size: int = 128, act_bytes: int = 2) -> tuple[float, float]:
    """(flops, bytes read) of one moe_forward call with uniform routing.

    flops: the two grouped GEMMs, 2 * T*K * 3*I*D (the GELU/product/weighting are negligible).
    bytes read: the weights of the experts expected to be touched (E * (1 - (1 - K/E)^T)),
    each expert's 3*I*D weights at the scheme's width plus its scales (int4: fp16 scale and
    uint8 zero per group; int8/fp8: fp32 per output row), plus the activations the kernels read:
    x once per pair, the [T*K, I] intermediate, the fp32 [T*K, D] per-pair buffer summed over K,
    and the routing weights.
    """
    scheme = scheme.lower()
    if scheme not in _WEIGHT_BYTES:
        raise ValueError(f"unknown scheme {scheme!r}")
    flops = 2.0 * T * K * 3 * I * D
    touched = E * (1.0 - (1.0 - min(K, E) / E) ** T) if E else 0.0
    per_expert = 3 * I * D * _WEIGHT_BYTES[scheme]
    if scheme == "int4":
        per_expert += (2 * I * math.ceil(D / group_size) + D * math.ceil(I / group_size)) * 3
    elif scheme in ("int8", "fp8"):
        per_expert += (2 * I + D) * 4
    acts = T * K * D * act_bytes + T * K * I * act_bytes + T * K * D * 4 + T * K * 4
    return flops, touched * per_expert + acts
