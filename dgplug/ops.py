"""The hot operations of DiffusionGemma, each one replaceable function.

The model (`dgplug.model`) and the sampler (`dgplug.sampler`) call these names and nothing
else for their heavy work, so `dgplug.kernels` can swap in Triton versions without touching
the model. The defaults here are plain PyTorch and follow transformers' order of operations,
so the fp32 CPU path is bit-for-bit the reference.

Contracts (shapes; all attention scaling is 1.0):

attention(q, k, v, *, q_pos, k_pos, key_valid, causal, window) -> [B, Hq, Lq, D]
    q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D] (GQA: query head h reads kv head h // (Hq // Hkv));
    q_pos [Lq], k_pos [Lk] absolute positions (long); key_valid [B, Lk] bool ([1, Lk]: every row) or None.
    Key j is visible to query i when key_valid[b, j] and (not causal or k_pos[j] <= q_pos[i])
    and (window is None or q_pos[i] - k_pos[j] < window).

route(r, proj_weight, scale, per_expert_scale, top_k, eps) -> (weights [T, K] fp32, index [T, K])
    r is the raw residual [T, D]: rmsnorm_noscale(r) * scale * D^-0.5 -> proj -> softmax fp32
    -> top-k -> renormalise -> * per_expert_scale[index].

moe(x, index, weights, gate_up, down) -> [T, D]
    x [T, D] (already pre_feedforward_layernorm_2), gate_up [E, 2I, D] (rows :I gate, I: up),
    down [E, D, I]; out[t] = sum_k w[t,k] * down[e] @ (gelu_tanh(gate[e] @ x[t]) * up[e] @ x[t]).

head_sample(h, embedding, *, softcap, temperature, seed, step, soft_dtype) -> HeadSample
    The fused head + sampler step (see dgplug.kernels.sampler).

The layer glue (dgplug.kernels.norm, one launch each on the GPU):
rms_norm(x, weight, eps, residual=None) -> residual + RMSNorm(x) * weight (fp32 math, cast back)
qkv_heads(q, k, v, wq, wk, eps, cos, sin, out=None) -> per-head norms of q, k, v [B, L, heads, d] (q, k:
    with weight and RoPE), one launch; k and v written into `out` (the static cache's slots) if given
post_attention(attn, x, w, w1, w2, eps) -> x + RMSNorm(attn) * w, and its two pre-feed-forward norms
gelu_mul(gate, up) -> gelu_tanh(gate) * up
layer_out(x, dense, moe, w1, w2, w, scalar, eps) -> (x + norm(norm(dense)*w1 + norm(moe)*w2)*w) * scalar
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import settings

# Which implementation the model's hot operations use:
#   "auto" (default): dgplug.kernels on CUDA tensors (Triton), the exact references on CPU;
#   "kernels": always dgplug.kernels (they pick Triton or their PyTorch twins themselves);
#   "reference": always the plain PyTorch references below (transformers' order of operations).
BACKEND = settings.switch("DGPLUG_OPS")


def set_backend(name: str) -> None:
    global BACKEND
    if name not in ("auto", "kernels", "reference"):
        raise ValueError(f"backend {name!r}: use auto, kernels or reference")
    BACKEND = name


def _kernels(t: torch.Tensor) -> bool:
    return BACKEND == "kernels" or (BACKEND == "auto" and t.is_cuda)


# 16-bit weights on a CPU without native 16-bit matmuls (no AVX512-BF16 / AMX / AVX512-FP16: what
# torch's oneDNN reports) are upcast at use. DGPLUG_UPCAST_16BIT=1 / 0 forces it on / off.
_UPCAST_16BIT = settings.switch("DGPLUG_UPCAST_16BIT")
_UPCAST_BLOCK = 1 << 24  # elements of a weight upcast at once (64 MiB in fp32)


@functools.cache
def _native_16bit(dtype: torch.dtype) -> bool:
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: assume the slow case
        return False


def upcast_16bit(t: torch.Tensor) -> bool:
    """Whether matmuls with this 16-bit CPU tensor should run in fp32 instead (measured on an
    AVX2 CPU: bf16 matmuls 5 GF/s, fp32 70 GF/s)."""
    if t.dtype not in (torch.bfloat16, torch.float16) or t.device.type != "cpu" or _UPCAST_16BIT == "0":
        return False
    return _UPCAST_16BIT == "1" or not _native_16bit(t.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T, bias-free. With 16-bit operands that `upcast_16bit` flags: one fp32 matmul on
    exact fp32 copies of x and w (a CPU's 16-bit matmul accumulates in fp32 too), the result
    rounded to x's dtype as a 16-bit matmul's would be. Transient: w in fp32, in blocks of
    output rows for weights over 2^24 elements (the tied head)."""
    if not (upcast_16bit(w) or upcast_16bit(x)):
        return F.linear(x, w)
    x32 = x.float()
    if w.numel() <= _UPCAST_BLOCK:
        return F.linear(x32, w.float()).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    step = max(1, _UPCAST_BLOCK // w.shape[1])
    for j in range(0, w.shape[0], step):
        out[..., j:j + step] = F.linear(x32, w[j:j + step].float())
    return out


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# The layer glue (norms, RoPE, residuals, router) on dgplug.kernels.norm / router where the other
# kernels run; DGPLUG_GLUE_KERNELS=0 (or GLUE_KERNELS = False) keeps it on the references (the GPU
# check times both).
GLUE_KERNELS = settings.on("DGPLUG_GLUE_KERNELS")


def _glue_kernels(x: torch.Tensor) -> bool:
    return GLUE_KERNELS and _kernels(x) and not torch.compiler.is_compiling()  # compile fuses the glue itself


@functools.cache
def _build_errors() -> tuple:
    """Triton's errors for a kernel that cannot be built here (compiler, ptxas, resources)."""
    try:
        from triton.compiler import errors as ce
        from triton.runtime import errors as re_
    except Exception:  # noqa: BLE001 - no triton: nothing to catch
        return ()
    return tuple(c for c in (getattr(ce, "CompilationError", None), getattr(re_, "OutOfResources", None),
                             getattr(re_, "PTXASError", None)) if isinstance(c, type))


@functools.cache
def _kernel_module(module: str):
    import importlib

    return importlib.import_module(f"dgplug.kernels.{module}")


def _glue_call(module: str, name: str, reference, *args, **kwargs):
    """dgplug.kernels.<module>.<name>(*args, **kwargs); if that kernel cannot be built on this
    machine (an older Triton, another GPU), one warning, the glue goes back to the references for
    the rest of the process, and this call returns the reference's result."""
    global GLUE_KERNELS
    try:
        return getattr(_kernel_module(module), name)(*args, **kwargs)
    except _build_errors() as e:
        GLUE_KERNELS = False
        import warnings

        warnings.warn(f"dgplug: the {module}.{name} kernel cannot be built here ({type(e).__name__}: "
                      f"{str(e)[:300]}); the layer glue runs on PyTorch ops from now on", RuntimeWarning, stacklevel=3)
        return reference(*args, **kwargs)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None):
    """residual + RMSNorm(x) * weight (dgplug.kernels.norm on the GPU: one launch)."""
    if _glue_kernels(x):
        return _glue_call("norm", "rms_norm", add_rms_norm_reference, x, weight, eps, residual=residual)
    return add_rms_norm_reference(x, weight, eps, residual)


def add_rms_norm_reference(x, weight, eps, residual=None):
    y = rms_norm_reference(x, weight, eps)
    return y if residual is None else residual + y


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back; the weight is used as is (no 1 + w)."""
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


def rope(x, cos, sin):
    """Rotate-half RoPE on [B, L, heads, d] with cos/sin [L, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def head_norm_rope_reference(x, weight, eps: float, cos=None, sin=None):
    y = rms_norm_reference(x, weight, eps)
    return y if cos is None else rope(y, cos, sin)


def qkv_heads(q, k, v, wq, wk, eps: float, cos=None, sin=None, out=None):
    """q, k: per-head norm with weight, then RoPE; v: per-head norm only. [B, L, H, d] in, [B, H, L, d]
    out; out=(k_dst, v_dst) receives k and v (the static cache's canvas slots). One launch on the GPU."""
    if _glue_kernels(q):
        return _glue_call("norm", "qkv_heads", qkv_heads_reference, q, k, v, wq, wk, eps, cos, sin, out=out)
    return qkv_heads_reference(q, k, v, wq, wk, eps, cos, sin, out=out)


def qkv_heads_reference(q, k, v, wq, wk, eps: float, cos=None, sin=None, out=None):
    q = head_norm_rope_reference(q, wq, eps, cos, sin).transpose(1, 2)
    k = head_norm_rope_reference(k, wk, eps, cos, sin).transpose(1, 2)
    v = head_norm_rope_reference(v, None, eps).transpose(1, 2)
    if out is None:
        return q, k, v
    out[0].copy_(k)
    out[1].copy_(v)
    return q, out[0], out[1]


def post_attention(attn, x, w, w1, w2, eps: float):
    """x' = x + RMSNorm(attn) * w, and x' through both pre-feed-forward norms (w1: the dense MLP's,
    w2: the experts'): (x', h1, h2). One launch on the GPU."""
    if _glue_kernels(x):
        return _glue_call("norm", "post_attention", post_attention_reference, attn, x, w, w1, w2, eps)
    return post_attention_reference(attn, x, w, w1, w2, eps)


def post_attention_reference(attn, x, w, w1, w2, eps: float):
    x = add_rms_norm_reference(attn, w, eps, residual=x)
    return x, rms_norm_reference(x, w1, eps), rms_norm_reference(x, w2, eps)


def gelu_mul(gate, up):
    """gelu_tanh(gate) * up: the middle of the dense and self-conditioning MLPs (one launch on the GPU)."""
    if _glue_kernels(gate):
        return _glue_call("norm", "gelu_mul", gelu_mul_reference, gate, up)
    return gelu_mul_reference(gate, up)


def gelu_mul_reference(gate, up):
    return gelu_tanh(gate) * up


def layer_out(x, dense, moe, w1, w2, w, scalar, eps: float):
    """The end of a decoder layer: (x + norm(norm(dense) * w1 + norm(moe) * w2) * w) * scalar."""
    if _glue_kernels(x):
        return _glue_call("norm", "layer_out", layer_out_reference, x, dense, moe, w1, w2, w, scalar, eps)
    return layer_out_reference(x, dense, moe, w1, w2, w, scalar, eps)


def layer_out_reference(x, dense, moe, w1, w2, w, scalar, eps: float):
    a = rms_norm_reference(dense, w1, eps) + rms_norm_reference(moe, w2, eps)
    return (x + rms_norm_reference(a, w, eps)) * scalar


def key_valid_rows(key_valid, batch: int, lk: int):
    """`attention`'s key_valid checked: None, or bool [B, Lk] or [1, Lk] (one row for the whole batch),
    a nonzero entry being a valid key. Any other shape is this one ValueError on every path (the
    reference broadcast [B, 1, Lk] to a 5-d mask SDPA refused, [B, 1] over the keys; the Triton path
    asserted [B, Lk]); another dtype counts nonzero as valid on every path (SDPA took a float mask as
    an additive bias)."""
    if key_valid is None:
        return None
    if key_valid.dim() != 2 or key_valid.shape[0] not in (1, batch) or key_valid.shape[1] != lk:
        raise ValueError(f"key_valid must be [B, Lk] = [{batch}, {lk}] (or [1, {lk}] for every row); "
                         f"got {list(key_valid.shape)}")
    return key_valid if key_valid.dtype == torch.bool else key_valid != 0


def attention_mask(q_pos, k_pos, key_valid, causal: bool, window: int | None, batch: int):
    """Boolean [B, 1, Lq, Lk] mask for `attention`, or None when every key is visible."""
    key_valid = key_valid_rows(key_valid, batch, k_pos.shape[0])
    mask = None
    if causal:
        mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:  # int64: int32 positions would wrap a window >= 2^31 (and the difference)
        w = (q_pos[:, None].long() - k_pos[None, :].long()) < window
        mask = w if mask is None else mask & w
    # all keys valid: no mask (SDPA's faster unmasked path); under torch.compile the mask is always
    # built instead of asking the data (the same result, no data-dependent branch)
    if key_valid is not None and (torch.compiler.is_compiling() or not bool(key_valid.all())):
        kv = key_valid[:, None, None, :]
        mask = kv if mask is None else (mask[None, None] & kv)
        if kv.shape[0] != batch:  # [1, Lk]: the same keys for every row
            mask = mask.expand(batch, -1, -1, -1)
    elif mask is not None:
        mask = mask[None, None].expand(batch, 1, -1, -1)
    return mask


def attention(q, k, v, *, q_pos, k_pos, key_valid=None, causal=False, window=None):
    if _kernels(q):
        from dgplug.kernels.attention import attention as fused

        return fused(q, k, v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid, causal=causal, window=window)
    return attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid, causal=causal, window=window)


def attention_reference(q, k, v, *, q_pos, k_pos, key_valid=None, causal=False, window=None):
    """Reference attention: torch SDPA with a boolean mask, as transformers' sdpa path."""
    groups = q.shape[1] // k.shape[1]
    mask = attention_mask(q_pos, k_pos, key_valid, causal, window, q.shape[0])
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def route(r, proj_weight, scale, per_expert_scale, top_k: int, eps: float):
    """The MoE router: reads the raw residual, softmax before top-k, per-expert scale (one
    launch on the GPU: dgplug.kernels.router)."""
    if _glue_kernels(r):
        return _glue_call("router", "route", route_reference, r, proj_weight, scale, per_expert_scale, top_k, eps)
    return route_reference(r, proj_weight, scale, per_expert_scale, top_k, eps)


def route_reference(r, proj_weight, scale, per_expert_scale, top_k: int, eps: float):
    z = rms_norm_reference(r, None, eps) * scale * (r.shape[-1] ** -0.5)
    probs = torch.softmax(linear(z, proj_weight), dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, k=top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale[idx], idx


def moe(x, index, weights, gate_up, down):
    if _kernels(x) or not isinstance(gate_up, torch.Tensor):
        from dgplug.kernels.moe import moe_forward

        return moe_forward(x, index, weights, gate_up, down)
    return moe_reference(x, index, weights, gate_up, down)


def moe_reference(x, index, weights, gate_up, down):
    """Reference experts: loop over the experts hit, in transformers' order (index_add_)."""
    out = torch.zeros_like(x)
    n_exp = gate_up.shape[0]
    hit = torch.unique(index)
    for e in hit.tolist():
        if e < 0 or e >= n_exp:  # outside [0, E): no expert (as the kernels; -1 must not wrap to E - 1)
            continue
        rows, slot = torch.where(index == e)
        # transformers visits tokens ordered by (slot, token); keep that order
        order = torch.argsort(slot * index.shape[0] + rows, stable=True)
        rows, slot = rows[order], slot[order]
        gate, up = linear(x[rows], gate_up[e]).chunk(2, dim=-1)
        y = linear(gelu_tanh(gate) * up, down[e]) * weights[rows, slot, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits.float() / cap) * cap


def soft_embedding(scaled_logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Self-conditioning soft embedding: softmax(l) in fp32, cast to the table dtype, @ E, unscaled
    (transformers' expression: the logits as given, in generation already in the table's dtype)."""
    probs = torch.softmax(scaled_logits, dim=-1, dtype=torch.float32).to(embedding.dtype)
    if not upcast_16bit(embedding):
        return torch.matmul(probs, embedding)
    # fp32 accumulation over vocabulary blocks upcast at use, rounded once at the end
    p = probs.reshape(-1, probs.shape[-1])
    out = torch.zeros(p.shape[0], embedding.shape[1], dtype=torch.float32, device=p.device)
    step = max(1, _UPCAST_BLOCK // embedding.shape[1])
    for v0 in range(0, p.shape[1], step):
        out.addmm_(p[:, v0:v0 + step].float(), embedding[v0:v0 + step].float())
    return out.to(embedding.dtype).view(*probs.shape[:-1], -1)


def embed_scale(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(hidden) cast to the weight dtype first (53.0 in bf16 for 2816), as transformers."""
    return torch.tensor(math.sqrt(hidden)).to(dtype)
