"""K-quant encoders against a scalar statement of ggml's reference quantizers.

`ggml_*` below restate, loop by loop and in float32 like the C (one rounding per operation, sums
accumulated in index order, ggml's `nearest_int` bit trick, uint8/int8 stores), what
`quantize_row_q{2,3,4,5,6}_K_ref` do (what `llama-quantize` runs without an importance
matrix): `make_qkx2_quants` with its running min (a trial that wins replaces min, and later
trials quantise from the new min; Q2_K scores trials by the absolute error), `make_qx_quants`
with its float32 comparison `sumlx*sumlx > best*suml2`, and Q3_K's `make_q3_quants` (sweeps of
single-value moves). They were written here from the algorithm; dgplug's vectorised encoders
(dgplug/converters/kquants.py) must give the same bytes. With an importance matrix the same goes for
`quantize_row_q{2,3,4,5,6}_K_impl` (`ggml_q45_k_block_imatrix`: make_qkx3_quants, make_qp_quants
for the 6-bit scales; Q6_K: make_qx_quants weighted by the importance; Q3_K: make_qx_quants for
the values and for the 16 scales; Q2_K: make_qkx3_quants, make_qp_quants for the 4-bit scales
and mins).
IQ4_XS / IQ4_NL: `ggml_iq4_block` restates quantize_row_iq4_nl_impl (as quantize_iq4_xs and
quantize_iq4_nl call it, ntry 7, with or without quant_weights) and best_index_int8.
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


def ggml_make_qkx2(x, w, nmax, rmin, rdelta, nstep, qkx3=False, mad=False):
    """-> (scale, the_min, L uint8) for one sub-block. qkx3: make_qkx3_quants, the same loop
    whose trials quantise as `v > 0 ? nearest_int(MIN(v, nmax)) : 0` (safe for an infinite v).
    mad: ggml's use_mad, errors sum w*|diff| (Q2_K)."""
    err = (lambda d: np.abs(d)) if mad else (lambda d: d * d)  # noqa: E731
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
    best = _fsum(w * err(diff))
    for k in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(k) + F(nmax)) / (mx - mn)  # mn: the running min
        if qkx3:
            v = iscale * (x - mn)
            la = np.where(v > 0, _nearest_int(np.minimum(v, F(nmax))), 0)
        else:
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
            cur = _fsum(w * err(diff))
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
    return q45_k_bytes(x, nmax, d, dmin, ls, lm, L)


def q45_k_bytes(x, nmax, d, dmin, ls, lm, L):
    """The end both Q4_K/Q5_K quantizers share: 6-bit scales/mins packed into 12 bytes, values
    re-quantised with what get_scale_min_k4 reads back (sub-blocks whose scale is 0 keep the
    search's L), then the block layout."""
    sc = [0] * 12
    for j in range(8):  # ggml's packing loop, uint8 stores
        a, b = int(ls[j]) & 0xFF, int(lm[j]) & 0xFF
        if j < 4:
            sc[j], sc[j + 4] = a, b
        else:
            sc[j + 4] = (a & 0xF) | ((b & 0xF) << 4)
            sc[j - 4] = (sc[j - 4] | ((a >> 4) << 6)) & 0xFF
            sc[j] = (sc[j] | ((b >> 4) << 6)) & 0xFF
    L = L.copy()
    for j in range(8):
        if j < 4:  # get_scale_min_k4
            s6, m6 = sc[j] & 63, sc[j + 4] & 63
        else:
            s6, m6 = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        dl = F(d) * F(s6)
        if dl == 0:  # keeps the search's quants
            continue
        dm = F(dmin) * F(m6)
        xs = x[32 * j:32 * j + 32]
        L[32 * j:32 * j + 32] = _clamp(_nearest_int((xs + dm) / dl), 0, nmax)
    sc = np.array(sc, np.uint8)
    head = np.array([d, dmin], np.float16).view(np.uint8)
    qs = np.zeros(128, np.uint8)
    qh = np.zeros(32, np.uint8)
    for n in range(4):  # 64 values per 32 bytes: low nibble first half, high nibble second half
        lo, hi = L[64 * n:64 * n + 32].astype(np.int64), L[64 * n + 32:64 * n + 64].astype(np.int64)
        qs[32 * n:32 * n + 32] = (lo & 0xF) | ((hi & 0xF) << 4)
        qh |= (((lo >> 4) << (2 * n)) | ((hi >> 4) << (2 * n + 1))).astype(np.uint8)
    parts = [head, sc] + ([qh] if nmax == 31 else []) + [qs]
    return np.concatenate(parts)


def ggml_q6_k_block(x, qw=None):
    """quantize_row_q6_K_ref for one super-block -> 210 bytes; with qw (the block's 256
    importances) quantize_row_q6_K_impl, which hands qw to make_qx_quants as its weights."""
    scales, L = np.zeros(16, F), np.zeros(256, np.uint8)
    max_scale, max_abs = F(0), F(0)
    for ib in range(16):
        w = None if qw is None else qw[16 * ib:16 * ib + 16]
        scales[ib], L[16 * ib:16 * ib + 16] = ggml_make_qx(x[16 * ib:16 * ib + 16], 32, w)
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


def ggml_make_qp(x, nmax, qw):
    """make_qp_quants(n, nmax, x, L, quant_weights=qw) -> (scale, L uint8): a grid 0..nmax for
    non-negative values (the sub-block scales or mins), plain loops over the n values."""
    n = len(x)
    vmax = F(0)
    for v in x:
        vmax = vmax if vmax > v else v
    if vmax < EPS:
        return F(0), np.zeros(n, np.uint8)
    ni = lambda v: int(_nearest_int(v))  # noqa: E731
    iscale = F(nmax) / vmax
    L = [ni(iscale * x[i]) & 0xFF for i in range(n)]  # uint8 stores
    scale = F(1) / iscale
    best = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best = best + qw[i] * diff * diff
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_k = (F(0.1) * F(k) + F(nmax)) / vmax
        scale_k = F(1) / iscale_k
        mse = F(0)
        for i in range(n):
            diff = x[i] - scale_k * F(min(nmax, ni(iscale_k * x[i])))
            mse = mse + qw[i] * diff * diff
        if mse < best:
            best, iscale = mse, iscale_k
    sumlx = suml2 = F(0)
    for i in range(n):
        l = min(nmax, ni(iscale * x[i]))
        L[i] = l & 0xFF
        sumlx = sumlx + qw[i] * x[i] * F(l)
        suml2 = suml2 + qw[i] * F(l) * F(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, ni(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx = slx + w * x[i] * F(new_l)
                    sl2 = sl2 + w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l & 0xFF, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), np.array(L, np.uint8)


def ggml_q45_k_block_imatrix(x, qw, nmax):
    """quantize_row_q4_K_impl (nmax 15) / q5_K_impl (nmax 31) with quant_weights for one super-block."""
    sum_x2 = _fsum(x * x)
    sigma2 = F(2) * sum_x2 / F(256)
    scales, mins, sw, L = np.zeros(8, F), np.zeros(8, F), np.zeros(8, F), np.zeros(256, np.uint8)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        w = qw[32 * j:32 * j + 32] * np.sqrt(sigma2 + xs * xs)
        sw[j] = _fsum(w)
        scales[j], mins[j], L[32 * j:32 * j + 32] = ggml_make_qkx2(xs, w, nmax, -0.9, 0.05, 36, qkx3=True)
    d_block, ls = ggml_make_qp(scales, 63, sw)
    m_block, lm = ggml_make_qp(mins, 63, sw)
    if nmax == 31:  # q5_K_impl caps them at 63 before packing; q4_K_impl does not
        ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    return q45_k_bytes(x, nmax, np.float16(d_block), np.float16(m_block), ls, lm, L)


def ggml_make_q3(x):
    """make_q3_quants(16, nmax 4, x, L, do_rmse=true) -> (scale, L uint8): one value at a time."""
    n, nmax = len(x), 4
    vmax = x[np.argmax(np.abs(x))]
    if abs(vmax) < EPS:
        return F(0), np.zeros(n, np.uint8)
    ni = lambda v: int(_nearest_int(v))  # noqa: E731
    iscale = F(-nmax) / vmax
    L = [min(max(ni(iscale * x[i]), -nmax), nmax - 1) for i in range(n)]
    sumlx = suml2 = F(0)
    for i in range(n):
        w = x[i] * x[i]
        sumlx = sumlx + w * x[i] * F(L[i])
        suml2 = suml2 + w * F(L[i]) * F(L[i])
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * F(L[i])
            if slx > 0:
                sl2 = suml2 - w * F(L[i]) * F(L[i])
                new_l = min(max(ni(x[i] * sl2 / slx), -nmax), nmax - 1)
                if new_l != L[i]:
                    slx = slx + w * x[i] * F(new_l)
                    sl2 = sl2 + w * F(new_l) * F(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), np.array(L, np.int64).astype(np.uint8) + nmax


def _pack_2bit(L):
    """ggml's loop: qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6."""
    qs = np.zeros(64, np.uint8)
    for j in (0, 128):
        for l in range(32):
            qs[j // 4 + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)
    return qs


def ggml_q3_k_block(x, qw=None):
    """quantize_row_q3_K_ref for one super-block -> 110 bytes; with qw quantize_row_q3_K_impl
    (weights qw*sqrt(sigma2 + x^2), make_qx_quants per sub-block and for the 16 scales)."""
    ni = lambda v: int(_nearest_int(v))  # noqa: E731
    scales, L = np.zeros(16, F), np.zeros(256, np.int64)
    ls = None
    if qw is None:
        for j in range(16):
            scales[j], L[16 * j:16 * j + 16] = ggml_make_q3(x[16 * j:16 * j + 16])
        max_scale = amax = F(0)
        for j in range(16):
            if abs(scales[j]) > amax:
                amax, max_scale = abs(scales[j]), scales[j]
        if max_scale != 0:
            iscale = F(-32) / max_scale
            ls = []
            for j in range(16):
                l = np.array(ni(iscale * scales[j])).astype(np.int8)  # int8_t l = nearest_int(...)
                ls.append(min(max(int(l), -32), 31) + 32)
            d = np.float16(F(1) / iscale)
        else:
            d = np.float16(0)
    else:
        sigma2 = F(2) * _fsum(x * x) / F(256)
        sw = np.zeros(16, F)
        for j in range(16):
            xs = x[16 * j:16 * j + 16]
            w = qw[16 * j:16 * j + 16] * np.sqrt(sigma2 + xs * xs)
            sw[j] = _fsum(w)
            scales[j], L[16 * j:16 * j + 16] = ggml_make_qx(xs, 4, w)
        d_block, Ls = ggml_make_qx(scales, 32, sw)
        ls, d = [int(v) for v in Ls], np.float16(d_block)
    sc = [0] * 12
    if ls is not None:
        for j in range(16):  # ggml's packing loop
            l = ls[j]
            if j < 8:
                sc[j] = l & 0xF
            else:
                sc[j - 8] |= (l & 0xF) << 4
            sc[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
    for j in range(16):
        s6 = sc[j] & 0xF if j < 8 else sc[j - 8] >> 4
        s6 = (s6 | (((sc[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dl = F(d) * F(s6)
        if dl == 0:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = min(max(ni(x[i] / dl), -4), 3) + 4
    hmask = np.zeros(32, np.uint8)
    m, hm = 0, 1
    for j in range(256):
        if L[j] > 3:
            hmask[m] |= hm
            L[j] -= 4
        m += 1
        if m == 32:
            m, hm = 0, hm << 1
    return np.concatenate([hmask, _pack_2bit(L), np.array(sc, np.uint8), np.array([d], np.float16).view(np.uint8)])


def ggml_q2_k_block(x, qw=None):
    """quantize_row_q2_K_ref for one super-block -> 84 bytes; with qw quantize_row_q2_K_impl
    (weights qw*sqrt(sigma2 + x^2) with sigma2 = sum(x^2)/256, make_qkx3_quants, make_qp_quants
    for the 4-bit scales and mins)."""
    ni = lambda v: int(_nearest_int(v))  # noqa: E731
    scales, mins, L = np.zeros(16, F), np.zeros(16, F), np.zeros(256, np.int64)
    sc = [0] * 16
    if qw is None:
        for j in range(16):
            xs = x[16 * j:16 * j + 16]
            scales[j], mins[j], L[16 * j:16 * j + 16] = ggml_make_qkx2(xs, np.abs(xs), 3, -0.5, 0.1, 15, mad=True)
        max_scale = max_min = F(0)
        for j in range(16):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        d = dmin = np.float16(0)
        if max_scale > 0:
            iscale = F(15) / max_scale
            sc = [ni(iscale * scales[j]) & 0xFF for j in range(16)]  # uint8 stores
            d = np.float16(max_scale / F(15))
        if max_min > 0:
            iscale = F(15) / max_min
            sc = [(sc[j] | (ni(iscale * mins[j]) << 4)) & 0xFF for j in range(16)]
            dmin = np.float16(max_min / F(15))
    else:
        sigma2 = _fsum(x * x) / F(256)
        sw = np.zeros(16, F)
        for j in range(16):
            xs = x[16 * j:16 * j + 16]
            w = qw[16 * j:16 * j + 16] * np.sqrt(sigma2 + xs * xs)
            sw[j] = _fsum(w)
            scales[j], mins[j], L[16 * j:16 * j + 16] = ggml_make_qkx2(xs, w, 3, -0.9, 0.05, 36, qkx3=True)
        dm, Ls = ggml_make_qp(scales, 15, sw)
        mm, Lm = ggml_make_qp(mins, 15, sw)
        sc = [(int(Ls[j]) | (int(Lm[j]) << 4)) & 0xFF for j in range(16)]
        d, dmin = np.float16(dm), np.float16(mm)
    for j in range(16):
        dl = F(d) * F(sc[j] & 0xF)
        if dl == 0:
            continue
        dm = F(dmin) * F(sc[j] >> 4)
        for i in range(16 * j, 16 * j + 16):
            L[i] = min(max(ni((x[i] + dm) / dl), 0), 3)
    return np.concatenate([np.array(sc, np.uint8), _pack_2bit(L), np.array([d, dmin], np.float16).view(np.uint8)])


def ggml_quantize(x, qtype, importance=None):
    """Rows x -> bytes; importance (one value per column) selects the _impl quantizers."""
    x = np.asarray(x, F)
    if importance is None:
        fn = {T.Q2_K: lambda b, _: ggml_q2_k_block(b), T.Q3_K: lambda b, _: ggml_q3_k_block(b),
              T.Q4_K: lambda b, _: ggml_q45_k_block(b, 15), T.Q5_K: lambda b, _: ggml_q45_k_block(b, 31),
              T.Q6_K: lambda b, _: ggml_q6_k_block(b)}[qtype]
        qw = np.zeros((x.size // 256, 256), F)
    else:
        fn = {T.Q2_K: ggml_q2_k_block, T.Q3_K: ggml_q3_k_block, T.Q4_K: lambda b, w: ggml_q45_k_block_imatrix(b, w, 15),
              T.Q5_K: lambda b, w: ggml_q45_k_block_imatrix(b, w, 31), T.Q6_K: ggml_q6_k_block}[qtype]
        qw = np.broadcast_to(np.asarray(importance, F).reshape(-1, 256), (x.size // x.shape[-1],) +
                             (x.shape[-1] // 256, 256)).reshape(-1, 256)
    return np.stack([fn(b, w) for b, w in zip(x.reshape(-1, 256), qw)])


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


K_TYPES = [pytest.param(q, id=q.name) for q in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)]
IQ4_TYPES = [pytest.param(q, id=q.name) for q in (T.IQ4_XS, T.IQ4_NL)]
LEGACY_TYPES = [pytest.param(q, id=q.name) for q in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)]


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


@pytest.mark.parametrize("qtype", K_TYPES + IQ4_TYPES)
@pytest.mark.parametrize("einsum", [True, False])
def test_chunking_and_sum_paths_do_not_change_bytes(qtype, einsum, monkeypatch):
    # the search runs on column chunks and clamps only where needed; small chunks exercise the
    # whole-chunk and the per-column clamps and the chunk edges (with fewer than 8
    # columns the sums are never einsum's); without einsum every sum is a product then a reduction.
    # The same with an importance matrix.
    x = sample_rows(2, 1024)
    imp = sample_importance(2, 1024)
    want = kq.quantize(x, qtype), kq.quantize(x, qtype, importance=imp)
    monkeypatch.setattr(kq, "_SUB_COLS", 23)
    monkeypatch.setattr(kq, "_EINSUM", einsum and kq._EINSUM)
    assert np.array_equal(kq.quantize(x, qtype), want[0])
    assert np.array_equal(kq.quantize(x, qtype, importance=imp), want[1])


@pytest.mark.parametrize("nmax,rmin,rdelta,nstep,mad", [(15, -1.0, 0.1, 20, False), (31, -0.5, 0.1, 15, False),
                                                       (15, -0.9, 0.05, 36, False), (3, -0.5, 0.1, 15, True)])
def test_weighted_affine_search(nmax, rmin, rdelta, nstep, mad):
    # the search takes any positive weights (ggml's quant_weights seam, used with an importance
    # matrix: make_qkx3_quants runs the same loop with rmin -0.9, step 0.05, 37 trials); Q2_K
    # scores the trials by the weighted absolute error (use_mad)
    rng = np.random.default_rng(nstep)
    n = 16 if nmax == 3 else 32
    x = np.concatenate([rng.standard_normal((48, n)), rng.standard_t(3, (48, n)) * 0.1]).astype(F)
    w = (rng.exponential(1.0, x.shape) + 0.01).astype(F)
    scale, the_min, isc, base = kq._qkx2_search(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), nmax, rmin,
                                                rdelta, nstep, mad=mad)
    xt = np.ascontiguousarray(x.T)
    L = kq._qkx2_quants(xt, base, isc, nmax, np.empty_like(xt)).T
    for i in range(len(x)):
        s, m, l = ggml_make_qkx2(x[i], w[i], nmax, rmin, rdelta, nstep, mad=mad)
        assert (scale[i], the_min[i]) == (s, m) and np.array_equal(L[i], l), i


def test_q3_search():
    # make_q3_quants (Q3_K without an importance matrix): the 5 sweeps of single-value moves, per column
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.standard_normal((64, 16)), rng.standard_t(2, (64, 16)) * 0.1, np.zeros((2, 16)),
                        np.repeat(rng.standard_normal((4, 1)), 16, axis=1)]).astype(F)
    with np.errstate(invalid="ignore", divide="ignore"):  # as quantize() runs it: 0/0 where nothing is taken
        scale, L = kq._q3_quants(np.ascontiguousarray(x.T))
    for i in range(len(x)):
        s, l = ggml_make_q3(x[i])
        assert scale[i] == s and np.array_equal(L[:, i], l), i


def test_weighted_symmetric_search():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((64, 16)), rng.standard_t(3, (64, 16)) * 0.1]).astype(F)
    w = (rng.exponential(1.0, x.shape) + 0.01).astype(F)
    scale, live, k, vmax = kq._qx_search(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), 32)
    for i in range(len(x)):
        s, l = ggml_make_qx(x[i], 32, w[i])
        lk = _clamp(_nearest_int(kq._qx_trial_iscale(F(k[i]), 32, vmax[i]) * x[i]), -32, 31) + 32
        assert scale[i] == s and np.array_equal(lk, l), i


# -- with an importance matrix: llama.cpp's quantize_q{4,5,6}_K with quant_weights ----------------
def sample_importance(seed, cols, dead=0):
    """Per-column importances as an imatrix holds them (means of squared activations): a
    lognormal spread over three orders of magnitude, a few outlier channels, and `dead` columns
    from 40 on that no activation reached (0: a whole sub-block without weight)."""
    rng = np.random.default_rng(100 + seed)
    imp = np.exp(rng.normal(0.0, 1.5, cols))
    imp[rng.choice(cols, 8, replace=False)] *= 300.0
    imp[40:40 + dead] = 0
    return imp.astype(F)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_imatrix_bytes_identical_to_ggml_impl(qtype):
    # 2 x 15 rows x 8 super-blocks = 240 blocks per type, the rows of the test above (Gaussian,
    # Student-t, outliers, sparse, constant, all-zero, one-signed, ...), each seed with its own
    # importance vector (seed 1 with 48 dead columns)
    blocks = same = 0
    bad = []
    for seed in (0, 1):
        x = sample_rows(seed, 2048)
        imp = sample_importance(seed, 2048, dead=48 * seed)
        ref = ggml_quantize(x, qtype, imp)
        ours = kq.quantize(x, qtype, name="w", importance=imp).reshape(ref.shape)
        eq = (ours == ref).all(axis=1)
        blocks, same = blocks + eq.size, same + int(eq.sum())
        bad += [(seed, int(i)) for i in np.flatnonzero(~eq)]
        assert np.isfinite(gq.dequantize(ours.reshape(x.shape[0], -1), qtype)).all()  # the block format
    print(f"{qtype.name} with importance: {same}/{blocks} blocks byte-identical ({100 * same / blocks:.2f} %)")
    # The same float32 operations in the same order decide alike, equal scores included (the
    # first trial keeps its place, as the C's strict comparisons): no block is left to explain.
    assert not bad, f"{len(bad)}/{blocks} blocks differ, first (seed, block) {bad[:5]}"


def test_imatrix_importance_per_matrix_and_checks():
    # a 3-D array of matrices takes one importance row per matrix, as llama.cpp hands each expert its slice
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 512)).astype(F)
    imp = np.stack([sample_importance(s, 512) for s in range(3)])
    both = kq.quantize(x, T.Q4_K, importance=imp)
    for e in range(3):
        assert np.array_equal(both[e], kq.quantize(x[e], T.Q4_K, importance=imp[e]))
    with pytest.raises(kq.FormatError, match=r"w: importance has shape \[256\], expected \[512\]"):
        kq.quantize(x[0], T.Q5_K, name="w", importance=imp[0, :256])
    with pytest.raises(kq.FormatError, match="w: importance has non-finite or negative values"):
        kq.quantize(x[0], T.Q6_K, name="w", importance=np.full(512, np.nan, F))


@pytest.mark.parametrize("qtype", K_TYPES + IQ4_TYPES + LEGACY_TYPES)
def test_imatrix_lowers_the_weighted_error(qtype):
    # what the importance is for: sum_j imp_j * (x_j - deq_j)^2 over Gaussian and Student-t rows
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal((8, 2048)), rng.standard_t(3, (8, 2048))]).astype(F)
    imp = sample_importance(7, 2048)

    def werr(q):
        return float(((gq.dequantize(q, qtype) - x) ** 2 * imp).sum(axis=1).mean())

    plain, weighted = werr(kq.quantize(x, qtype)), werr(kq.quantize(x, qtype, importance=imp))
    print(f"{qtype.name}: importance-weighted squared error {plain:.4g} -> {weighted:.4g} "
          f"({100 * (1 - weighted / plain):.1f} % less)")
    assert weighted < 0.9 * plain


# -- Q4_0 / Q4_1 / Q5_0 / Q5_1 with an importance: quantize_row_q{4,5}_{0,1}_impl -----------------
def ggml_legacy_row(x, qtype, qw):
    """One row -> bytes of quantize_row_q{4,5}_{0,1}_impl: sigma2 = sum(x^2)/n over the row, each
    block of 32 weighted qw*sqrt(sigma2 + x^2); Q4_0/Q5_0 make_qx_quants(32, 8|16, rmse_type 1),
    Q4_1/Q5_1 make_qkx3_quants(32, 15|31, -0.9, 0.05, 36); d (and m = -the_min) as fp16, then
    qs[j] = L[j] & 15 | (L[j+16] & 15) << 4 and the fifth bits in qh (bit j: L[j] >> 4)."""
    sigma2 = _fsum(x * x) / F(x.size)
    out = []
    for b in range(x.size // 32):
        xb, wb = x[32 * b:32 * b + 32], qw[32 * b:32 * b + 32] * np.sqrt(sigma2 + x[32 * b:32 * b + 32] ** 2)
        if qtype in (T.Q4_0, T.Q5_0):
            d, L = ggml_make_qx(xb, 8 if qtype == T.Q4_0 else 16, wb)
            head = [np.float16(d)]
        else:
            d, the_min, L = ggml_make_qkx2(xb, wb, 15 if qtype == T.Q4_1 else 31, -0.9, 0.05, 36, qkx3=True)
            head = [np.float16(d), np.float16(-the_min)]
        blk = b"".join(h.tobytes() for h in head)
        if qtype in (T.Q5_0, T.Q5_1):
            blk += int(sum(int(L[j] >> 4) << j for j in range(32))).to_bytes(4, "little")
        blk += bytes(int(L[j] & 15) | int(L[j + 16] & 15) << 4 for j in range(16))
        out.append(np.frombuffer(blk, np.uint8))
    return np.concatenate(out)


@pytest.mark.parametrize("qtype", LEGACY_TYPES)
def test_legacy_imatrix_bytes_identical_to_ggml_impl(qtype):
    # the rows above (Gaussian, Student-t, outliers, sparse, constant, all-zero, ...), 1024 wide (32
    # blocks a row), seed 1 with 48 dead importance columns; without an importance the type stays
    # gguf-py's reference encoder (ggml's *_ref)
    for seed in (0, 1):
        x = sample_rows(seed, 1024)
        imp = sample_importance(seed, 1024, dead=48 * seed)
        ref = np.stack([ggml_legacy_row(r, qtype, imp) for r in x])
        ours = kq.quantize(x, qtype, name="w", importance=imp)
        bad = np.flatnonzero(~(ours.reshape(-1, ref.shape[1] // 32) == ref.reshape(-1, ref.shape[1] // 32)).all(1))
        assert not bad.size, f"seed {seed}: {bad.size} blocks differ, first {bad[:5]}"
        assert np.isfinite(gq.dequantize(ours, qtype)).all()  # the block format
        assert np.array_equal(kq.quantize(x, qtype), gq.quantize(x, qtype))


# -- IQ4_XS / IQ4_NL: quantize_row_iq4_nl_impl (llama.cpp's quantize_iq4_xs / quantize_iq4_nl) ------
KVALUES_IQ4NL = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def ggml_best_index_int8(x):
    """best_index_int8(16, kvalues_iq4nl, x): x2 = x + x, then the branchless binary search
    (step 8, 4, 2, 1; idx moves to j when x2 >= val[j-1] + val[j])."""
    x2 = F(x) + F(x)
    idx = 0
    step = 8
    while step > 0:
        j = idx + step
        if x2 >= F(KVALUES_IQ4NL[j - 1] + KVALUES_IQ4NL[j]):
            idx = j
        step >>= 1
    return idx


def ggml_iq4_block(x, qw, super_block):
    """quantize_row_iq4_nl_impl(super_block, 32, 16 values, ..., kvalues_iq4nl, qw, ntry 7) for
    one super-block of 256 (IQ4_XS) or one block of 32 (IQ4_NL) -> bytes."""
    vals = KVALUES_IQ4NL
    sigma2 = F(0)
    for j in range(super_block):
        sigma2 = F(sigma2 + F(x[j] * x[j]))
    sigma2 = F(sigma2 * F(F(2) / F(super_block)))
    nblk = super_block // 32
    scales = [F(0)] * nblk
    max_scale, amax_scale = F(0), F(0)
    for ib in range(nblk):
        xb = x[32 * ib:32 * ib + 32]
        if qw is None:
            weight = [F(v * v) for v in xb]
        else:
            wb = qw[32 * ib:32 * ib + 32]
            weight = [F(wb[j] * np.sqrt(F(sigma2 + F(xb[j] * xb[j])), dtype=F)) for j in range(32)]
        amax, mx = F(0), F(0)
        for v in xb:
            if abs(v) > amax:
                amax, mx = F(abs(v)), v
        if amax < EPS:
            scales[ib] = F(0)
            continue

        def sums(iscale):
            sqx = sq2 = F(0)
            for j in range(32):
                q = F(vals[ggml_best_index_int8(F(iscale * xb[j]))])
                wq = F(weight[j] * q)
                sqx = F(sqx + F(wq * xb[j]))
                sq2 = F(sq2 + F(wq * q))
            return sqx, sq2

        d = F(-mx / F(vals[0]))
        sumqx, sumq2 = sums(F(F(1) / d))
        d = F(sumqx / sumq2) if sumq2 > 0 else F(0)
        best = F(d * sumqx)
        for itry in range(-7, 8):
            sumqx, sumq2 = sums(F(F(itry + vals[0]) / mx))
            if sumq2 > 0 and F(sumqx * sumqx) > F(best * sumq2):
                d = F(sumqx / sumq2)
                best = F(d * sumqx)
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale, max_scale = F(abs(d)), d
    L = [0] * super_block
    if nblk > 1:
        d = F(-max_scale / F(32))
        dh = np.float16(d)
        inv = F(F(1) / d) if d else F(0)
        scales_h, scales_l = 0, [0] * (nblk // 2)
        for ib in range(nblk):
            l = int(_nearest_int(F(inv * scales[ib])))
            l = max(-32, min(31, l))
            dl = F(d * F(l))
            idl = F(F(1) / dl) if dl else F(0)
            for j in range(32):
                L[32 * ib + j] = ggml_best_index_int8(F(idl * x[32 * ib + j]))
            l += 32
            if ib % 2 == 0:
                scales_l[ib // 2] = l & 0xF
            else:
                scales_l[ib // 2] |= (l & 0xF) << 4
            scales_h |= (l >> 4) << (2 * (ib % 8))
        head = [np.array([dh]).view(np.uint8), np.array([scales_h], np.uint16).view(np.uint8),
                np.array(scales_l, np.uint8)]
    else:
        head = [np.array([np.float16(scales[0])]).view(np.uint8)]
        inv = F(F(1) / scales[0]) if scales[0] else F(0)
        for j in range(super_block):
            L[j] = ggml_best_index_int8(F(inv * x[j]))
    qs = [L[32 * i + j] | (L[32 * i + 16 + j] << 4) for i in range(super_block // 32) for j in range(16)]
    return np.concatenate(head + [np.array(qs, np.uint8)])


def ggml_quantize_iq4(x, qtype, importance=None):
    """Rows x -> bytes of quantize_iq4_xs / quantize_iq4_nl (importance: one value per column)."""
    x = np.asarray(x, F)
    sb = 256 if qtype == T.IQ4_XS else 32
    cols = x.shape[-1]
    out = []
    for row in x.reshape(-1, cols):
        for b in range(cols // sb):
            qw = None if importance is None else np.asarray(importance, F)[sb * b:sb * b + sb]
            out.append(ggml_iq4_block(row[sb * b:sb * b + sb], qw, sb))
    return np.stack(out)



@pytest.mark.parametrize("qtype", IQ4_TYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["reference", "imatrix"])
def test_iq4_bytes_identical_to_ggml(qtype, weighted):
    # the sample rows of the K types (2 x 15 rows x 2048: 240 IQ4_XS super-blocks, 1920 IQ4_NL
    # blocks), without and with an importance vector per seed (seed 1 with 48 dead columns)
    blocks = same = 0
    bad = []
    for seed in (0, 1):
        x = sample_rows(seed, 2048)
        imp = sample_importance(seed, 2048, dead=48 * seed) if weighted else None
        ref = ggml_quantize_iq4(x, qtype, imp)
        ours = kq.quantize(x, qtype, name="w", importance=imp).reshape(ref.shape)
        eq = (ours == ref).all(axis=1)
        blocks, same = blocks + eq.size, same + int(eq.sum())
        bad += [(seed, int(i)) for i in np.flatnonzero(~eq)]
        # the block format: gguf-py decodes our bytes as the reference's
        assert np.array_equal(gq.dequantize(ours.reshape(x.shape[0], -1), qtype),
                              gq.dequantize(ref.reshape(x.shape[0], -1), qtype))
    print(f"{qtype.name} {'with' if weighted else 'without'} importance: {same}/{blocks} blocks byte-identical "
          f"({100 * same / blocks:.2f} %)")
    assert not bad, f"{len(bad)}/{blocks} blocks differ, first (seed, block) {bad[:5]}"


def test_iq4_index_is_best_index_int8():
    # the vectorised lookup on the midpoints themselves, their float32 neighbours, the ends, inf and NaN
    mids = kq._IQ4_MID2 / F(2)
    v = np.concatenate([mids, np.nextafter(mids, F(-np.inf)), np.nextafter(mids, F(np.inf)),
                        np.array([-200, 200, 0, -0.0, np.inf, -np.inf, np.nan], F),
                        np.random.default_rng(0).uniform(-130, 130, 500).astype(F)]).astype(F)
    with np.errstate(invalid="ignore"):
        assert [int(i) for i in kq._iq4_index(v)] == [ggml_best_index_int8(t) for t in v]
