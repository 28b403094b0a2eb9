"""Canvas / encoder attention: a flash-attention style Triton kernel and its PyTorch twin.

Contract (the same as `dgplug.ops.attention`, the reference; all scaling is 1.0):

    attention(q, k, v, *, q_pos, k_pos, key_valid=None, causal=False, window=None, impl=None)
        q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; query head h reads kv head h // (Hq // Hkv).
        q_pos [Lq], k_pos [Lk]: absolute positions (integers); key_valid [B, Lk] bool or None
        ([1, Lk]: the same keys for every row; any other shape: one ValueError, ops.key_valid_rows).
        Key j is visible to query i when key_valid[b, j] and (not causal or k_pos[j] <= q_pos[i])
        and (window is None or q_pos[i] - k_pos[j] < window).
        Returns [B, Hq, Lq, D] in q's dtype.

    A query row that sees no key at all returns zeros (finite, so padded rows never poison later
    layers). That is the reference on the CPU: torch's SDPA gives zeros for a fully masked
    boolean row since torch 2.5 (checked: 2.13 CPU, fp32/fp16/bf16), and so do its MATH and
    EFFICIENT_ATTENTION backends on CUDA and its default for fp32 there. On CUDA with bf16/fp16
    (torch 2.11, H100) SDPA's default picks cuDNN, which returns finite garbage (neither zeros
    nor the mean of V) for such rows; we keep zeros there too. Only such rows differ.

    impl: kernels.backend.pick_impl's rule: "triton" or "torch" forces one, else DGPLUG_KERNELS,
    else Triton when q is a CUDA tensor and triton imports (and the head dim is a power of two
    >= 16), the torch twin otherwise.

The Triton kernel
    One program owns BLOCK_M rows of (query, head) pairs of ONE kv head: row r is query r // G,
    query head kv_head * G + r % G (G = Hq // Hkv). So every K/V tile it loads serves all G query
    heads of the group at once (GQA costs no extra K/V traffic), and the rows of a block are
    BLOCK_M / G consecutive queries, which keeps causal/window key ranges tight.
    It walks the keys in BLOCK_N tiles with an online softmax (running max, running sum, fp32
    accumulator, exp2). Before the walk, a cheap pass over k_pos / key_valid finds the first and
    last key tile that any row of the block can see (causal, window, padding), so tiles wholly
    masked are skipped; inside the walk every element is still masked exactly, so the skipping is
    an optimisation only and holds for any order of positions.
    Head dim: Q.K^T is summed in BLOCK_DK slices (BLOCK_DK == D keeps Q resident; smaller slices
    reload Q from cache per tile and free registers / shared memory), and the P.V accumulator
    covers BLOCK_DV output columns, the grid's third axis splitting D (D=512: two programs of 256
    columns each recompute the scores but each holds half the accumulator).
    Dtypes: fp16/bf16 operands go to tl.dot as they are (fp32 accumulation, P rounded to the
    input dtype, as flash attention does); fp32 uses IEEE dots (no tf32). Under the interpreter
    (TRITON_INTERPRET=1) bf16 is converted to fp32 right after each load (its bf16 arithmetic is
    wrong). The tests need triton >= 3.7's interpreter: 3.6's cannot run any loop with a
    run-time bound under numpy 2 (`int()` of a 1-element array); compiled 3.6 on a GPU is fine.

Measured (H100, torch 2.11, triton 3.6, bf16, default blocks; reference = dgplug.ops.attention):
    decoder sliding (16:8, D=256, 256 queries x 1279 keys)  B1 45 us (ref 70), B8 114 us (ref 278)
    decoder full (16:2, D=512, 256 x 4352)                  B1 167 us (ref 574), B8 1228 (4106)
    encoder sliding 4096 causal, window 1024                286 us (ref 1334)
    encoder full 4096 causal                                1289 us (ref 4907)
    Torch's flash SDPA with enable_gqa (no mask, D<=256 only) is still ~25% faster on the
    unmasked sliding decoder (39 / 82 us at B1 / B8).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, interpreting, pick_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["attention", "attention_torch", "attention_triton", "choose_config", "HAS_TRITON"]

# The torch twin chunks the queries so that one chunk's scores (B x Hq x chunk x Lk) stay under
# this many elements (the math fallback of SDPA materialises them; 2^25 fp32 = 128 MiB).
TWIN_SCORE_BUDGET = 1 << 25


# --------------------------------------------------------------------------------------------
# The torch twin
# --------------------------------------------------------------------------------------------


def attention_torch(q, k, v, *, q_pos, k_pos, key_valid=None, causal=False, window=None,
                    chunk: int | None = None):
    """The reference (SDPA with a boolean mask), chunked over queries when the scores are big.

    Unchunked it IS `dgplug.ops.attention` (bit for bit); chunks compute the same rows with the
    same mask rows, so they agree with it to fp32 rounding.
    """
    from dgplug import ops

    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    key_valid = ops.key_valid_rows(key_valid, batch, lk)
    if chunk is None:
        chunk = max(1, TWIN_SCORE_BUDGET // max(1, batch * hq * lk))
    if lq <= chunk:
        return ops.attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid,
                             causal=causal, window=window)
    if key_valid is not None and not torch.compiler.is_compiling() and bool(key_valid.all()):
        key_valid = None
    groups = hq // hkv
    if groups > 1:  # once, not per chunk
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = q.new_empty(batch, hq, lq, v.shape[-1])
    for s in range(0, lq, chunk):
        e = min(lq, s + chunk)
        mask = ops.attention_mask(q_pos[s:e], k_pos, key_valid, causal, window, batch)
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=mask,
                                                        scale=1.0)
    return out


# --------------------------------------------------------------------------------------------
# The Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, QPOS, KPOS, KVALID,
        s_qb, s_qh, s_ql,
        s_kb, s_kh, s_kl,
        s_vb, s_vh, s_vl,
        s_ob, s_oh, s_ol,
        s_valb,
        n_kv_heads, Lq, Lk, window,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_VALID: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        HAS_MASK: tl.constexpr = CAUSAL or HAS_WINDOW or HAS_VALID
        Q_RESIDENT: tl.constexpr = BLOCK_DK == D

        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_d = tl.program_id(2)
        b = (pid_bh // n_kv_heads).to(tl.int64)
        kvh = (pid_bh % n_kv_heads).to(tl.int64)

        # rows of this block: (query, head in group), query-major
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = rows // GROUP
        head = kvh * GROUP + (rows % GROUP)
        row_ok = qi < Lq
        q_rows = Q + b * s_qb + head * s_qh + qi.to(tl.int64) * s_ql  # [BLOCK_M] pointers
        k_base = K + b * s_kb + kvh * s_kh
        v_base = V + b * s_vb + kvh * s_vh
        offs_n = tl.arange(0, BLOCK_N)
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)

        # ---- which key tiles can any row of this block see? (skip the rest) ----
        lo = 0
        hi = Lk
        if HAS_MASK:
            qp = tl.load(QPOS + qi, mask=row_ok, other=0).to(tl.int64)
            q_max = tl.max(tl.where(row_ok, qp, -(1 << 62)), axis=0)
            q_min = tl.min(tl.where(row_ok, qp, 1 << 62), axis=0)
            lo = tl.zeros([], tl.int32) + Lk
            hi = tl.zeros([], tl.int32)
            for n0 in range(0, Lk, BLOCK_N):
                kj = n0 + offs_n
                kok = kj < Lk
                need = kok
                if CAUSAL or HAS_WINDOW:
                    kp = tl.load(KPOS + kj, mask=kok, other=0).to(tl.int64)
                    if CAUSAL:
                        need = need & (kp <= q_max)
                    if HAS_WINDOW:
                        need = need & (kp > q_min - window)
                if HAS_VALID:
                    kv_ok = tl.load(KVALID + b * s_valb + kj, mask=kok, other=0)
                    need = need & (kv_ok != 0)
                any_need = tl.max(need.to(tl.int32), axis=0) > 0
                lo = tl.where(any_need, tl.minimum(lo, n0), lo)
                hi = tl.where(any_need, n0 + BLOCK_N, hi)

        if Q_RESIDENT:
            q = tl.load(q_rows[:, None] + offs_dk[None, :], mask=row_ok[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

        for n0 in range(lo, hi, BLOCK_N):
            kj = n0 + offs_n
            kok = kj < Lk
            k_rows = k_base + kj.to(tl.int64) * s_kl  # [BLOCK_N] pointers
            # ---- scores S = Q K^T (scale 1.0), in log2 units ----
            if Q_RESIDENT:
                kt = tl.load(k_rows[:, None] + offs_dk[None, :], mask=kok[:, None], other=0.0)
                if UPCAST:
                    kt = kt.to(tl.float32)
                if IEEE:
                    s = tl.dot(q, tl.trans(kt), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(kt))
            else:
                s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for c in tl.static_range(D // BLOCK_DK):
                    dk = c * BLOCK_DK + offs_dk
                    qc = tl.load(q_rows[:, None] + dk[None, :], mask=row_ok[:, None], other=0.0)
                    kc = tl.load(k_rows[:, None] + dk[None, :], mask=kok[:, None], other=0.0)
                    if UPCAST:
                        qc = qc.to(tl.float32)
                        kc = kc.to(tl.float32)
                    if IEEE:
                        s = tl.dot(qc, tl.trans(kc), s, input_precision="ieee")
                    else:
                        s = tl.dot(qc, tl.trans(kc), s)
            s = s * LOG2E

            # ---- exact visibility ----
            vis = kok[None, :]
            if HAS_MASK:
                if CAUSAL or HAS_WINDOW:
                    kp = tl.load(KPOS + kj, mask=kok, other=0).to(tl.int64)
                    if CAUSAL:
                        vis = vis & (kp[None, :] <= qp[:, None])
                    if HAS_WINDOW:
                        vis = vis & ((qp[:, None] - kp[None, :]) < window)
                if HAS_VALID:
                    kv_ok = tl.load(KVALID + b * s_valb + kj, mask=kok, other=0)
                    vis = vis & (kv_ok[None, :] != 0)
            s = tl.where(vis, s, float("-inf"))

            # ---- online softmax; a row that has seen nothing keeps m = -inf, p = 0 ----
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new

            vt = tl.load(v_base + kj.to(tl.int64)[:, None] * s_vl + offs_dv[None, :],
                         mask=kok[:, None], other=0.0)
            acc = acc * alpha[:, None]
            if UPCAST:
                vt = vt.to(tl.float32)
                if IEEE:
                    acc = tl.dot(p, vt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(p, vt, acc)
            else:
                acc = tl.dot(p.to(vt.dtype), vt, acc)

        # rows that saw no key: l = 0 -> zeros (torch SDPA's fully-masked-row result)
        inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        out = acc * inv_l[:, None]
        o_rows = O + b * s_ob + head * s_oh + qi.to(tl.int64) * s_ol
        tl.store(o_rows[:, None] + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def choose_config(batch: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype,
                  interpret: bool | None = None, n_sm: int = 132) -> dict:
    """Block sizes for one call (no autotuning: it cannot run under the interpreter).

    Interpreter: as few, as big programs as possible (its cost is programs x ops).
    GPU: measured on an H100 (torch 2.11, triton 3.6, bf16; 132 SMs, 228 KB shared memory).
    A BLOCK_M=128 tile wins once its grid fills the chip; below that (batch-1 decoding) the
    BLOCK_M=64 tile with twice the programs wins. Key tiles of 32-64 rows; for D=512 the P.V
    accumulator is split into two 256-wide programs and Q.K^T summed in 64/128-wide slices
    (a full 512-wide accumulator or 64-key tiles run out of registers / shared memory).
    """
    if interpret is None:
        interpret = interpreting()
    rows = lq * (hq // hkv)
    if interpret:
        return dict(BLOCK_M=max(16, min(128, _next_pow2(rows))),
                    BLOCK_N=max(16, min(128, _next_pow2(lk))),
                    BLOCK_DK=d, BLOCK_DV=d, num_warps=4, num_stages=1)
    if torch.finfo(dtype).bits > 16:  # fp32 (IEEE dots): tiles twice the bytes; correctness path
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=min(d, 64), BLOCK_DV=min(d, 128),
                    num_warps=4, num_stages=2)
    dv = min(d, 256)
    grid128 = -(-rows // 128) * batch * hkv * (d // dv)
    if d <= 128:
        return dict(BLOCK_M=128 if grid128 >= n_sm // 2 else 64, BLOCK_N=64, BLOCK_DK=d,
                    BLOCK_DV=d, num_warps=4, num_stages=3)
    if d <= 256:
        if grid128 >= n_sm // 2:  # batch >= 4 decoding, encoder prefill: 115 us at B=8
            return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_DK=d, BLOCK_DV=d, num_warps=8,
                        num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=d, BLOCK_DV=d, num_warps=4, num_stages=3)
    if grid128 >= n_sm:  # D=512, big grids
        return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_DK=64, BLOCK_DV=dv, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_DK=128, BLOCK_DV=dv, num_warps=4, num_stages=3)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _triton_supported(q, k, v) -> bool:
    d = q.shape[-1]
    return (HAS_TRITON and d >= 16 and d & (d - 1) == 0 and v.shape[-1] == d
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[1] % k.shape[1] == 0)


def attention_triton(q, k, v, *, q_pos, k_pos, key_valid=None, causal=False, window=None,
                     config: dict | None = None):
    """The Triton path. `config` overrides block sizes (keys as `choose_config` returns)."""
    if not _triton_supported(q, k, v):
        raise ValueError(
            "triton attention needs triton, a power-of-two head dim >= 16 shared by q/k/v, "
            f"fp16/bf16/fp32 and Hq % Hkv == 0; got q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    from dgplug.ops import key_valid_rows

    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    key_valid = key_valid_rows(key_valid, batch, lk)
    assert k.shape == (batch, hkv, lk, d) and v.shape == k.shape, (q.shape, k.shape, v.shape)
    assert k.dtype == q.dtype and v.dtype == q.dtype, (q.dtype, k.dtype, v.dtype)
    out = torch.empty((batch, hq, lq, d), device=q.device, dtype=q.dtype)
    if lq == 0:
        return out
    if lk == 0:
        return out.zero_()
    interpret = interpreting()
    cfg = choose_config(batch, hq, hkv, lq, lk, d, q.dtype, interpret, _sm_count(q.device))
    if config:
        cfg.update(config)
    assert d % cfg["BLOCK_DK"] == 0 and d % cfg["BLOCK_DV"] == 0, cfg

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q_pos = q_pos.to(device=q.device).contiguous()
    k_pos = k_pos.to(device=q.device).contiguous()
    assert q_pos.shape == (lq,) and k_pos.shape == (lk,), (q_pos.shape, k_pos.shape)
    if key_valid is not None:
        kvalid = key_valid.to(device=q.device).contiguous().view(torch.uint8)
        s_valb = kvalid.stride(0) if kvalid.shape[0] == batch else 0  # [1, Lk]: one row for all
    else:
        kvalid, s_valb = k_pos, 0  # never read

    group = hq // hkv
    grid = (triton.cdiv(lq * group, cfg["BLOCK_M"]), batch * hkv, d // cfg["BLOCK_DV"])
    _attn_fwd_kernel[grid](
        q, k, v, out, q_pos, k_pos, kvalid,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        s_valb,
        hkv, lq, lk, int(window) if window is not None else 0,
        GROUP=group, D=d,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_DK=cfg["BLOCK_DK"], BLOCK_DV=cfg["BLOCK_DV"],
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_VALID=key_valid is not None,
        UPCAST=q.dtype == torch.float32 or (interpret and q.dtype == torch.bfloat16),
        IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def attention(q, k, v, *, q_pos, k_pos, key_valid=None, causal=False, window=None, impl=None):
    """Canvas / encoder attention; see the module docstring for the contract."""
    if pick_impl(q, impl, _triton_supported(q, k, v)) == "triton":
        return attention_triton(q, k, v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid,
                                causal=causal, window=window)
    return attention_torch(q, k, v, q_pos=q_pos, k_pos=k_pos, key_valid=key_valid,
                           causal=causal, window=window)
