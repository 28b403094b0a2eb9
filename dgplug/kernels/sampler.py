"""The fused head + sampler step of DiffusionGemma: one streaming pass over the vocabulary.

Every denoising step turns the decoder's final normed hidden states h [N, D] (N = batch x
canvas positions) into: a sampled token, the argmax token, the entropy of the step's
distribution, and the soft embedding that self-conditions the next step. transformers does this
through full logits [N, V] in fp32 plus about five temporaries of that size; here the vocabulary
is walked in tiles and no [N, V] tensor ever exists.

Per row n and vocabulary entry v (E the tied embedding [V, D], T the step temperature):

    logit_v = softcap * tanh((h_n . E_v in fp32) / softcap)      softcap = 30
    l_v     = logit_v / max(T, softcap * 2^-90)               (T = 0: the T -> 0 limit, see TEMP_FLOOR)
    argmax  = first v with the largest l_v (torch.argmax's tie rule)
    entropy = -sum_v p_v log p_v,  p = softmax(l)                (nats, fp32)
    token   = argmax_v (l_v + g_v),  g_v = -log(-log u_v)         (Gumbel-max: a draw from p)
    soft    = sum_v softmax(l')_v E_v,  l' = l rounded to E's dtype (fp32 [N, D]; not scaled
              by sqrt(D): the caller does that, as transformers does after its matmul; an fp16
              table: l itself where the rounding overflows, _fp16_overflow)

u_v comes from a counter-based hash of (seed, step, row index, v), so the sampled token does
not depend on the tile size, the grid, the vocabulary split or the implementation. The
normaliser, the entropy and the soft embedding are accumulated with an online log-sum-exp:
a running max m per row and sums relative to it, rescaled when m moves (flash-attention style):

    z  = sum exp(l - m)              z' = sum exp(l' - m')
    t1 = sum exp(l - m) (l - m)      entropy = log z - t1 / z
    s  = sum exp(l' - m') E_v        soft    = s / z'

m' is m rounded to E's dtype as l' is, and m also moves when the rounded maxima outgrow m' (at a
tiny temperature a 16-bit rounding step of l can exceed 88: exp(l' - m) was inf, soft NaN).

Three implementations, one semantics:
  * `_head_sample_triton` (GPU): the vocabulary in chunks; per chunk two fp32-output tensor-core
    matmuls (cuBLAS: the logits, and the soft sum P @ E_c) around one Triton kernel that turns
    the chunk's logits into the running per-row state and the soft-embedding weights P. (A
    single fused kernel that kept the [rows, D] soft accumulator in global memory was 2-6x
    slower on an H200 and is gone.);
  * `_head_sample_torch`: the CPU path: row chunks as tasks for a few worker threads (torch
    ops single-threaded inside them), each walking the vocabulary in cache-sized tiles with a
    few dozen big ops per tile; bounded memory; Gumbel noise computed only for entries whose
    hash can still win;
  * `head_sample_reference`: the plain unfused twin over full logits, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import interpreting, pick_impl

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


def _fmix32_int(x: int) -> int:
    """_fmix32_torch on a python int (the per-call part of the key; no host-to-device copy, so
    the keys can be made inside a CUDA graph capture)."""
    x ^= x >> 16
    x = (x * _FMIX_1) & _MASK32
    x ^= x >> 13
    x = (x * _FMIX_2) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The seed's part of every RNG key (a python int holding uint32)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _fmix32_int((seed & _MASK32) ^ _fmix32_int(((seed >> 32) + _GOLDEN) & _MASK32))


def _with_rows(k, rows: int, row_offset: int, device) -> torch.Tensor:
    row = (torch.arange(rows, dtype=torch.int64, device=device) + int(row_offset)) & _MASK32
    return _fmix32_torch(k ^ _fmix32_torch(_mul32(row, _ROW_MUL) ^ 0x27D4EB2F))


def canvas_row_keys(seed: int, step: int, rows: int, row_offset: int = 0, device=None) -> torch.Tensor:
    """Per-row RNG keys [rows] (int64 holding uint32) for (seed, step, row_offset + i)."""
    step = int(step) & _MASK32
    k = _fmix32_int(seed_key(seed) ^ _fmix32_int(((step * _STEP_MUL) & _MASK32) ^ 0x5BD1E995))
    return _with_rows(k, rows, row_offset, device)


def canvas_row_keys_device(key: torch.Tensor, step: torch.Tensor, rows: int, row_offset: int = 0) -> torch.Tensor:
    """`canvas_row_keys` with seed_key(seed) and the step held in int64 device tensors [1]: the
    same bits, made on the device (a CUDA graph replays it with new seeds and steps)."""
    k = _fmix32_torch(key ^ _fmix32_torch(_mul32(step & _MASK32, _STEP_MUL) ^ 0x5BD1E995))
    return _with_rows(k, rows, row_offset, key.device)


def counter_tokens(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """One uniform token id in [0, vocab) per key: the canvas noise of the counter generator
    (a stream apart from the Gumbel draws made from the same keys)."""
    return _fmix32_torch(_fmix32_torch(keys ^ 0x3C6EF372) ^ 0x7F4A7C15) % vocab


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


# Temperatures below softcap * 2^-90, 0 included, act as that floor: the T -> 0 limit of every output
# (the argmax as token, zero entropy, the argmax's row as soft embedding; k tied maxima: log k, their
# mean), with l = logit / T finite: |l| <= 2^90, so l - m and the rescale's (m_old - m) * z (z < V e^8)
# stay finite in fp32. Plain division gave l = +-inf at T = 0 (and below ~8.8e-38): NaN entropy and
# soft embedding, and as argmax and token the first positive logit. transformers' generate never
# divides by 0 (its schedule's lowest temperature is (t_max - t_min) / N > 0, validated); at a tiny
# positive temperature its Categorical entropy, argmax and multinomial give this same limit.
TEMP_FLOOR = 2.0 ** -90  # times softcap


def _row_temperature(temperature, n: int, device, floor: float | None = None) -> torch.Tensor:
    """The temperature as fp32 [N] (a python float or a per-row tensor), at least `floor` if given."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"temperature has {t.numel()} values for {n} rows")
        return t.contiguous() if floor is None else t.clamp_min(floor)
    t = float(temperature)
    return torch.full((n,), t if floor is None else max(t, floor), dtype=torch.float32, device=device)


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) rounded to `dtype` (round to nearest even) and back to fp32; where fp16 overflows
    (|x| >= 65520), x itself (see _fp16_overflow)."""
    if dtype == torch.float32:
        return x
    r = x.to(dtype).float()
    return _fp16_overflow(r, x) if dtype == torch.float16 else r


def _fp16_overflow(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """l' = l rounded to an fp16 table's dtype, but l itself where the rounding overflowed: at a low
    temperature l = logit / T passes 65504 (T < 30 / 65504 = 4.6e-4 for a logit at the softcap; a
    generate with t_min = 0, t_max = 0.02 reaches it), l' was inf and the soft embedding NaN (inf - inf),
    then every hidden state of the next step. transformers is NaN there too (softmax of its fp16
    self-conditioning logits); wherever it is finite, this is its l'."""
    return torch.where(torch.isinf(r), x, r)


def _no_rows(h: torch.Tensor, want_soft: bool) -> HeadSample:
    """The result for h with no rows (N = 0), as the reference gives it."""
    empty = torch.empty(0, dtype=torch.long, device=h.device)
    return HeadSample(token=empty, argmax=empty.clone(), entropy=torch.empty(0, device=h.device),
                      soft=torch.empty(0, h.shape[1], device=h.device) if want_soft else None)


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
    l = logits / _row_temperature(temperature, n, h.device, abs(softcap) * TEMP_FLOOR)[:, None]
    argmax = torch.argmax(l, dim=-1)
    logp = torch.log_softmax(l, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    keys = canvas_row_keys(seed, step, n, row_offset, device=h.device)
    vocab = torch.arange(embedding.shape[0], device=h.device)
    token = torch.argmax(l + _gumbel(counter_uniform(keys[:, None], vocab[None, :])), dim=-1)
    soft = None
    if want_soft:
        p = torch.softmax(_round_to(l, embedding.dtype), dim=-1)
        soft = p @ embedding.float()
    return HeadSample(token=token, argmax=argmax, entropy=entropy.float(), soft=soft)


# --------------------------------------------------------------------------------------------
# The torch path: row chunks as tasks for a few worker threads (dgplug.threads.run_tasks), each
# walking the vocabulary in cache-sized tiles with single-threaded torch ops
# --------------------------------------------------------------------------------------------

# Measured (`python benchmarks/sampler.py --sweep --threads 1 [--fp32] --rows 256 512 --tiles
# 512 1024 2048 4096`: 512 rows, V=65536, D=256, CPU seconds, medians of 3 alternated; a 2-core
# AVX2 EPYC shared with other work, load average 10-11), rows x columns: fp32 table 256x512
# 1.87, 256x1024 1.49, 256x2048 1.43, 256x4096 1.41, 512x512 1.40, 512x1024 1.48, 512x2048 1.56,
# 512x4096 1.66; bf16 table 256x512 1.97, 256x1024 1.90, 256x2048 1.65, 256x4096 1.67, 512x512
# 1.67, 512x1024 1.49, 512x2048 1.75, 512x4096 2.02 (earlier sweeps: 16384 and 32768 columns
# 1.3x and 1.7x slower than 2048). Tiles of 2^19 entries (2 MiB per fp32 buffer; this CPU has
# 1 MiB of L2 per core and 32 MiB of L3) are the sweet spot: wider ones spill the ~35
# elementwise passes per tile out of the caches, narrower ones pay more for the per-tile
# bookkeeping and smaller matmuls. Rows per task: up to 512 (wider matmuls), fewer when that
# leaves a worker without a task (a batch of 2 on 2 threads: 2 tasks of 256 rows).
_TORCH_TILE = 1 << 19  # entries (rows x columns) per tile at most
_TORCH_ROWS_CHUNK = 512  # rows per task at most
_TORCH_BUDGET = 48 << 20  # bytes of tile buffers, all workers together


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 tensors holding uint32 values -> int32 with the same bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _signed32(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """_fmix32_torch in place on int32 tensors holding the uint32 bits: int32 multiplies wrap like
    uint32 ones, and a logical shift is an arithmetic shift with the sign bits masked off."""
    for shift, mul in ((16, _FMIX_1), (13, _FMIX_2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if mul is not None:
            x.mul_(_signed32(mul))
    return x


def _counter_hash_(x: torch.Tensor, tmp: torch.Tensor, keys: torch.Tensor, cols_golden: torch.Tensor) -> torch.Tensor:
    """The 32 hash bits behind counter_uniform(keys[:, None], cols[None, :]), computed in x
    (int32 [rows, w]); keys: int32 [rows], cols_golden: cols * _GOLDEN as int32 [w]."""
    torch.bitwise_xor(cols_golden[None, :], keys[:, None], out=x)
    _fmix32_(x, tmp)
    x.add_(keys[:, None])
    return _fmix32_(x, tmp)


def _uniform_(x: torch.Tensor, tmp: torch.Tensor, keys: torch.Tensor, cols_golden: torch.Tensor) -> torch.Tensor:
    """counter_uniform(keys[:, None], cols[None, :]) computed in x and returned as x's fp32 view:
    ((x >>> 9) + 0.5) * 2^-23 exactly, as the fp32 bits of 1 + (x >>> 9) * 2^-23, minus 1 - 2^-24."""
    _counter_hash_(x, tmp, keys, cols_golden)
    x.bitwise_right_shift_(9).bitwise_and_(0x7FFFFF).bitwise_or_(0x3F800000)
    return x.view(torch.float32).sub_(1.0 - 2.0 ** -24)


_SIGN32 = -(1 << 31)  # xor with it maps uint32 order onto int32 order


def _hash_floor(gap: torch.Tensor) -> torch.Tensor:
    """Per row, an int32 floor (in _SIGN32-flipped order) on the hash bits of any entry whose
    Gumbel noise g = -log(-log u) can reach `gap` (the row's best score minus the tile's largest
    l, less a rounding margin): g >= gap <=> u >= exp(-exp(-gap)) <=> (bits >>> 9) >= k. Four
    steps of k lower than that (fp32 rounding here never drops an entry; extras are checked)."""
    k = gap.neg().exp_().neg_().exp_().mul_(8388608.0).sub_(4.0).clamp_(0, 8388607).to(torch.int32)
    return k.bitwise_left_shift_(9).bitwise_xor_(_SIGN32)[:, None]


def _torch_tile(rows: int, d: int, dtype: torch.dtype, want_soft: bool, workers: int) -> int:
    """Columns per tile: the largest power of two with rows x columns <= _TORCH_TILE whose
    buffers fit the budget (at least 256): per worker, per column, three [rows] 4-byte tiles
    (logits, hash/probabilities, scratch), a bool one (candidates), a 16-bit one for l rounded
    to a 16-bit table, and the table's rows in fp32."""
    wide = dtype != torch.float32
    per_col = rows * (13 + (2 if wide and want_soft else 0)) + (4 * d if wide else 0)
    fit = max(1, min(_TORCH_BUDGET // (workers * per_col), _TORCH_TILE // rows))
    return max(256, 1 << (fit.bit_length() - 1))


def _take_better(x, tile_max, val, idx, v0):
    """Running (max, first argmax) per row after one more tile x [rows, w] with row maxima
    tile_max: only rows whose maximum beats the running one (strictly: the first index wins
    ties across tiles) need the index, and argmax (which picks the first index within the
    tile) is far slower than amax on the CPU, so it runs on those rows only; after the first
    tiles they are few (a new record in tile k of a row: 1 in k for exchangeable tiles)."""
    better = tile_max > val
    rows = better.nonzero().squeeze(1)
    if rows.numel() == 0:
        return val, idx
    arg = x.argmax(dim=1) if rows.numel() == x.shape[0] else x[rows].argmax(dim=1)
    idx = idx.index_put((rows,), arg + v0) if rows.numel() < x.shape[0] else arg + v0
    return torch.where(better, tile_max, val), idx


def _walk_vocabulary(h, embedding, temp, keys, cols_golden, softcap, want_soft, vt, out):
    """One row chunk's pass over the whole vocabulary: writes out = (token, argmax, entropy,
    soft) rows in place. Per tile, in a few reused buffers: one matmul for the logits; softcap
    and temperature in place (the reference's four roundings); one amax (argmax only for the
    rows it improves); the counter hash of every entry, in place on int32 (23 ops); from the
    second tile on, one compare against a per-row floor on the hash and one nonzero give the few
    entries whose noise can lift the tile's largest logit past the row's best score, and only
    they get -log(-log u) (the first tile scores every entry); one exp and one sum for the
    normaliser, one product and one sum for the entropy, one matmul P @ E for the soft sum
    (16-bit tables: l rounded to the table's dtype, one more exp and sum)."""
    token, argmax, entropy, soft = out
    rows, d = h.shape
    vocab = embedding.shape[0]
    dev = h.device
    f32 = dict(dtype=torch.float32, device=dev)
    h = h.float()
    t = temp[:, None]
    exact_soft = embedding.dtype == torch.float32
    lbuf = torch.empty(rows * vt, **f32)
    ubuf = torch.empty(rows * vt, dtype=torch.int32, device=dev)
    sbuf = torch.empty(rows * vt, dtype=torch.int32, device=dev)
    mbuf = torch.empty(rows * vt, dtype=torch.bool, device=dev)
    rbuf = torch.empty(rows * vt, dtype=embedding.dtype, device=dev) if want_soft and not exact_soft else None
    ebuf = None if exact_soft else torch.empty(vt, d, **f32)
    m = torch.full((rows,), float("-inf"), **f32)  # reference max; may trail the true max by <= 8
    z = torch.zeros(rows, **f32)  # sum exp(l - m)
    t1 = torch.zeros(rows, **f32)  # sum exp(l - m) (l - m)
    z_soft = z if exact_soft else torch.zeros(rows, **f32)  # sum exp(l' - m_soft)
    m_soft = m  # m rounded to the table's dtype: the soft weights' reference (l' <= m_soft + 8)
    top_val = torch.full((rows,), float("-inf"), **f32)
    top_idx = torch.zeros(rows, dtype=torch.long, device=dev)
    best = torch.full((rows,), float("-inf"), **f32)
    best_tok = torch.zeros(rows, dtype=torch.long, device=dev)

    for v0 in range(0, vocab, vt):
        w = min(vt, vocab - v0)
        e = embedding[v0:v0 + w]
        if ebuf is not None:  # 16-bit table: this tile's rows in fp32, for both matmuls
            e = ebuf[:w].copy_(e)
        l = torch.mm(h, e.T, out=lbuf[: rows * w].view(rows, w))
        l.div_(softcap).tanh_().mul_(softcap).div_(t)  # the reference's order of roundings
        tile_max = l.amax(dim=1)
        top_val, top_idx = _take_better(l, tile_max, top_val, top_idx, v0)

        # Gumbel-max: score = l + g, g = -log(-log u), u from the counter hash of (row, column)
        scratch = sbuf[: rows * w].view(rows, w)
        bits = ubuf[: rows * w].view(rows, w)
        if v0 == 0:  # first tile: every entry is scored
            score = _uniform_(bits, scratch, keys, cols_golden[v0:v0 + w])
            score.log_().neg_().log_()
            torch.sub(l, score, out=score)
            best, best_tok = _take_better(score, score.amax(dim=1), best, best_tok, v0)
        else:  # then only entries whose u lifts the tile's largest l past the row's best
            _counter_hash_(bits, scratch, keys, cols_golden[v0:v0 + w]).bitwise_xor_(_SIGN32)
            floor = _hash_floor(best.sub(tile_max).sub_(_CANDIDATE_MARGIN))
            ri, ci = torch.ge(bits, floor, out=mbuf[: rows * w].view(rows, w)).nonzero(as_tuple=True)
            if ri.numel():
                # the candidates' u exactly as counter_uniform: flipping bit 31 of the hash flips
                # bit 22 of (hash >>> 9)
                k = bits[ri, ci].bitwise_right_shift_(9).bitwise_and_(0x7FFFFF).bitwise_xor_(0x400000)
                score = l[ri, ci] - k.float().add_(0.5).mul_(1.0 / 8388608.0).log_().neg_().log_()
                tile_best = best.clone().scatter_reduce_(0, ri, score, "amax")
                better = tile_best > best  # strictly: an earlier tile's winner keeps a tie
                if bool(better.any()):
                    win = score == tile_best[ri]  # in the rows that improve: the candidates at the top
                    tok = best_tok.new_full((rows,), vocab).scatter_reduce_(0, ri[win], ci[win] + v0, "amin")
                    best_tok = torch.where(better, tok, best_tok)
                    best = tile_best

        # lazy online rescale: move the reference max only when it grows by > _LAZY_RESCALE
        grow = tile_max > m + _LAZY_RESCALE
        if want_soft and not exact_soft:
            grow |= _round_to(tile_max, embedding.dtype) > m_soft + _LAZY_RESCALE
        if bool(grow.any()):
            m_new = torch.where(grow, tile_max, m)
            first = torch.isinf(m)
            alpha = torch.where(first, torch.zeros_like(m), torch.exp(m - m_new))
            delta = torch.where(first, torch.zeros_like(m), m - m_new)
            t1 = alpha * (t1 + delta * z)
            z = alpha * z
            if exact_soft:
                z_soft, m_soft, alpha_s = z, m_new, alpha
            else:
                ms_new = _round_to(m_new, embedding.dtype)
                alpha_s = torch.where(first, torch.zeros_like(m), torch.exp(m_soft - ms_new))
                z_soft, m_soft = alpha_s * z_soft, ms_new
            if want_soft:
                soft.mul_(alpha_s[:, None])
            m = m_new

        p = bits.view(torch.float32)  # the hash tile is free: probabilities go there
        if want_soft and not exact_soft:  # soft weights from l rounded to the table's dtype
            p.copy_(rbuf[: rows * w].view(rows, w).copy_(l))
            if embedding.dtype == torch.float16:
                torch.where(torch.isinf(p), l, p, out=p)
            p.sub_(m_soft[:, None]).exp_()
            z_soft += p.sum(1)
            soft.addmm_(p, e)
        dl = l.sub_(m[:, None])
        torch.exp(dl, out=p)
        z += p.sum(1)
        t1 += torch.mul(p, dl, out=scratch.view(torch.float32)).sum(1)
        if want_soft and exact_soft:
            soft.addmm_(p, e)

    token.copy_(best_tok)
    argmax.copy_(top_idx)
    entropy.copy_(torch.log(z) - t1 / z)
    if want_soft:
        soft.div_(z_soft[:, None])


def _head_sample_torch(h, embedding, *, softcap, temperature, seed, step, row_offset, want_soft,
                       vocab_tile=None, rows_chunk=None, workers=None, keys=None) -> HeadSample:
    """CPU path: the rows in chunks (tasks), each chunk walking the vocabulary in tiles. The
    chunks run on `workers` threads (default: torch's thread count) with single-threaded torch
    ops inside (dgplug.threads.run_tasks): no op-level parallel regions, so a core taken by
    another process slows one worker instead of stalling every op. Transient memory: per
    worker a few [rows_chunk, vocab_tile] tiles (and a 16-bit table's tile in fp32), within
    _TORCH_BUDGET (48 MiB) at any batch and width, plus the outputs. keys: per-row RNG keys
    [N] (int64 holding uint32) made beforehand; they replace seed/step/row_offset."""
    from dgplug.threads import run_tasks

    n, d = h.shape
    vocab = embedding.shape[0]
    dev = h.device
    if n == 0:
        return _no_rows(h, want_soft)
    workers = int(workers or (torch.get_num_threads() if dev.type == "cpu" else 1))
    rc = int(rows_chunk or min(_TORCH_ROWS_CHUNK, max(16, -(-n // workers))))
    chunks = [(r0, min(r0 + rc, n)) for r0 in range(0, n, rc)]
    workers = max(1, min(workers, len(chunks)))
    vt = int(min(vocab_tile or _torch_tile(min(rc, n), d, embedding.dtype, want_soft, workers), vocab))
    temp = _row_temperature(temperature, n, dev, abs(softcap) * TEMP_FLOOR)
    keys = _as_int32(canvas_row_keys(seed, step, n, row_offset, device=dev) if keys is None else keys)
    cols_golden = _as_int32(_mul32(torch.arange(vocab, dtype=torch.int64, device=dev), _GOLDEN))
    token = torch.empty(n, dtype=torch.long, device=dev)
    argmax = torch.empty(n, dtype=torch.long, device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev)
    soft = torch.zeros(n, d, dtype=torch.float32, device=dev) if want_soft else None

    def task(r0, r1):
        out = (token[r0:r1], argmax[r0:r1], entropy[r0:r1], soft[r0:r1] if want_soft else None)
        _walk_vocabulary(h[r0:r1], embedding, temp[r0:r1], keys[r0:r1], cols_golden, softcap, want_soft, vt, out)

    run_tasks([lambda c=c: task(*c) for c in chunks], workers)
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
    def _step_keys_kernel(key_ptr, step_ptr, keys_ptr, noise_ptr, rows, row_offset, vocab, BLOCK: tl.constexpr):
        """canvas_row_keys_device and counter_tokens in one launch: the step's per-row RNG keys
        (the seed's key and the step read from the device) and the re-noise token of each row."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < rows
        key = tl.load(key_ptr).to(tl.uint32)
        step = tl.load(step_ptr).to(tl.uint32)
        k = _fmix32(key ^ _fmix32((step * 0x632BE5AB) ^ 0x5BD1E995))
        row = (offs + row_offset).to(tl.uint32)
        keys = _fmix32(k ^ _fmix32((row * 0x85157AF5) ^ 0x27D4EB2F))
        tl.store(keys_ptr + offs, keys.to(tl.int64), mask=mask)
        noise = _fmix32(_fmix32(keys ^ 0x3C6EF372) ^ 0x7F4A7C15) % vocab.to(tl.uint32)
        tl.store(noise_ptr + offs, noise.to(tl.int64), mask=mask)

    @triton.jit
    def _scaled_logit(l_ptr, r64, W, cols, ok, softcap, temp):
        """The chunk's logits at `cols`: softcapped and divided by the temperature (0 where not ok)."""
        acc = tl.load(l_ptr + r64 * W + cols, mask=ok, other=0.0)
        return softcap * _tanh(acc / softcap) / temp

    @triton.jit
    def _round_soft(x, ROUND_BF16: tl.constexpr, ROUND_F16: tl.constexpr):
        """x (fp32) rounded to the table's dtype (nearest even) and back: l' of the soft weights."""
        if ROUND_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        elif ROUND_F16:  # x itself where fp16 overflows (_fp16_overflow)
            out = x.to(tl.float16).to(tl.float32)
            out = tl.where(tl.abs(out) == float("inf"), x, out)
        else:
            out = x
        return out

    @triton.jit
    def _sums_at(l, ok, m, ms, p_ptr, r64, W, cols, ROUND_BF16: tl.constexpr, ROUND_F16: tl.constexpr,
                 WANT_SOFT: tl.constexpr):
        """exp(l - m) and exp(l - m) (l - m) per entry (0 where not ok); with WANT_SOFT, also
        exp(l' - ms) for l rounded to the table's dtype (ms: the reference max m rounded so), stored
        to p as the chunk's soft weights."""
        dl = tl.where(ok, l - m, 0.0)
        p = tl.where(ok, tl.exp(dl), 0.0)
        ps = tl.zeros_like(p)
        if WANT_SOFT:
            l_soft = _round_soft(l, ROUND_BF16, ROUND_F16)
            ps = tl.where(ok, tl.exp(tl.where(ok, l_soft - ms, 0.0)), 0.0)
            tl.store(p_ptr + r64 * W + cols, ps.to(p_ptr.dtype.element_ty), mask=ok)
        return p, p * dl, ps

    @triton.jit
    def _chunk_stats_kernel(
        l_ptr,  # fp32 [N, W]: raw logits h @ E_chunk^T of this vocabulary chunk (row stride W)
        p_ptr,  # [N, W] in E's dtype: exp(l' - m_ref), the soft-embedding weights of the chunk
        soft_ptr,  # fp32 [N, D]: the soft sum so far, rescaled here when the reference moves
        temp_ptr, key_ptr,
        m_ptr, z_ptr, zs_ptr, t1_ptr, top_ptr, best_ptr,  # fp32 [N] running state, in place
        top_idx_ptr, best_tok_ptr,  # int32 [N] running state, in place
        W, D, v0, softcap, lazy,
        ROUND_BF16: tl.constexpr, ROUND_F16: tl.constexpr, WANT_SOFT: tl.constexpr,
        ONE_SWEEP: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One row's pass over one vocabulary chunk of precomputed logits. The sums need the
        row's reference max m, which moves only when the chunk beats it by more than `lazy`:
        so after the row's first chunk (ONE_SWEEP) they are taken against the current m in the
        same sweep as the maxima and the sample, and a second sweep redoes them only when the
        chunk moved m (rare after the first chunks; the same operations, so the same bits as
        two sweeps). The first chunk, or ONE_SWEEP off: maxima first, then the sums.
        The soft weights exp(l' - ms) are taken against ms = m rounded as l' is, and m also moves when
        the rounded chunk maximum beats ms by more than `lazy`: so no weight exceeds e^lazy even where
        a 16-bit table's rounding step is large (tiny temperatures: exp(l' - m) overflowed to inf)."""
        row = tl.program_id(0)
        r64 = row.to(tl.int64)
        temp = tl.maximum(tl.load(temp_ptr + row), softcap * 8.077935669463161e-28)  # the floor: softcap * 2^-90
        key = tl.load(key_ptr + row).to(tl.uint32)
        m_old = tl.load(m_ptr + row)
        ms_old = _round_soft(m_old, ROUND_BF16, ROUND_F16)
        first = m_old == float("-inf")
        early = ONE_SWEEP and not first  # the sums in the first sweep, against m_old
        offs = tl.arange(0, BLOCK_V)
        c_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        c_arg = tl.zeros([BLOCK_V], tl.int32)
        s_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_arg = tl.zeros([BLOCK_V], tl.int32)
        z_acc = tl.zeros([BLOCK_V], tl.float32)
        t_acc = tl.zeros([BLOCK_V], tl.float32)
        zs_acc = tl.zeros([BLOCK_V], tl.float32)
        for c0 in range(0, W, BLOCK_V):  # per lane: the first column wins ties (strict >)
            cols = c0 + offs
            ok = cols < W
            l = tl.where(ok, _scaled_logit(l_ptr, r64, W, cols, ok, softcap, temp), float("-inf"))
            better = l > c_max
            c_arg = tl.where(better, cols, c_arg)
            c_max = tl.where(better, l, c_max)
            u = _counter_uniform(key, (cols + v0).to(tl.uint32))
            score = tl.where(ok, l - tl.log(-tl.log(u)), float("-inf"))
            better = score > s_max
            s_arg = tl.where(better, cols, s_arg)
            s_max = tl.where(better, score, s_max)
            if early:
                p, pdl, ps = _sums_at(l, ok, m_old, ms_old, p_ptr, r64, W, cols, ROUND_BF16, ROUND_F16, WANT_SOFT)
                z_acc += p
                t_acc += pdl
                zs_acc += ps
        t_max = tl.max(c_max, axis=0)
        t_arg = tl.min(tl.where(c_max == t_max, c_arg, W), axis=0) + v0
        b_max = tl.max(s_max, axis=0)
        b_arg = tl.min(tl.where(s_max == b_max, s_arg, W), axis=0) + v0
        top = tl.load(top_ptr + row)
        if t_max > top:
            tl.store(top_ptr + row, t_max)
            tl.store(top_idx_ptr + row, t_arg)
        best = tl.load(best_ptr + row)
        if b_max > best:
            tl.store(best_ptr + row, b_max)
            tl.store(best_tok_ptr + row, b_arg)

        # move the reference max only when the chunk beats it by more than `lazy`
        moved = first | (t_max > m_old + lazy)
        if WANT_SOFT and (ROUND_BF16 or ROUND_F16):  # l' <= ms + lazy for the soft weights too
            moved = moved | (_round_soft(t_max, ROUND_BF16, ROUND_F16) > ms_old + lazy)
        m = tl.where(moved, t_max, m_old)
        ms = _round_soft(m, ROUND_BF16, ROUND_F16)
        alpha = tl.where(first, 0.0, tl.exp(m_old - m))
        alpha_s = tl.where(first, 0.0, tl.exp(ms_old - ms))
        delta = tl.where(first, 0.0, m_old - m)
        if moved or not early:  # the sums (again) against the new m
            z_acc = tl.zeros([BLOCK_V], tl.float32)
            t_acc = tl.zeros([BLOCK_V], tl.float32)
            zs_acc = tl.zeros([BLOCK_V], tl.float32)
            for c0 in range(0, W, BLOCK_V):
                cols = c0 + offs
                ok = cols < W
                l = _scaled_logit(l_ptr, r64, W, cols, ok, softcap, temp)
                p, pdl, ps = _sums_at(l, ok, m, ms, p_ptr, r64, W, cols, ROUND_BF16, ROUND_F16, WANT_SOFT)
                z_acc += p
                t_acc += pdl
                zs_acc += ps
        z_old = tl.load(z_ptr + row)
        tl.store(m_ptr + row, m)
        tl.store(z_ptr + row, alpha * z_old + tl.sum(z_acc, axis=0))
        tl.store(t1_ptr + row, alpha * (tl.load(t1_ptr + row) + delta * z_old) + tl.sum(t_acc, axis=0))
        tl.store(zs_ptr + row, alpha_s * tl.load(zs_ptr + row) + tl.sum(zs_acc, axis=0))
        if WANT_SOFT:
            if alpha_s != 1.0:
                for d0 in range(0, D, BLOCK_V):
                    dd = d0 + offs
                    sp = soft_ptr + r64 * D + dd
                    tl.store(sp, tl.load(sp, mask=dd < D, other=0.0) * alpha_s, mask=dd < D)


def step_keys(key: torch.Tensor, step: torch.Tensor, rows: int, vocab: int, row_offset: int = 0, *,
              impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas_row_keys_device(key, step, rows, row_offset), counter_tokens(those keys, vocab)):
    a denoise step's RNG keys and re-noise tokens, int64 [rows]; one launch on the GPU (the
    torch twin is some 130 small integer kernels)."""
    if pick_impl(key, impl) == "torch":
        keys = canvas_row_keys_device(key, step, rows, row_offset)
        return keys, counter_tokens(keys, vocab)
    keys = torch.empty(rows, dtype=torch.int64, device=key.device)
    noise = torch.empty_like(keys)
    block = 256
    _step_keys_kernel[(triton.cdiv(rows, block),)](key, step, keys, noise, rows, row_offset, vocab, BLOCK=block,
                                                   num_warps=4)
    return keys, noise


def _triton_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] uniforms from the Triton hash (for the torch/Triton agreement test)."""
    out = torch.empty(keys.numel(), vocab, dtype=torch.float32, device=keys.device)
    _uniform_kernel[(keys.numel(),)](keys.contiguous(), out, vocab, BLOCK_V=128)
    return out


_F32_OUT = [True]  # whether this torch has mm/addmm(out_dtype=float32) for 16-bit inputs
_CHUNK_BUDGET = 64 << 20  # bytes for one chunk's logits (fp32) and weights (E's dtype)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, add: bool = False):
    """out = a @ b (or out += a @ b) in fp32, with 16-bit operands on the tensor cores."""
    if a.is_cuda and a.dtype == b.dtype != torch.float32 and _F32_OUT[0]:
        try:
            if add:
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError, NotImplementedError):  # torch without fp32-output matmuls
            _F32_OUT[0] = False
    a, b = a.float(), b.float()  # fp32 or mixed inputs, the CPU (interpreter tests), old torch
    return out.addmm_(a, b) if add else torch.mm(a, b, out=out)


def _head_sample_triton(h, embedding, *, softcap, temperature, seed, step, row_offset, want_soft,
                        vocab_tile=None, chunk=None, block_v=None, num_warps=8, keys=None,
                        one_sweep=None) -> HeadSample:
    """GPU path: the vocabulary in chunks; per chunk the logits h @ E_c^T and the soft sum
    P @ E_c run as fp32-output tensor-core matmuls (cuBLAS) and one Triton kernel per chunk
    turns the logits into the running state (argmax, Gumbel-max token, lazily rescaled
    log-sum-exp, entropy terms, the soft sum's rescale) and the weights P, stored in E's dtype
    (transformers also rounds its probabilities to bf16). Transient memory: one chunk of
    logits (fp32) and weights, the largest power of two of columns within 64 MiB (1024 ..
    32768): 48 MiB at 256 rows, 48 MiB at 2048. A packed table (kernels.ggml.GGMLWeight) is
    decoded a chunk of rows at a time by its Triton decoder, the decoded rows counted in the
    64 MiB (8192 columns at 256 rows). vocab_tile (or block_v): the kernel's tile. one_sweep:
    after a row's first chunk, the sums in the same sweep as the maxima (the same bits; False:
    always two sweeps, the kernel as it was measured below). Default: up to 512 rows, where the
    grid gives an SM 2 programs either way; with more rows its extra registers would cost
    programs an SM (4 instead of 6 in the sm_90 build at 2048 rows): untimed both ways.

    Measured on an H200 (torch 2.11, triton 3.6; V 262144, D 2816, bf16; one run, medians of
    5, acceptance and renoise included; benchmarks/results/gpu_check_h200.log): 256 rows
    (batch 1) 2.53 ms and 51 MiB against transformers' 5.01 ms and 1792 MiB (1.92 ms as a CUDA
    graph); 2048 rows (batch 8) 14.5 ms and 70 MiB against 36.8 ms and 14 GiB. Per 32768
    columns at 256 rows: 72 + 65 us of matmul and 73 us of this kernel. The earlier single
    fused kernel took 9.8 and 87 ms in an earlier run."""
    if triton is None:
        raise RuntimeError("head_sample(impl='triton') needs triton")
    n, d = h.shape
    vocab = embedding.shape[0]
    dev = h.device
    if n == 0:
        return _no_rows(h, want_soft)
    h = h.contiguous()
    embedding = embedding.contiguous()
    if chunk is None:  # the largest power of two within the budget, 1024 .. 32768
        decoded = 0 if isinstance(embedding, torch.Tensor) else d * embedding.element_size()  # a packed table's rows
        fit = max(1, _CHUNK_BUDGET // (n * (4 + embedding.element_size()) + decoded))
        chunk = max(1024, min(32768, 1 << (fit.bit_length() - 1)))
    chunk = int(min(chunk, vocab))
    block_v = block_v or vocab_tile
    if not block_v:  # measured: 2048 best at 256 rows, 1024 at 2048 rows (0 / None: this default, as torch's)
        block_v = 128 if interpreting() else (2048 if n <= 512 else 1024)
    if int(block_v) < 1 or int(block_v) & (int(block_v) - 1):
        raise ValueError(f"the Triton sampler's vocab_tile must be a power of two, got {block_v}")
    bv = int(min(block_v, triton.next_power_of_2(chunk)))
    one_sweep = n <= 512 if one_sweep is None else one_sweep
    temp = _row_temperature(temperature, n, dev)
    keys = canvas_row_keys(seed, step, n, row_offset, device=dev) if keys is None else keys
    f32 = dict(dtype=torch.float32, device=dev)
    state = torch.empty(6, n, **f32)  # m, z, z_soft, t1, top_val, best_score
    state[0].fill_(float("-inf"))
    state[1:4].zero_()
    state[4:].fill_(float("-inf"))
    idx = torch.zeros(2, n, dtype=torch.int32, device=dev)
    lbuf = torch.empty(n * chunk, **f32)
    pbuf = torch.empty(n * chunk if want_soft else 1, dtype=embedding.dtype, device=dev)
    soft = torch.zeros(n, d, **f32) if want_soft else None
    for v0 in range(0, vocab, chunk):
        w = min(chunk, vocab - v0)
        e_c = embedding[v0:v0 + w]
        logits = lbuf[: n * w].view(n, w)
        _mm_f32(h, e_c.T, out=logits)
        p = pbuf[: n * w].view(n, w) if want_soft else pbuf
        _chunk_stats_kernel[(n,)](
            logits, p, soft if want_soft else state, temp, keys,
            state[0], state[1], state[2], state[3], state[4], state[5],
            idx[0], idx[1], w, d, v0, float(softcap), _LAZY_RESCALE,
            ROUND_BF16=embedding.dtype == torch.bfloat16, ROUND_F16=embedding.dtype == torch.float16,
            WANT_SOFT=bool(want_soft), ONE_SWEEP=bool(one_sweep), BLOCK_V=bv, num_warps=num_warps,
        )
        if want_soft:
            _mm_f32(p, e_c, out=soft, add=True)
    z, z_soft, t1 = state[1], state[2], state[3]
    entropy = torch.log(z) - t1 / z
    if want_soft:
        soft.div_(z_soft[:, None])
    return HeadSample(token=idx[1].long(), argmax=idx[0].long(), entropy=entropy, soft=soft)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def head_sample(h, embedding, *, softcap=SOFTCAP, temperature=1.0, seed=0, step=0, row_offset=0,
                want_soft=True, impl=None, vocab_tile=None, keys=None) -> HeadSample:
    """The fused head + sampler step for hidden states h [N, D] and the tied embedding [V, D].

    temperature: python float or fp32 tensor [N] (per row). seed/step/row_offset key the
    counter-based RNG (row i uses row_offset + i), so a batch processed in chunks samples the
    same tokens. impl: None (Triton on CUDA when importable, else torch; the environment
    variable DGPLUG_KERNELS=torch|triton overrides), "torch" or "triton". vocab_tile: the
    vocabulary tile (Triton: the kernel's tile, a power of two); results other than float
    rounding do not depend on it. keys: per-row RNG keys [N] made beforehand (e.g. by
    canvas_row_keys_device inside a CUDA graph); they replace seed/step/row_offset.
    """
    _check(h, embedding)
    kw = dict(softcap=softcap, temperature=temperature, seed=seed, step=step, row_offset=row_offset,
              want_soft=want_soft, vocab_tile=vocab_tile, keys=keys)
    if pick_impl(h, impl) == "triton":
        return _head_sample_triton(h, embedding, **kw)
    return _head_sample_torch(h, embedding, **kw)
