"""The fused head + sampler step of DiffusionGemma: one streaming pass over the vocabulary.

Every denoising step turns the decoder's final normed hidden states h [N, D] (N = batch x
canvas positions) into: a sampled token, the argmax token, the entropy of the step's
distribution, and the soft embedding that self-conditions the next step. transformers does this
through full logits [N, V] in fp32 plus about five temporaries of that size; here the vocabulary
is walked in tiles and no [N, V] tensor ever exists.

Per row n and vocabulary entry v (E the tied embedding [V, D], T the step temperature):

    logit_v = softcap * tanh((h_n . E_v in fp32) / softcap)      softcap = 30
    l_v     = logit_v / T
    argmax  = first v with the largest l_v (torch.argmax's tie rule)
    entropy = -sum_v p_v log p_v,  p = softmax(l)                (nats, fp32)
    token   = argmax_v (l_v + g_v),  g_v = -log(-log u_v)         (Gumbel-max: a draw from p)
    soft    = sum_v softmax(l')_v E_v,  l' = l rounded to E's dtype (fp32 [N, D]; not scaled
              by sqrt(D): the caller does that, as transformers does after its matmul)

u_v comes from a counter-based hash of (seed, step, row index, v), so the sampled token does
not depend on the tile size, the grid, the vocabulary split or the implementation. The
normaliser, the entropy and the soft embedding are accumulated with an online log-sum-exp:
a running max m per row and sums relative to it, rescaled when m moves (flash-attention style):

    z  = sum exp(l - m)              z' = sum exp(l' - m)
    t1 = sum exp(l - m) (l - m)      entropy = log z - t1 / z
    s  = sum exp(l' - m) E_v         soft    = s / z'

Three implementations, one semantics:
  * `_head_sample_triton`: the Triton kernel (grid over row blocks x vocabulary splits) and a
    small torch combine of the per-split partial results;
  * `_head_sample_torch`: the CPU path, chunked over rows and vocabulary tiles (bounded memory)
    and vectorised; the Gumbel noise is hashed only for the few entries that can still win;
  * `head_sample_reference`: the plain unfused twin over full logits, for tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:  # Triton is optional: the torch path serves CPUs and machines without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = [
    "HeadSample",
    "head_sample",
    "head_sample_reference",
    "canvas_row_keys",
    "counter_uniform",
]

SOFTCAP = 30.0
_MASK32 = 0xFFFFFFFF
# Gumbel noise bounds implied by u in [2^-24, 1 - 2^-24]: g in [-2.8115, 16.6355].
_GUMBEL_MAX = 16.64
_GUMBEL_MIN = -2.82
_CANDIDATE_MARGIN = 1e-2  # slack for fp32 rounding of l + g when pruning candidates
_LAZY_RESCALE = 8.0  # torch path: move the reference max only when it grows by more than this


@dataclass
class HeadSample:
    """One sampler step's results for N rows (canvas positions)."""

    token: torch.Tensor  # [N] long: the sampled token
    argmax: torch.Tensor  # [N] long: argmax of the temperature-scaled logits
    entropy: torch.Tensor  # [N] fp32: entropy of softmax(l), nats
    soft: torch.Tensor | None  # [N, D] fp32: softmax(l rounded to E's dtype) @ E, unscaled


# --------------------------------------------------------------------------------------------
# Counter-based random numbers: the same bits from torch (int64 with masking) and Triton (uint32)
# --------------------------------------------------------------------------------------------

_GOLDEN = 0x9E3779B1
_FMIX_1 = 0x85EBCA6B
_FMIX_2 = 0xC2B2AE35
_STEP_MUL = 0x632BE5AB
_ROW_MUL = 0x85157AF5


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (hi + x * (c & 0xFFFF)) & _MASK32


def _fmix32_torch(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX_1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX_2)
    return x ^ (x >> 16)


def canvas_row_keys(seed: int, step: int, rows: int, row_offset: int = 0, device=None) -> torch.Tensor:
    """Per-row RNG keys [rows] (int64 holding uint32) for (seed, step, row_offset + i)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    step = int(step) & _MASK32
    base = torch.tensor([seed & _MASK32, seed >> 32, step], dtype=torch.int64, device=device)
    k = _fmix32_torch(base[0:1] ^ _fmix32_torch((base[1:2] + _GOLDEN) & _MASK32))
    k = _fmix32_torch(k ^ _fmix32_torch(_mul32(base[2:3], _STEP_MUL) ^ 0x5BD1E995))
    row = (torch.arange(rows, dtype=torch.int64, device=device) + int(row_offset)) & _MASK32
    return _fmix32_torch(k ^ _fmix32_torch(_mul32(row, _ROW_MUL) ^ 0x27D4EB2F))


def counter_uniform(keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """u in [2^-24, 1 - 2^-24] (strictly inside (0, 1)) for broadcastable keys and vocab ids."""
    x = _fmix32_torch(_mul32(vocab_ids.to(torch.int64), _GOLDEN) ^ keys)
    x = _fmix32_torch((x + keys) & _MASK32)
    return ((x >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _row_temperature(temperature, n: int, device) -> torch.Tensor:
    """The temperature as fp32 [N] (a python float or a per-row tensor)."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"temperature has {t.numel()} values for {n} rows")
        return t.contiguous()
    return torch.full((n,), float(temperature), dtype=torch.float32, device=device)


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) rounded to `dtype` (round to nearest even) and back to fp32."""
    return x if dtype == torch.float32 else x.to(dtype).float()


def _check(h: torch.Tensor, embedding: torch.Tensor):
    if h.dim() != 2 or embedding.dim() != 2 or h.shape[1] != embedding.shape[1]:
        raise ValueError(f"head_sample wants h [N, D] and embedding [V, D]; got {tuple(h.shape)}, "
                         f"{tuple(embedding.shape)}")
    if embedding.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported embedding dtype {embedding.dtype}")


# --------------------------------------------------------------------------------------------
# The plain unfused twin (full logits; the semantics every other path must reproduce)
# --------------------------------------------------------------------------------------------


def head_sample_reference(h, embedding, *, softcap=SOFTCAP, temperature=1.0, seed=0, step=0, row_offset=0,
                          want_soft=True, impl=None, vocab_tile=None) -> HeadSample:
    """Full [N, V] logits, then every output exactly as defined in the module docstring."""
    _check(h, embedding)
    n = h.shape[0]
    logits = h.float() @ embedding.float().T
    logits = torch.tanh(logits / softcap) * softcap
    l = logits / _row_temperature(temperature, n, h.device)[:, None]
    argmax = torch.argmax(l, dim=-1)
    logp = torch.log_softmax(l, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    keys = canvas_row_keys(seed, step, n, row_offset, device=h.device)
    vocab = torch.arange(embedding.shape[0], device=h.device)
    token = torch.argmax(l + _gumbel(counter_uniform(keys[:, None], vocab[None, :])), dim=-1)
    soft = None
    if want_soft:
        p = torch.softmax(l.to(embedding.dtype), dim=-1, dtype=torch.float32)
        soft = p @ embedding.float()
    return HeadSample(token=token, argmax=argmax, entropy=entropy.float(), soft=soft)


# --------------------------------------------------------------------------------------------
# The torch path: chunked over rows and vocabulary tiles, vectorised, bounded memory
# --------------------------------------------------------------------------------------------

_TORCH_VOCAB_TILE = 512
_TORCH_ROWS_CHUNK = 512


def _head_sample_torch(h, embedding, *, softcap, temperature, seed, step, row_offset, want_soft,
                       vocab_tile=None, rows_chunk=None) -> HeadSample:
    """Streaming CPU path: row chunks outside, vocabulary tiles inside. Transient memory: one
    row chunk of h in fp32 [rows_chunk, D], one embedding tile in fp32 [vocab_tile, D] and a few
    [rows_chunk, vocab_tile] fp32 tiles (about 15 MiB at the defaults), plus the outputs."""
    n, d = h.shape
    vocab = embedding.shape[0]
    dev = h.device
    vt = int(vocab_tile or _TORCH_VOCAB_TILE)
    rc = int(rows_chunk or _TORCH_ROWS_CHUNK)
    temp = _row_temperature(temperature, n, dev)
    keys = canvas_row_keys(seed, step, n, row_offset, device=dev)
    exact_soft = embedding.dtype == torch.float32
    token = torch.empty(n, dtype=torch.long, device=dev)
    argmax = torch.empty(n, dtype=torch.long, device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev)
    soft = torch.zeros(n, d, dtype=torch.float32, device=dev) if want_soft else None

    for r0 in range(0, n, rc):
        r1 = min(r0 + rc, n)
        rows = r1 - r0
        h_rows = h[r0:r1].float()
        t_rows = temp[r0:r1, None]
        k_rows = keys[r0:r1]
        soft_rows = soft[r0:r1] if want_soft else None
        f32 = dict(dtype=torch.float32, device=dev)
        m = torch.full((rows,), float("-inf"), **f32)  # reference max; may trail the true max by <= 8
        z = torch.zeros(rows, **f32)  # sum exp(l - m)
        t1 = torch.zeros(rows, **f32)  # sum exp(l - m) (l - m)
        z_soft = torch.zeros(rows, **f32)  # sum exp(l' - m)
        top_val = torch.full((rows,), float("-inf"), **f32)
        top_idx = torch.zeros(rows, dtype=torch.long, device=dev)
        best_score = torch.full((rows,), float("-inf"), **f32)
        best_tok = torch.zeros(rows, dtype=torch.long, device=dev)

        for v0 in range(0, vocab, vt):
            v1 = min(v0 + vt, vocab)
            e_tile = embedding[v0:v1].float()
            # logits tile -> softcap -> temperature, in place: one [rows, vt] fp32 tile
            l = torch.mm(h_rows, e_tile.T)
            l.div_(softcap).tanh_().mul_(softcap).div_(t_rows)
            tile_max, tile_arg = l.max(dim=1)
            better = tile_max > top_val  # strict: the first index wins ties
            top_val = torch.where(better, tile_max, top_val)
            top_idx = torch.where(better, tile_arg + v0, top_idx)

            # lazy online rescale: move the reference max only when it grows by > _LAZY_RESCALE
            grow = tile_max > m + _LAZY_RESCALE
            if bool(grow.any()):
                m_new = torch.where(grow, tile_max, m)
                first = torch.isinf(m)
                alpha = torch.where(first, torch.zeros_like(m), torch.exp(m - m_new))
                delta = torch.where(first, torch.zeros_like(m), m - m_new)
                t1 = alpha * (t1 + delta * z)
                z = alpha * z
                z_soft = alpha * z_soft
                if want_soft:
                    soft_rows.mul_(alpha[:, None])
                m = m_new

            # Gumbel-max, hashing only the entries that can still beat the row's best score
            floor = torch.maximum(best_score, tile_max + _GUMBEL_MIN)
            ri, ci = (l >= (floor - (_GUMBEL_MAX + _CANDIDATE_MARGIN))[:, None]).nonzero(as_tuple=True)
            score = l[ri, ci] + _gumbel(counter_uniform(k_rows[ri], ci + v0))
            tile_best = torch.full((rows,), float("-inf"), **f32).scatter_reduce_(0, ri, score, "amax")
            win = score == tile_best[ri]
            tile_tok = torch.full((rows,), vocab, dtype=torch.long, device=dev)
            tile_tok.scatter_reduce_(0, ri[win], ci[win] + v0, "amin")
            better = tile_best > best_score
            best_score = torch.where(better, tile_best, best_score)
            best_tok = torch.where(better, tile_tok, best_tok)

            # soft embedding numerator from l rounded to the table's dtype (as transformers)
            if want_soft and not exact_soft:
                p_soft = _round_to(l, embedding.dtype).sub_(m[:, None]).exp_()
                z_soft += p_soft.sum(1)
                soft_rows.addmm_(p_soft, e_tile)
                del p_soft

            # normaliser and entropy terms (l becomes l - m in place)
            dl = l.sub_(m[:, None])
            p = torch.exp(dl)
            z += p.sum(1)
            t1 += torch.bmm(p.unsqueeze(1), dl.unsqueeze(2)).view(-1)
            if want_soft and exact_soft:
                z_soft += p.sum(1)
                soft_rows.addmm_(p, e_tile)
            del l, p, dl, e_tile

        token[r0:r1] = best_tok
        argmax[r0:r1] = top_idx
        entropy[r0:r1] = torch.log(z) - t1 / z
        if want_soft:
            soft_rows.div_(z_soft[:, None])
    return HeadSample(token=token, argmax=argmax, entropy=entropy, soft=soft)


# --------------------------------------------------------------------------------------------
# The Triton kernel
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _fmix32(x):
        x = x ^ (x >> 16)
        x = x * 0x85EBCA6B
        x = x ^ (x >> 13)
        x = x * 0xC2B2AE35
        return x ^ (x >> 16)

    @triton.jit
    def _counter_uniform(keys, vocab_ids):
        """uint32 keys and vocab ids (broadcastable) -> u in [2^-24, 1 - 2^-24] as fp32."""
        x = _fmix32((vocab_ids * 0x9E3779B1) ^ keys)
        x = _fmix32(x + keys)
        return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07

    @triton.jit
    def _tanh(x):
        """tanh in fp32 from exp (Triton core has no tanh); a series near 0 avoids cancellation."""
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        x2 = ax * ax
        small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
        t = tl.where(ax < 0.125, small, big)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _uniform_kernel(key_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
        """Test helper: out[row, v] = counter uniform for (key[row], v)."""
        row = tl.program_id(0)
        key = tl.load(key_ptr + row).to(tl.uint32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            u = _counter_uniform(key, cols.to(tl.uint32))
            tl.store(out_ptr + row * V + cols, u, mask=cols < V)

    @triton.jit
    def _head_sample_kernel(
        h_ptr, e_ptr, temp_ptr, key_ptr,
        stats_ptr,  # fp32 [6, S, N]: m, z, z_soft, t1, top_val, best_score
        index_ptr,  # int32 [2, S, N]: top_idx, best_tok
        soft_ptr,  # fp32 [S, N, D]: unnormalised soft embedding of each split (zero-filled)
        N, V, D, stride_h, stride_e, split_len, softcap,
        ROUND_BF16: tl.constexpr, ROUND_F16: tl.constexpr, DOT_FP32: tl.constexpr,
        WANT_SOFT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        temp = tl.load(temp_ptr + rows, mask=row_ok, other=1.0)
        keys = tl.load(key_ptr + rows, mask=row_ok, other=0).to(tl.uint32)
        offs_v = tl.arange(0, BLOCK_V)
        offs_d = tl.arange(0, BLOCK_D)
        v_start = pid_s * split_len
        v_end = tl.minimum(v_start + split_len, V)

        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK_N], tl.float32)
        z_soft = tl.zeros([BLOCK_N], tl.float32)
        t1 = tl.zeros([BLOCK_N], tl.float32)
        top_val = tl.full([BLOCK_N], float("-inf"), tl.float32)
        top_idx = tl.zeros([BLOCK_N], tl.int32)
        best_score = tl.full([BLOCK_N], float("-inf"), tl.float32)
        best_tok = tl.zeros([BLOCK_N], tl.int32)
        soft_rows = soft_ptr + (pid_s * N + rows64)[:, None] * D

        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + offs_v
            col_ok = cols < v_end
            cols64 = cols.to(tl.int64)
            # logits tile [BLOCK_N, BLOCK_V] = h @ E_tile^T, fp32 accumulation over D
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                d_ok = dd < D
                h_t = tl.load(h_ptr + rows64[:, None] * stride_h + dd[None, :],
                              mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                e_t = tl.load(e_ptr + cols64[None, :] * stride_e + dd[:, None],
                              mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                if DOT_FP32:
                    acc = tl.dot(h_t.to(tl.float32), e_t.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(h_t, e_t, acc)
            l = softcap * _tanh(acc / softcap) / temp[:, None]
            l = tl.where(col_ok[None, :], l, float("-inf"))

            # argmax (first index on ties: a later tile must be strictly larger)
            t_max = tl.max(l, axis=1)
            t_arg = tl.argmax(l, axis=1).to(tl.int32) + v0
            better = t_max > top_val
            top_idx = tl.where(better, t_arg, top_idx)
            top_val = tl.where(better, t_max, top_val)

            # Gumbel-max sample from the counter-based uniforms
            u = _counter_uniform(keys[:, None], cols[None, :].to(tl.uint32))
            score = tl.where(col_ok[None, :], l - tl.log(-tl.log(u)), float("-inf"))
            s_max = tl.max(score, axis=1)
            s_arg = tl.argmax(score, axis=1).to(tl.int32) + v0
            better = s_max > best_score
            best_tok = tl.where(better, s_arg, best_tok)
            best_score = tl.where(better, s_max, best_score)

            # online log-sum-exp, entropy terms, rescaled when the max moves
            m_new = tl.maximum(m, t_max)
            first = m == float("-inf")
            alpha = tl.where(first, 0.0, tl.exp(m - m_new))
            delta = tl.where(first, 0.0, m - m_new)
            dl = tl.where(col_ok[None, :], l - m_new[:, None], 0.0)
            p = tl.where(col_ok[None, :], tl.exp(dl), 0.0)
            t1 = alpha * (t1 + delta * z) + tl.sum(p * dl, axis=1)
            z = alpha * z + tl.sum(p, axis=1)
            m = m_new

            if WANT_SOFT:
                # l rounded to the table's dtype (round to nearest even, done on the bits)
                if ROUND_BF16:
                    bits = l.to(tl.uint32, bitcast=True)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                    l_soft = bits.to(tl.float32, bitcast=True)
                elif ROUND_F16:
                    l_soft = l.to(tl.float16).to(tl.float32)
                else:
                    l_soft = l
                p_soft = tl.where(col_ok[None, :], tl.exp(tl.where(col_ok[None, :], l_soft - m_new[:, None], 0.0)), 0.0)
                z_soft = alpha * z_soft + tl.sum(p_soft, axis=1)
                # soft accumulator [BLOCK_N, D] lives in this split's fp32 scratch, D-chunked
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + offs_d
                    d_ok = dd < D
                    e_t = tl.load(e_ptr + cols64[:, None] * stride_e + dd[None, :],
                                  mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    if DOT_FP32:
                        contrib = tl.dot(p_soft, e_t.to(tl.float32), input_precision="ieee")
                    else:
                        contrib = tl.dot(p_soft.to(e_t.dtype), e_t)
                    s_ptr = soft_rows + dd[None, :]
                    s_ok = row_ok[:, None] & d_ok[None, :]
                    s_acc = tl.load(s_ptr, mask=s_ok, other=0.0)
                    tl.store(s_ptr, s_acc * alpha[:, None] + contrib, mask=s_ok)

        out = pid_s * N + rows
        step = n_splits * N
        tl.store(stats_ptr + out, m, mask=row_ok)
        tl.store(stats_ptr + step + out, z, mask=row_ok)
        tl.store(stats_ptr + 2 * step + out, z_soft, mask=row_ok)
        tl.store(stats_ptr + 3 * step + out, t1, mask=row_ok)
        tl.store(stats_ptr + 4 * step + out, top_val, mask=row_ok)
        tl.store(stats_ptr + 5 * step + out, best_score, mask=row_ok)
        tl.store(index_ptr + out, top_idx, mask=row_ok)
        tl.store(index_ptr + step + out, best_tok, mask=row_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] uniforms from the Triton hash (for the torch/Triton agreement test)."""
    out = torch.empty(keys.numel(), vocab, dtype=torch.float32, device=keys.device)
    _uniform_kernel[(keys.numel(),)](keys.contiguous(), out, vocab, BLOCK_V=128)
    return out


def _head_sample_triton(h, embedding, *, softcap, temperature, seed, step, row_offset, want_soft,
                        vocab_tile=None, splits=None, block_n=None, block_d=None) -> HeadSample:
    """Launch the kernel over (row blocks x vocabulary splits), then combine the splits."""
    if triton is None:
        raise RuntimeError("head_sample(impl='triton') needs triton")
    n, d = h.shape
    vocab = embedding.shape[0]
    dev = h.device
    h = h.contiguous()
    embedding = embedding.contiguous()
    interp = _interpreting()
    block_v = int(vocab_tile or 128)
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError("vocab_tile for the Triton path must be a power of two >= 16")
    block_n = int(block_n or (min(64, max(16, triton.next_power_of_2(n))) if interp else 64))
    block_d = int(block_d or 64)
    row_blocks = triton.cdiv(n, block_n)
    vocab_tiles = triton.cdiv(vocab, block_v)
    if splits is None:
        if interp or not h.is_cuda:
            splits = 1
        else:  # enough programs to fill the GPU twice over
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            splits = max(1, min(vocab_tiles, triton.cdiv(2 * sms, row_blocks)))
    split_len = triton.cdiv(vocab_tiles, int(splits)) * block_v
    splits = triton.cdiv(vocab, split_len)  # no empty split

    temp = _row_temperature(temperature, n, dev)
    keys = canvas_row_keys(seed, step, n, row_offset, device=dev)
    stats = torch.empty(6, splits, n, dtype=torch.float32, device=dev)
    index = torch.empty(2, splits, n, dtype=torch.int32, device=dev)
    scratch = torch.zeros(splits if want_soft else 1, n if want_soft else 1, d if want_soft else 1,
                          dtype=torch.float32, device=dev)
    # 16-bit operands go to the tensor cores when h and E share the dtype; the interpreter's
    # bf16 arithmetic is wrong, so there everything is converted to fp32 right after loading.
    same16 = h.dtype == embedding.dtype and h.dtype in (torch.float16, torch.bfloat16)
    dot_fp32 = interp or not same16
    _head_sample_kernel[(row_blocks, splits)](
        h, embedding, temp, keys, stats, index, scratch,
        n, vocab, d, h.stride(0), embedding.stride(0), split_len, float(softcap),
        ROUND_BF16=embedding.dtype == torch.bfloat16, ROUND_F16=embedding.dtype == torch.float16,
        DOT_FP32=dot_fp32, WANT_SOFT=bool(want_soft),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=4 if interp else 8,
    )
    m_s, z_s, zs_s, t1_s, top_s, best_s = stats.unbind(0)
    m = m_s.max(0).values
    w = torch.exp(m_s - m)
    z = (w * z_s).sum(0)
    t1 = (w * (t1_s + (m_s - m) * z_s)).sum(0)
    entropy = torch.log(z) - t1 / z
    # torch.argmax returns the first split on ties: the lowest vocabulary ids win
    rows = torch.arange(n, device=dev)
    argmax = index[0][torch.argmax(top_s, 0), rows].long()
    token = index[1][torch.argmax(best_s, 0), rows].long()
    soft = None
    if want_soft:
        ws = w / (w * zs_s).sum(0)
        soft = torch.einsum("sn,snd->nd", ws, scratch) if splits > 1 else scratch[0] * ws[0, :, None]
    return HeadSample(token=token, argmax=argmax, entropy=entropy, soft=soft)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _pick_impl(h: torch.Tensor, impl: str | None) -> str:
    impl = impl or os.environ.get("DGPLUG_KERNELS") or None
    if impl is None:
        return "triton" if (h.is_cuda and triton is not None) else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
    return impl


def head_sample(h, embedding, *, softcap=SOFTCAP, temperature=1.0, seed=0, step=0, row_offset=0,
                want_soft=True, impl=None, vocab_tile=None) -> HeadSample:
    """The fused head + sampler step for hidden states h [N, D] and the tied embedding [V, D].

    temperature: python float or fp32 tensor [N] (per row). seed/step/row_offset key the
    counter-based RNG (row i uses row_offset + i), so a batch processed in chunks samples the
    same tokens. impl: None (Triton on CUDA when importable, else torch; the environment
    variable DGPLUG_KERNELS=torch|triton overrides), "torch" or "triton". vocab_tile: the
    vocabulary tile (a power of two for Triton); results other than float rounding do not
    depend on it.
    """
    _check(h, embedding)
    kw = dict(softcap=softcap, temperature=temperature, seed=seed, step=step, row_offset=row_offset,
              want_soft=want_soft, vocab_tile=vocab_tile)
    if _pick_impl(h, impl) == "triton":
        return _head_sample_triton(h, embedding, **kw)
    return _head_sample_torch(h, embedding, **kw)
