"""K-quant encoders against a scalar statement of ggml's reference quantizers.

`ggml_*` below restate, loop by loop and in float32 like the C (one rounding per operation, sums
accumulated in index order, ggml's `nearest_int` bit trick, uint8/int8 stores), what
`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref` and `quantize_row_q6_K_ref` do (what
`llama-quantize` runs without an importance matrix): `make_qkx2_quants` with its running min (a
trial that wins replaces min, and later trials quantise from the new min) and `make_qx_quants`
with its float32 comparison `sumlx*sumlx > best*suml2`. They were written here from the
algorithm; dgplug's vectorised encoders (converters/kquants.py) must give the same bytes.
gguf-py's decoder stays the check that the bytes are the block format.

Each sub-block is one Python-level state machine here (per-trial decisions, per-sub-block L
arrays); the encoders carry the same state for thousands of sub-blocks at once. Element-wise
float32 numpy on one sub-block's 16/32 values rounds exactly like the C loop; only the sums are
order-sensitive, and `_fsum` adds in index order.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from dgplug.converters import kquants as kq

F = np.float32
EPS = F(1e-15)  # GROUP_MAX_EPS


def _nearest_int(v):
    """ggml's nearest_int: add 1.5*2**23 in float32 and read the low mantissa bits."""
    b = (np.asarray(v, F) + F(12582912.0)).view(np.int32)
    return (b & 0x007FFFFF) - 0x00400000


def _clamp(l, lo, hi):  # MAX(lo, MIN(hi, l))
    return np.maximum(np.minimum(l, hi), lo)


def _fsum(v) -> F:
    """`float s = 0; for (i...) s += v[i];` (np.add.accumulate is sequential by definition)."""
    return np.add.accumulate(np.asarray(v, F))[-1]


def ggml_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """-> (scale, the_min, L uint8) for one sub-block."""
    mn, mx = x.min(), x.max()
    sum_w, sum_x = _fsum(w), _fsum(w * x)
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return F(0), -mn, np.zeros(x.size, np.uint8)
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    L = _clamp(_nearest_int(iscale * (x - mn)), 0, nmax)
    diff = scale * L.astype(F) + mn - x
    best = _fsum(w * (diff * diff))
    for k in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(k) + F(nmax)) / (mx - mn)  # mn: the running min
        la = _clamp(_nearest_int(iscale * (x - mn)), 0, nmax)
        lf = la.astype(F)
        sum_l, sum_l2, sum_xl = _fsum(w * lf), _fsum(w * lf * lf), _fsum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            diff = this_scale * lf + this_min - x
            cur = _fsum(w * (diff * diff))
            if cur < best:
                L, best, scale, mn = la, cur, this_scale, this_min
    return scale, -mn, L.astype(np.uint8)


def ggml_make_qx(x, nmax, w=None):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w) -> (scale, L uint8)."""
    vmax = x[np.argmax(np.abs(x))]  # the first of equal |x| (the C scans with a strict '>')
    if abs(vmax) < EPS:
        return F(0), np.zeros(x.size, np.uint8)
    w = x * x if w is None else w
    wx = w * x

    def trial(iscale):
        l = _clamp(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(F)
        return l, _fsum(wx * lf), _fsum(w * lf * lf)

    l, sumlx, suml2 = trial(F(-nmax) / vmax)
    L = l + nmax
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for k in [k for k in range(-9, 10) if k]:
        l, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(k)) / vmax)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = l + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L.astype(np.uint8)


def ggml_q45_k_block(x, nmax):
    """quantize_row_q4_K_ref (nmax 15) / q5_K_ref (nmax 31) for one super-block -> bytes."""
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    scales, mins, L = np.zeros(8, F), np.zeros(8, F), np.zeros(256, np.uint8)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        av = np.sqrt(_fsum(xs * xs) / F(32))
        scales[j], mins[j], L[32 * j:32 * j + 32] = ggml_make_qkx2(xs, av + np.abs(xs), nmax, rmin, 0.1, nstep)
    max_scale, max_min = max(F(0), scales.max()), max(F(0), mins.max())
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    ls = np.minimum(_nearest_int(inv_scale * scales) & 0xFF, 63)  # stored to uint8, then MIN(63, .)
    lm = np.minimum(_nearest_int(inv_min * mins) & 0xFF, 63)
    d, dmin = np.float16(max_scale / F(63)), np.float16(max_min / F(63))
    for j in range(8):
        dl = F(d) * F(ls[j])
        if dl == 0:  # keeps the search's quants
            continue
        dm = F(dmin) * F(lm[j])
        xs = x[32 * j:32 * j + 32]
        L[32 * j:32 * j + 32] = _clamp(_nearest_int((xs + dm) / dl), 0, nmax)
    sc = np.zeros(12, np.uint8)
    sc[0:4] = ls[0:4] | ((ls[4:8] >> 4) << 6)
    sc[4:8] = lm[0:4] | ((lm[4:8] >> 4) << 6)
    sc[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    head = np.array([d, dmin], np.float16).view(np.uint8)
    qs = np.zeros(128, np.uint8)
    qh = np.zeros(32, np.uint8)
    for n in range(4):  # 64 values per 32 bytes: low nibble first half, high nibble second half
        lo, hi = L[64 * n:64 * n + 32].astype(np.int64), L[64 * n + 32:64 * n + 64].astype(np.int64)
        qs[32 * n:32 * n + 32] = (lo & 0xF) | ((hi & 0xF) << 4)
        qh |= (((lo >> 4) << (2 * n)) | ((hi >> 4) << (2 * n + 1))).astype(np.uint8)
    parts = [head, sc] + ([qh] if nmax == 31 else []) + [qs]
    return np.concatenate(parts)


def ggml_q6_k_block(x):
    """quantize_row_q6_K_ref for one super-block -> 210 bytes."""
    scales, L = np.zeros(16, F), np.zeros(256, np.uint8)
    max_scale, max_abs = F(0), F(0)
    for ib in range(16):
        scales[ib], L[16 * ib:16 * ib + 16] = ggml_make_qx(x[16 * ib:16 * ib + 16], 32)
        if abs(scales[ib]) > max_abs:
            max_abs, max_scale = abs(scales[ib]), scales[ib]
    if max_abs < EPS:
        return np.zeros(210, np.uint8)
    iscale = F(-128) / max_scale
    d = np.float16(F(1) / iscale)
    sc = np.minimum(_nearest_int(iscale * scales), 127).astype(np.int8)
    for j in range(16):
        dl = F(d) * F(sc[j])
        if dl == 0:
            continue
        L[16 * j:16 * j + 16] = _clamp(_nearest_int(x[16 * j:16 * j + 16] / dl), -32, 31) + 32
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for h in range(2):
        q = [L[128 * h + 32 * i:128 * h + 32 * i + 32] for i in range(4)]
        ql[64 * h:64 * h + 32] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
        ql[64 * h + 32:64 * h + 64] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
        qh[32 * h:32 * h + 32] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
    return np.concatenate([ql, qh, sc.view(np.uint8), np.array([d], np.float16).view(np.uint8)])


def ggml_quantize(x, qtype):
    fn = {T.Q4_K: lambda b: ggml_q45_k_block(b, 15), T.Q5_K: lambda b: ggml_q45_k_block(b, 31),
          T.Q6_K: ggml_q6_k_block}[qtype]
    return np.stack([fn(b) for b in np.asarray(x, F).reshape(-1, 256)])


def sample_rows(seed=0, cols=1024):
    """Gaussian, heavy-tailed and degenerate rows (cols/256 super-blocks each)."""
    rng = np.random.default_rng(seed)
    g = lambda s=1.0: rng.standard_normal(cols) * s  # noqa: E731
    outl = g(0.02)
    outl[rng.choice(cols, 6, replace=False)] = rng.choice([-1, 1], 6) * rng.uniform(0.5, 3, 6)
    spiky = np.where(rng.random(cols) < 0.03, g(2.0), 0.0)  # mostly zero: all-zero sub-blocks
    steps = np.repeat(rng.standard_normal(cols // 16), 16)  # constant sub-blocks
    mixed = np.repeat(10.0 ** rng.uniform(-4, 0, cols // 16), 16) * g()  # sub-block scales that round to 0
    rows = [g(0.02), g(1.0), rng.standard_t(3, cols), rng.standard_t(3, cols) * 0.01, outl, spiky, steps, mixed,
            np.zeros(cols), np.full(cols, 0.37), np.full(cols, -1.5), np.abs(g()), -np.abs(g(1e-3)),
            g(1e-6), rng.integers(-2, 3, cols).astype(float)]
    return np.stack(rows).astype(F)


K_TYPES = [pytest.param(q, id=q.name) for q in (T.Q4_K, T.Q5_K, T.Q6_K)]


@pytest.mark.parametrize("qtype", K_TYPES)
def test_bytes_identical_to_ggml_reference(qtype):
    # 2 x 15 rows x 8 super-blocks = 240 blocks: Gaussian, Student-t (df 3), outliers, sparse spikes,
    # constant and all-zero sub-blocks, sub-blocks whose 6/8-bit scale rounds to 0 (ggml keeps the
    # search's quants there), one-signed, tiny and integer-valued rows
    x = np.concatenate([sample_rows(seed, 2048) for seed in (0, 1)])
    ref = ggml_quantize(x, qtype)
    ours = kq.quantize(x, qtype, name="w").reshape(ref.shape)
    same = (ours == ref).all(axis=1)
    # Every decision of the search is taken on the same float32 values as in C, so even equal
    # errors (ties, e.g. two trials giving the same quants) resolve alike: the first trial keeps
    # the place (strict '<' / '>'). Nothing is left to explain: all blocks are identical.
    bad = np.flatnonzero(~same)
    assert bad.size == 0, f"{bad.size}/{same.size} blocks differ, first {bad[:5]}"
    # and they are the block format: gguf-py decodes the reference bytes to the same values
    assert np.array_equal(gq.dequantize(ours.reshape(x.shape[0], -1), qtype),
                          gq.dequantize(ref.reshape(x.shape[0], -1), qtype))


@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("einsum", [True, False])
def test_chunking_and_sum_paths_do_not_change_bytes(qtype, einsum, monkeypatch):
    # the search runs on column chunks and clamps only where needed; small chunks exercise the
    # whole-chunk and the per-column clamps and the chunk edges (with fewer than 8
    # columns the sums are never einsum's); without einsum every sum is a product then a reduction
    x = sample_rows(2, 1024)
    want = kq.quantize(x, qtype)
    monkeypatch.setattr(kq, "_SUB_COLS", 23)
    monkeypatch.setattr(kq, "_EINSUM", einsum and kq._EINSUM)
    assert np.array_equal(kq.quantize(x, qtype), want)


@pytest.mark.parametrize("nmax,rmin,rdelta,nstep", [(15, -1.0, 0.1, 20), (31, -0.5, 0.1, 15), (15, -0.9, 0.05, 36)])
def test_weighted_affine_search(nmax, rmin, rdelta, nstep):
    # the search takes any positive weights (ggml's quant_weights seam, used with an importance
    # matrix: make_qkx3_quants runs the same loop with rmin -0.9, step 0.05, 37 trials)
    rng = np.random.default_rng(nstep)
    x = np.concatenate([rng.standard_normal((48, 32)), rng.standard_t(3, (48, 32)) * 0.1]).astype(F)
    w = (rng.exponential(1.0, x.shape) + 0.01).astype(F)
    scale, the_min, isc, base = kq._qkx2_search(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), nmax, rmin,
                                                rdelta, nstep)
    xt = np.ascontiguousarray(x.T)
    L = kq._qkx2_quants(xt, base, isc, nmax, np.empty_like(xt)).T
    for i in range(len(x)):
        s, m, l = ggml_make_qkx2(x[i], w[i], nmax, rmin, rdelta, nstep)
        assert (scale[i], the_min[i]) == (s, m) and np.array_equal(L[i], l), i


def test_weighted_symmetric_search():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((64, 16)), rng.standard_t(3, (64, 16)) * 0.1]).astype(F)
    w = (rng.exponential(1.0, x.shape) + 0.01).astype(F)
    scale, live, k, vmax = kq._qx_search(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), 32)
    for i in range(len(x)):
        s, l = ggml_make_qx(x[i], 32, w[i])
        lk = _clamp(_nearest_int(kq._qx_trial_iscale(F(k[i]), 32, vmax[i]) * x[i]), -32, 31) + 32
        assert scale[i] == s and np.array_equal(lk, l), i
