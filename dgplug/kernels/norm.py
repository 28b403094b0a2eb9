"""The glue of a decoder layer as one Triton kernel each: RMSNorm (with the residual add), the
per-head q/k/v norm with RoPE, and the end of a layer. Their PyTorch twins are the references in
`dgplug.ops` (transformers' order of operations), which the CPU path runs.

    rms_norm(x, weight, eps, residual=None)      residual + norm(x) * weight     (norm: fp32 math)
    qkv_heads(q, k, v, wq, wk, eps, cos, sin)     rope(norm(x) * w) per head of q and k, norm(v) per
                                                  head, one launch, k and v written where asked
    post_attention(attn, x, w, w1, w2, eps)       x' = x + norm(attn) * w; norm(x') * w1; norm(x') * w2
    gelu_mul(gate, up)                            gelu_tanh(gate) * up            (the dense MLP's middle)
    layer_out(x, dense, moe, w1, w2, w, scalar, eps)
                                                  (x + norm(norm(dense)*w1 + norm(moe)*w2) * w) * scalar

Eager PyTorch runs each norm as about seven kernels (cast, square, mean, add, rsqrt, two
multiplies, cast back) and RoPE as five more: about 60 launches of the glue per decoder layer,
each a few microseconds on a GPU even when replayed in a CUDA graph. Here a layer's glue is five
launches: the input norm, the q/k/v heads (`qkv_heads`, k and v written into the static cache's
canvas slots, so no copy follows), the post-attention residual norm with both pre-feed-forward
norms (`post_attention`: the residual row read once, three outputs), the dense MLP's gelu(gate) *
up, and the layer end (benchmarks/layer_launches.py: 15 launches a layer in generate's step).

Every kernel keeps the twin's roundings: each intermediate the twin holds in the activation dtype
(the normed vector before RoPE, each RoPE product, the sum of the two MoE-block branches, the
residual sum before the layer scalar) is rounded to that dtype here too, so the kernels differ
from the twins only in the fp32 scale 1/sqrt(mean(x^2) + eps): the order of the sum of squares,
and on a GPU the last bits of Triton's fast sqrt and division (the twin's own CUDA rsqrt is not
correctly rounded either). In the interpreter the fp16 outputs equal the twins' bit for bit.
Inputs the model never passes (a residual, dense or MoE branch of another shape or dtype, cos/sin
other than [L, d] in x's dtype, a layer scalar of more than one element) go to the twin; a
strided norm weight is read through a contiguous copy.

One program per row (a token's hidden vector, or one head of it); the row lives in registers
(BLOCK = the next power of two of its length). impl: None picks Triton for CUDA tensors (the
environment variable DGPLUG_KERNELS=torch|triton overrides), "torch" or "triton" forces one.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, pick_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _inv_rms(x, mask, N, eps):
        """1 / sqrt(mean(x^2) + eps) of one fp32 row (masked lanes hold 0)."""
        return 1.0 / tl.sqrt(tl.sum(tl.where(mask, x * x, 0.0), axis=0) / N + eps)

    @triton.jit
    def _load_normed(p, w_ptr, offs, mask, N, eps, dt):
        """norm(row) * w of the row at p (fp32 math), rounded to dt."""
        v = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
        return (v * _inv_rms(v, mask, N, eps) * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, r_ptr, out_ptr, N, stride_x, stride_r, stride_o, eps,
                         HAS_W: tl.constexpr, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        y = x * _inv_rms(x, mask, N, eps)
        if HAS_W:
            y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = y.to(out_ptr.dtype.element_ty)
        if HAS_R:  # the residual add of the twin: both operands in the activation dtype
            r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            y = (r + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + offs, y, mask=mask)

    @triton.jit
    def _head_row(base, out, w_ptr, cos_ptr, sin_ptr, pos, D, eps, HAS_W: tl.constexpr, ROPE: tl.constexpr,
                  BLOCK: tl.constexpr):
        """One head of one token: rope(norm(x) * w) from `base` to `out` (pos: the cos/sin row offset)."""
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        inv = _inv_rms(x, mask, D, eps)
        y = x * inv
        if HAS_W:
            y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dt = out.dtype.element_ty
        y = y.to(dt)
        if ROPE:  # rotate half: out = y * cos + cat(-y[half:], y[:half]) * sin, products rounded
            half = D // 2
            rot = tl.where(offs < half, offs + half, offs - half)
            xr = tl.load(base + rot, mask=mask, other=0.0).to(tl.float32)
            yr = xr * inv
            if HAS_W:
                yr = yr * tl.load(w_ptr + rot, mask=mask, other=0.0).to(tl.float32)
            yr = tl.where(offs < half, -(yr.to(dt).to(tl.float32)), yr.to(dt).to(tl.float32))
            c = tl.load(cos_ptr + pos + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + pos + offs, mask=mask, other=0.0).to(tl.float32)
            a = (y.to(tl.float32) * c).to(dt).to(tl.float32)
            b = (yr * s).to(dt).to(tl.float32)
            y = (a + b).to(dt)
        tl.store(out + offs, y, mask=mask)

    @triton.jit
    def _qkv_heads_kernel(q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr,
                          HQ, HK, L, D, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
                          oq_b, oq_l, oq_h, ok_b, ok_l, ok_h, ov_b, ov_l, ov_h, stride_c, eps,
                          ROPE: tl.constexpr, BLOCK: tl.constexpr):
        """One head of one token of q, k or v: q and k normed with their weights and rotated, v
        normed only; inputs [tokens, H, D] (strided), outputs [B, L, H, D] by their own strides."""
        pid = tl.program_id(0)
        tok = (pid // (HQ + 2 * HK)).to(tl.int64)
        j = pid % (HQ + 2 * HK)
        b, l = tok // L, tok % L
        pos = l * stride_c
        if j < HQ:
            _head_row(q_ptr + tok * sq_t + j * sq_h, qo_ptr + b * oq_b + l * oq_l + j * oq_h, wq_ptr,
                      cos_ptr, sin_ptr, pos, D, eps, True, ROPE, BLOCK)
        elif j < HQ + HK:
            h = j - HQ
            _head_row(k_ptr + tok * sk_t + h * sk_h, ko_ptr + b * ok_b + l * ok_l + h * ok_h, wk_ptr,
                      cos_ptr, sin_ptr, pos, D, eps, True, ROPE, BLOCK)
        else:
            h = j - HQ - HK
            _head_row(v_ptr + tok * sv_t + h * sv_h, vo_ptr + b * ov_b + l * ov_l + h * ov_h, wk_ptr,
                      cos_ptr, sin_ptr, pos, D, eps, False, False, BLOCK)

    @triton.jit
    def _post_attention_kernel(a_ptr, x_ptr, w_ptr, w1_ptr, w2_ptr, xo_ptr, h1_ptr, h2_ptr, N,
                               stride_a, stride_x, stride_o, eps, BLOCK: tl.constexpr):
        """x' = x + norm(attn) * w; h1 = norm(x') * w1; h2 = norm(x') * w2 for one token."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        dt = xo_ptr.dtype.element_ty
        a = _load_normed(a_ptr + row * stride_a, w_ptr, offs, mask, N, eps, dt)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + a.to(tl.float32)).to(dt)
        tl.store(xo_ptr + row * stride_o + offs, x, mask=mask)
        x = x.to(tl.float32)
        y = x * _inv_rms(x, mask, N, eps)
        tl.store(h1_ptr + row * stride_o + offs,
                 (y * tl.load(w1_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dt), mask=mask)
        tl.store(h2_ptr + row * stride_o + offs,
                 (y * tl.load(w2_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dt), mask=mask)

    @triton.jit
    def _gelu_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
        """gelu_tanh(gate) * up for one block of one row (rows strided: gate and up may be the two
        halves of one fused projection's output); the gelu rounded to the dtype first, as the twin's."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
        # tanh as torch's (1 + tanh) sees it: near -1 the value 1 - 2 / (1 + e^2|z|) rounds as a
        # rounded tanh does (gelu's far negative tail is that cancellation); an odd series near 0
        a = tl.abs(inner)
        a2 = a * a
        small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
        t = tl.where(a < 0.125, small, 1.0 - 2.0 / (1.0 + tl.exp(2.0 * a)))
        t = tl.where(inner < 0, -t, t)
        dt = out_ptr.dtype.element_ty
        gelu = (0.5 * g * (1.0 + t)).to(dt).to(tl.float32)
        up = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (gelu * up).to(dt), mask=mask)

    @triton.jit
    def _layer_out_kernel(x_ptr, d_ptr, m_ptr, w1_ptr, w2_ptr, w_ptr, s_ptr, out_ptr, N,
                          stride_x, stride_d, stride_m, stride_o, eps, BLOCK: tl.constexpr):
        """(x + norm(norm(dense) * w1 + norm(moe) * w2) * w) * scalar for one token."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        dt = out_ptr.dtype.element_ty
        d = _load_normed(d_ptr + row * stride_d, w1_ptr, offs, mask, N, eps, dt)
        m = _load_normed(m_ptr + row * stride_m, w2_ptr, offs, mask, N, eps, dt)
        a = (d.to(tl.float32) + m.to(tl.float32)).to(dt).to(tl.float32)
        a = (a * _inv_rms(a, mask, N, eps) * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + a.to(tl.float32)).to(dt).to(tl.float32)
        y = (x * tl.load(s_ptr).to(tl.float32)).to(dt)
        tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, N] with unit stride along N (a view when the strides allow, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _same(t: torch.Tensor, x: torch.Tensor) -> bool:
    return t.shape == x.shape and t.dtype == x.dtype and t.device == x.device


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _vec(w: torch.Tensor) -> torch.Tensor:
    """A norm weight as the kernels read it, element i at w_ptr + i (a strided view is copied)."""
    return w if w.is_contiguous() else w.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, residual: torch.Tensor | None = None,
             impl: str | None = None) -> torch.Tensor:
    """residual + rms_norm(x) * weight (no residual: the norm alone; no weight: no scale)."""
    from dgplug import ops

    if pick_impl(x, impl) == "torch" or (residual is not None and not _same(residual, x)):
        return ops.add_rms_norm_reference(x, weight, eps, residual)
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, x.shape[-1])
    n = x.shape[-1]
    _rms_norm_kernel[(x2.shape[0],)](
        x2, _vec(weight) if weight is not None else x2, r2, o2, n, x2.stride(0), r2.stride(0), o2.stride(0), eps,
        HAS_W=weight is not None, HAS_R=residual is not None, BLOCK=_block(n), num_warps=4 if n > 1024 else 1)
    return out


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """x [..., H, d] as [tokens, H, d] with unit stride along d (a view where possible)."""
    x3 = x.reshape(-1, *x.shape[-2:])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def qkv_heads(q, k, v, wq, wk, eps: float, cos=None, sin=None, *, out=None, impl: str | None = None):
    """The attention's q/k/v heads in one launch: q and k normed per head with their weights and
    rotated (rotate-half RoPE, cos/sin [L, d]), v normed without weight or RoPE. q, k, v [B, L, H, d] (v may be k: the full layers' K = V).
    Returns q, k, v as [B, H, L, d] (transposed views); out (k_dst, v_dst) [B, Hk, L, d], e.g. the
    static cache's canvas slots, receives k and v in place of new tensors."""
    from dgplug import ops

    B, L, HQ, D = q.shape
    HK = k.shape[2]
    rope = cos is not None
    if pick_impl(q, impl) == "torch" or not (k.shape == v.shape == (B, L, HK, D) and q.dtype == k.dtype == v.dtype) or (
            rope and not all(t.shape == (L, D) and t.dtype == q.dtype for t in (cos, sin))):
        return ops.qkv_heads_reference(q, k, v, wq, wk, eps, cos, sin, out=out)
    q3, k3, v3 = _tokens(q), _tokens(k), _tokens(v)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko, vo = out if out is not None else (torch.empty(k.shape, dtype=k.dtype, device=k.device).transpose(1, 2)
                                          for _ in range(2))
    if rope:
        cos, sin = cos.contiguous(), sin.contiguous()
    _qkv_heads_kernel[(B * L * (HQ + 2 * HK),)](
        q3, k3, v3, _vec(wq), _vec(wk), cos if rope else q3, sin if rope else q3, qo, ko, vo, HQ, HK, L, D,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(2), ko.stride(1),
        vo.stride(0), vo.stride(2), vo.stride(1), cos.stride(0) if rope else 0, eps,
        ROPE=rope, BLOCK=_block(D), num_warps=2 if D > 256 else 1)
    return qo.transpose(1, 2), ko, vo


def layer_out(x, dense, moe, w1, w2, w, scalar, eps: float, *, impl: str | None = None) -> torch.Tensor:
    """The end of a decoder layer: (x + norm(norm(dense) * w1 + norm(moe) * w2) * w) * scalar."""
    from dgplug import ops

    if pick_impl(x, impl) == "torch" or scalar.dtype != x.dtype or scalar.numel() != 1 \
            or not (_same(dense, x) and _same(moe, x)):
        return ops.layer_out_reference(x, dense, moe, w1, w2, w, scalar, eps)
    x2, d2, m2 = _rows(x), _rows(dense), _rows(moe)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, x.shape[-1])
    n = x.shape[-1]
    _layer_out_kernel[(x2.shape[0],)](
        x2, d2, m2, _vec(w1), _vec(w2), _vec(w), scalar, o2, n, x2.stride(0), d2.stride(0), m2.stride(0), o2.stride(0), eps,
        BLOCK=_block(n), num_warps=4 if n > 1024 else 1)
    return out


def post_attention(attn, x, w, w1, w2, eps: float, *, impl: str | None = None):
    """After attention: x' = x + norm(attn) * w, then both pre-feed-forward norms of x' (the dense
    MLP's input with w1, the experts' with w2), one launch. Returns (x', h1, h2)."""
    from dgplug import ops

    if pick_impl(x, impl) == "torch" or not _same(attn, x):
        return ops.post_attention_reference(attn, x, w, w1, w2, eps)
    a2, x2 = _rows(attn), _rows(x)
    outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(3)]
    o2 = [o.view(-1, x.shape[-1]) for o in outs]
    n = x.shape[-1]
    _post_attention_kernel[(x2.shape[0],)](
        a2, x2, _vec(w), _vec(w1), _vec(w2), *o2, n, a2.stride(0), x2.stride(0), o2[0].stride(0), eps,
        BLOCK=_block(n), num_warps=4 if n > 1024 else 1)
    return tuple(outs)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up (same shapes and dtype; else the twin). Rows may be strided (gate and up
    as column halves of one [.., 2n] projection output: read in place)."""
    from dgplug import ops

    if pick_impl(gate, impl) == "torch" or not _same(up, gate):
        return ops.gelu_mul_reference(gate, up)
    g, u = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    o = out.view(-1, gate.shape[-1])
    n, block = g.shape[1], 1024
    _gelu_mul_kernel[(g.shape[0], triton.cdiv(n, block))](g, u, o, n, g.stride(0), u.stride(0), o.stride(0),
                                                          BLOCK=block, num_warps=4)
    return out
