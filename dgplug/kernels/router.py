"""The MoE router as one Triton kernel; its PyTorch twin is `dgplug.ops.route_reference`.

    route(r, proj_weight, scale, per_expert_scale, top_k, eps) -> (weights [T, K] fp32, index [T, K])

    z = rmsnorm_noscale(r) * scale * D^-0.5      (each step rounded to r's dtype, as the twin)
    p = softmax(z @ proj_weight^T) in fp32        (the logits rounded to r's dtype first)
    top-k of p (descending), renormalised to sum 1, times per_expert_scale[index]

Eagerly that is about a dozen launches per layer (norm, two scalings, matmul, softmax, topk, sum,
divide, gather, multiply). Here: one program per BLOCK_T tokens; a first pass over the hidden
size for the sum of squares, a second that builds z a chunk at a time and accumulates the
[BLOCK_T, E] logits with tl.dot (16-bit operands on the tensor cores, fp32 accumulation: each
product exact, as the twin's 16-bit matmul; fp32 inputs as IEEE fp32); then softmax and the
top-k by repeated max in registers (ties go to the lower expert index). The router weight [E, D] (E = 128) is read once per program.
top_k must be at most E (a ValueError naming it; top_k = 0 gives the twin's empty [T, 0] results).
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, interpreting, pick_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _route_kernel(r_ptr, w_ptr, s_ptr, pes_ptr, ow_ptr, oi_ptr, T, D, E, stride_r, stride_w, eps, inv_sqrt_d,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                      IEEE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        offs_e = tl.arange(0, BLOCK_E)
        emask = offs_e < E
        dt = r_ptr.dtype.element_ty
        ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(r_ptr + rows[:, None].to(tl.int64) * stride_r + offs_d[None, :],
                        mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        inv = 1.0 / tl.sqrt(ss / D + eps)
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            x = tl.load(r_ptr + rows[:, None].to(tl.int64) * stride_r + offs_d[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            sc = tl.load(s_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
            z = (x * inv[:, None]).to(dt).to(tl.float32)
            z = (z * sc[None, :]).to(dt).to(tl.float32)
            z = (z * inv_sqrt_d).to(dt)
            wt = tl.load(w_ptr + offs_e[None, :].to(tl.int64) * stride_w + offs_d[:, None],
                         mask=emask[None, :] & dmask[:, None], other=0.0)
            if IEEE:  # fp32 inputs: fp32 products, as the reference
                acc = tl.dot(z.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            else:  # 16-bit: exact products, fp32 accumulation (the reference's 16-bit matmul), tensor cores
                acc = tl.dot(z, wt, acc)
        logits = acc.to(dt).to(tl.float32)
        logits = tl.where(emask[None, :], logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        # top-k by repeated max (ties to the lower expert index), kept in registers as [BLOCK_T, KP]
        offs_k = tl.arange(0, KP)
        top_w = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
        top_i = tl.zeros((BLOCK_T, KP), dtype=tl.int32)
        for k in tl.static_range(K):
            m = tl.max(p, axis=1)
            idx = tl.min(tl.where(p == m[:, None], offs_e[None, :], BLOCK_E), axis=1)
            idx = tl.minimum(idx, E - 1)  # NaN logits match nothing: still a valid expert
            top_w = tl.where(offs_k[None, :] == k, m[:, None], top_w)
            top_i = tl.where(offs_k[None, :] == k, idx[:, None], top_i)
            p = tl.where(offs_e[None, :] == idx[:, None], -1.0, p)
        kmask = rmask[:, None] & (offs_k[None, :] < K)
        pes = tl.load(pes_ptr + top_i, mask=kmask, other=0.0).to(tl.float32)
        top_w = top_w / tl.sum(top_w, axis=1)[:, None] * pes
        out = rows[:, None].to(tl.int64) * K + offs_k[None, :]
        tl.store(ow_ptr + out, top_w, mask=kmask)
        tl.store(oi_ptr + out, top_i.to(tl.int64), mask=kmask)

def route(r, proj_weight, scale, per_expert_scale, top_k: int, eps: float, *, impl: str | None = None):
    """The router of one MoE layer for r [T, D] (see the module docstring)."""
    from dgplug import ops

    if top_k > proj_weight.shape[0]:  # the kernel would repeat an expert, torch.topk raise its own error
        raise ValueError(f"top_k={top_k} is more than the {proj_weight.shape[0]} experts")
    if pick_impl(r, impl) == "torch" or not isinstance(proj_weight, torch.Tensor) \
            or proj_weight.dtype != r.dtype or scale.dtype != r.dtype or r.dim() != 2 or top_k < 1:
        return ops.route_reference(r, proj_weight, scale, per_expert_scale, top_k, eps)
    T, D = r.shape
    E = proj_weight.shape[0]
    r = r if r.stride(-1) == 1 else r.contiguous()
    w = torch.empty(T, top_k, dtype=torch.float32, device=r.device)
    idx = torch.empty(T, top_k, dtype=torch.long, device=r.device)
    bt = 16
    # fp32 runs as FMA (IEEE): a narrower K tile keeps the [BLOCK_D, E] weight tile in registers.
    # sm_90 build (benchmarks/sm90_build.py): fp32 operands at BLOCK_D 128 spilled 16.7 KB a thread.
    # (the interpreter gets bf16 dots wrong: there bf16 takes the fp32 path, fp16 tests this one)
    ieee = r.dtype == torch.float32 or (r.dtype == torch.bfloat16 and interpreting())
    bd = 32 if ieee else 128
    pw = proj_weight.contiguous()
    _route_kernel[(triton.cdiv(T, bt),)](
        r, pw, scale.contiguous(), per_expert_scale.contiguous(), w, idx, T, D, E, r.stride(0), pw.stride(0),
        eps, D ** -0.5, K=top_k, KP=triton.next_power_of_2(top_k), BLOCK_T=bt, BLOCK_D=bd,
        BLOCK_E=max(16, triton.next_power_of_2(E)), IEEE=ieee, num_warps=4, num_stages=2)
    return w, idx
