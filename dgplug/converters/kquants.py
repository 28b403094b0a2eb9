"""Vectorised numpy encoders for ggml's K-quants (Q2_K .. Q6_K), IQ4_XS / IQ4_NL, and one `quantize` front.

The gguf package (gguf-py) decodes every ggml type but encodes none of the K-quants; this module
fills that gap. The bytes are those of ggml's reference quantizers (``quantize_row_q{2..6}_K_ref``,
i.e. what ``llama-quantize`` writes without an importance matrix), block for block: the same
float32 operations in the same order, vectorised across sub-blocks (tests/test_kquants.py holds a
scalar statement of ggml's loops and compares bytes; ``gguf.quants.dequantize`` checks the format).

* Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32. Per sub-block an affine fit
  ``x ~ s*q - m`` (q in 0..15 or 0..31) found by ggml's ``make_qkx2_quants`` search: weights
  ``w = rms(sub-block) + |x|``; a min/max start, then 21 (Q4_K: rmin -1, step 0.1) or 16 (Q5_K:
  rmin -0.5, step 0.1) trial inverse scales, each quantising from the RUNNING min (a trial that
  wins replaces the min, later trials start from it), a weighted least-squares (scale, min) per
  trial, kept when its weighted squared error is strictly lower. The 8 scales and 8 mins are then
  quantized to 6 bits against fp16 super scales ``d`` / ``dmin`` and the values re-quantized with
  the final scales (a sub-block whose 6-bit scale is 0 keeps the quants of its search, as in ggml).
  Block = d (f16) | dmin (f16) | 12 bytes of packed 6-bit scales/mins | [Q5_K: 32 bytes of high
  bits] | 128 bytes of 4-bit quants  (144 / 176 bytes).
* Q6_K: 16 sub-blocks of 16, symmetric ``x ~ s*q`` (q in -32..31) with ggml's ``make_qx_quants``
  search (weights x^2, 19 trial scales, the float32 test ``sumlx^2 > best*suml2``), scales
  quantized to int8 against an fp16 ``d``.
  Block = ql (128) | qh (64) | int8 scales (16) | d (f16)  (210 bytes).
* Q3_K: 16 sub-blocks of 16, symmetric (q in -4..3) by ggml's ``make_q3_quants`` (start -4/max,
  then sweeps moving one quant at a time while sumlx^2/suml2 rises, weights x^2); the signed
  scales on a 6-bit grid by the largest |scale|. Block = hmask (32: the 3rd bits) | qs (64: 2 low
  bits) | 12 bytes of packed 6-bit scales | d (f16)  (110 bytes).
* Q2_K: 16 sub-blocks of 16, affine (q in 0..3) by ``make_qkx2_quants`` with weights |x| and the
  weighted ABSOLUTE error (use_mad; rmin -0.5, step 0.1, 16 trials); scales and mins on 4-bit
  grids by their maxima. Block = 16 bytes (scale | min << 4) | qs (64) | d | dmin  (84 bytes).
* IQ4_XS / IQ4_NL (ggml's quantize_iq4_xs / quantize_iq4_nl, both quantize_row_iq4_nl_impl with
  ntry 7, what llama-quantize runs): 4-bit indices into the non-linear levels kvalues_iq4nl
  (-127 .. 113), looked up by best_index_int8 (level i once 2x >= val[i-1] + val[i]). Per block
  of 32 a scale search with weights x^2: start max/127, refit by weighted least squares, then
  15 trial inverse scales (itry - 127)/max, itry = -7..7, each refitted, kept on a strictly
  higher sumqx^2/sumq2. IQ4_XS: super-blocks of 256 = 8 such blocks, the 8 scales on a signed
  6-bit grid of d = -max/32 (the first largest |scale|), values re-indexed with d*l.
  Block = d | scales_h (u16) | scales_l (4) | qs (128)  (136 bytes). IQ4_NL: one block of 32,
  d = fp16(scale), values re-indexed with the float32 scale. Block = d | qs (16)  (18 bytes).

With an importance matrix (``importance=``: one value per column, an imatrix's in_sum2/counts)
the bytes are those of llama.cpp's ``quantize_q{2..6}_K`` with ``quant_weights``
(``quantize_row_q{2..6}_K_impl``), the same way (tests/test_kquants.py has their scalar port):

* Q4_K / Q5_K: per super-block sigma2 = 2*sum(x^2)/256, weights ``qw*sqrt(sigma2 + x^2)``;
  ``make_qkx3_quants`` (the same running-min search, trials rmin -0.9 + 0.05 k, k = 0..36,
  guarded against an infinite inverse scale); the 8 scales and 8 mins put on the 6-bit grid
  by ``make_qp_quants`` (a weighted fit of the grid step, each sub-block weighted by its sum
  of weights; ``_qp_quants``), not by max/63. Q5_K caps them at 63, Q4_K packs them as is.
* Q6_K: ``make_qx_quants`` with the importance itself as weights; the rest as without.
* Q3_K: weights ``qw*sqrt(sigma2 + x^2)`` (sigma2 as Q4_K); ``make_qx_quants`` (nmax 4) with
  them per sub-block, and the 16 scales fitted to the 6-bit grid by ``make_qx_quants`` (nmax 32)
  weighted by each sub-block's sum of weights.
* Q2_K: weights ``qw*sqrt(sigma2 + x^2)`` with sigma2 = sum(x^2)/256 (no factor 2 here);
  ``make_qkx3_quants`` (squared error, rmin -0.9, step 0.05, 37 trials); scales and mins fitted
  to their 4-bit grids by ``make_qp_quants`` weighted by the sub-blocks' sums of weights.
* IQ4_XS / IQ4_NL: weights ``qw*sqrt(sigma2 + x^2)``, sigma2 = 2*sum(x^2)/(super-block size);
  the rest as without.

Entry points:
    quantize(array, qtype, name="tensor", importance=None) -> np.ndarray[uint8 or float]
        F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 through ``gguf.quants.quantize`` (ggml's
        reference quantizers, what llama-quantize writes without an imatrix); Q2_K .. Q6_K,
        IQ4_XS, IQ4_NL here. The last dimension must be a multiple of the type's block size.
        NaN/Inf in the input raise ``FormatError`` naming the tensor (for every type). Every block
        type but Q8_0 uses `importance` (IMPORTANCE_TYPES); Q4_0 .. Q5_1 are then encoded here.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as _gq

from dgplug.errors import FormatError

QK_K = 256
_F32 = np.float32
GROUP_MAX_EPS = 1e-15
# sub-blocks searched at once (columns of the search matrices; keeps the working set in cache)
_SUB_COLS = 8192

K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
IQ_TYPES = (T.IQ4_XS, T.IQ4_NL)
# the types encoded here, all with an importance path (and Q4_0/Q4_1/Q5_0/Q5_1 with one: LEGACY_TYPES)
ENCODED_TYPES = K_TYPES + IQ_TYPES
GGUF_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)


def check_finite(x: np.ndarray, name: str, at: int = 0, shape: tuple[int, ...] | None = None) -> None:
    """Raise FormatError naming the tensor and the index of its first NaN or Inf when x has one.
    x may be a part of the tensor: its elements from flat index `at` of a tensor of `shape`."""
    if x.dtype.kind != "f":
        return
    flat = x.reshape(-1)
    # cheap test first: NaN/Inf poison a sum (a finite sum means a finite array)
    if np.isfinite(np.add.reduce(flat, dtype=np.float64)):
        return
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size == 0:  # the sum overflowed to inf without a non-finite element
        return
    idx = np.unravel_index(at + int(bad[0]), shape or x.shape)
    raise FormatError(f"{name}: {bad.size} non-finite value(s){' in the rows read' if shape else ''} (the first, "
                      f"{float(flat[bad[0]])}, at index {tuple(int(i) for i in idx)}); refusing to quantize NaN/Inf")


# ---------------------------------------------------------------------------------------------
# The float32 arithmetic of ggml's loops, vectorised across sub-blocks
# ---------------------------------------------------------------------------------------------
# A search works on a (values, sub-blocks) matrix: column j is one sub-block. Element-wise float32
# numpy rounds exactly as the C does per element; numpy's reduction along axis 0 adds the rows one
# after another (row 0 + row 1, then + row 2, ...), which is C's `s += v[i]` loop order, so every
# sum, and therefore every decision of the search, is the one ggml takes (pairwise or SIMD sums
# along a row would not be).

def _seq_sum(a: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=0)


def _einsum_exact() -> bool:
    """Whether np.einsum('ij,ij->j') is `_seq_sum(a*b)`: products rounded, then added row after
    row (numpy's x86-64 wheels; a fused multiply-add or another order would differ). One pass
    instead of two where it holds."""
    rng = np.random.default_rng(0)
    for shape in ((32, 8), (16, 1000), (32, 8195)):
        a = rng.standard_normal(shape, dtype=_F32) * _F32(1e3)
        b = rng.standard_normal(shape, dtype=_F32)
        if not np.array_equal(np.einsum("ij,ij->j", a, b), _seq_sum(a * b)):
            return False
    return True


_EINSUM = _einsum_exact()


def _dot_cols(a: np.ndarray, b: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """sum_i a[i]*b[i] per column, in C's order (tmp: scratch of a's shape)."""
    if _EINSUM and a.shape[1] >= 8 and a.flags.c_contiguous and b.flags.c_contiguous:
        return np.einsum("ij,ij->j", a, b)
    return _seq_sum(np.multiply(a, b, out=tmp))


def _clamp(q, lo, hi, ends):
    """np.clip(q, lo, hi) on the columns that need it. `ends` are the columns' smallest and largest
    values, transformed as q was (element-wise float32 maps are monotonic, so these are exactly
    the extreme quants of each column); most trials need no clamping at all."""
    a, b = (np.rint(e) for e in ends)
    need = np.maximum(a, b) > hi
    need |= np.minimum(a, b) < lo
    j = np.flatnonzero(need)
    if j.size > need.size // 8:
        np.clip(q, _F32(lo), _F32(hi), out=q)
    elif j.size:
        q[:, j] = np.clip(q[:, j], _F32(lo), _F32(hi))
    return q


def _qkx2_quants(x, mn, iscale, nmax, out, c=None, xmin=None, guard=False):
    """clamp(nearest_int(iscale*(x - mn)), 0, nmax) per column (ggml's nearest_int is np.rint).

    With iscale = c/(max - min) (c the trial's rmin + rdelta*k + nmax) no quant exceeds c*(1+u)^2,
    so the upper clamp is needed only when that can round above nmax; the lower one only in the
    columns whose smallest value (xmin) quantises below 0 (the same float32 operations on the
    column's smallest value give its smallest quant: rounding is monotonic). `guard`: the
    quantisation of make_qkx3_quants (the same but for an infinite iscale).
    """
    np.subtract(x, mn, out=out)
    np.multiply(out, iscale, out=out)
    np.rint(out, out=out)
    if c is None or float(c) * (1 + 2.0**-21) >= nmax + 0.5:
        np.clip(out, _F32(0), _F32(nmax), out=out)
    else:
        j = np.flatnonzero(np.rint((xmin - mn) * iscale) < 0)
        if j.size:
            out[:, j] = np.maximum(out[:, j], _F32(0))
    if guard:
        # make_qkx3_quants: `v > 0 ? nearest_int(MIN(v, nmax)) : 0`, the clamp above wherever v is
        # finite; an infinite iscale (running min == max) gives inf or 0*inf = NaN, which it maps
        # to nmax or 0
        j = np.flatnonzero(~np.isfinite(iscale))
        if j.size:
            v = (x[:, j] - mn[j]) * iscale[j]
            out[:, j] = np.where(v > 0, np.rint(np.minimum(v, _F32(nmax))), _F32(0))
    return out


def _qkx2_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                 guard: bool = False, mad: bool = False):
    """ggml's make_qkx2_quants on every column of x (n values x sub-blocks), weights w; with
    guard=True its importance-matrix twin make_qkx3_quants (same loop, other quantisation guard).
    mad=True: the error of a fit is sum w*|diff| instead of sum w*diff^2 (ggml's use_mad, Q2_K).

    Trial k quantises with inverse scale (rmin + rdelta*k + nmax)/(max - min) from the running
    min, fits (scale, min) by weighted least squares (min <= 0), and replaces the best when its
    weighted squared error is strictly smaller; the new min is where later trials start.
    Returns (scale, the_min, isc, base): the best fit, and the inverse scale and min its quants
    were made with (`_qkx2_quants(x, base, isc, nmax, out)` gives ggml's L for the column).
    """
    f = _F32
    xmin = x.min(axis=0)
    mn = np.minimum(xmin, f(0))
    mx = x.max(axis=0)
    live = mx != mn
    # ggml returns early for max == min (scale 0, L = 0); those columns quantise to all-zero L
    # here (x - min = 0), so their D is 0 and no trial wins; max := min + 1 keeps the divisions finite
    mx = np.where(live, mx, mn + f(1))
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    isc = np.where(live, f(nmax) / (mx - mn), f(0)).astype(f)
    scale = np.where(live, f(1) / isc, f(0)).astype(f)
    base = mn.copy()
    l, wl, t = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def error(s, m):  # sum w*((s*l + m) - x)^2, in the C's order
        np.multiply(l, s, out=t)
        np.add(t, m, out=t)
        np.subtract(t, x, out=t)
        if mad:
            np.abs(t, out=t)
        else:
            np.multiply(t, t, out=t)
        return _dot_cols(t, w, t)

    _qkx2_quants(x, mn, isc, nmax, l, f(nmax), xmin)
    best = error(scale, mn)
    for k in range(nstep + 1):
        c = f(rmin) + f(rdelta) * f(k) + f(nmax)
        ik = c / (mx - mn)
        _qkx2_quants(x, mn, ik, nmax, l, c, xmin, guard)
        np.multiply(w, l, out=wl)
        sl = _seq_sum(wl)
        sl2 = _dot_cols(wl, l, t)
        sxl = _dot_cols(wl, x, t)
        D = sum_w * sl2 - sl * sl
        s = (sum_w * sxl - sum_x * sl) / D  # garbage where D <= 0: those columns cannot win
        m = (sl2 * sum_x - sl * sxl) / D
        pos = m > 0  # a positive min is not allowed: min 0 and the scale refitted alone
        if pos.any():
            m[pos] = 0
            s[pos] = sxl[pos] / sl2[pos]
        e = error(s, m)
        win = D > 0
        win &= e < best
        for state, new in ((best, e), (scale, s), (isc, ik), (base, mn), (mn, m)):
            np.putmask(state, win, new)
    return scale, -mn, isc, base


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins -> ggml's 12-byte layout (get_scale_min_k4)."""
    nb = ls.shape[0]
    out = np.empty((nb, 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _six_bits(inv: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ggml: uint8_t l = nearest_int(inv*v); l = MIN(63, l)  (the store to uint8 wraps)."""
    return np.minimum(np.rint(inv[:, None] * v).astype(np.int32) & 0xFF, 63).astype(np.uint8)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit (add 1.5*2**23 in float32, read the low mantissa bits), also
    where it is not rounding (|v| > 2**22, inf, NaN), as the C runs it with asserts off."""
    b = (np.asarray(v, _F32) + _F32(12582912.0)).view(np.int32)
    return (b & 0x007FFFFF) - 0x00400000


def _unpack_scales_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for j = 0..7: the 12 packed bytes -> six-bit scales and mins."""
    ls = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
    return ls, lm


def _qp_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qp_quants on every column of x (n values >= 0 x blocks), weights w -> (L uint8,
    scale): the block's sub-block scales (or mins) on a grid of 0..nmax, used with an importance
    matrix. Start nmax/max and 8 trial inverse scales (nmax + 0.1 is)/max (kept on a strictly
    lower weighted error), then `_sweeps` (quants capped at nmax). L is uint8 as in the C (a
    negative nearest_int wraps when stored)."""
    f = _F32
    vmax = np.maximum.reduce(x, axis=0, initial=0)
    zero = vmax < GROUP_MAX_EPS
    vmax = np.where(zero, f(1), vmax).astype(f)

    def mse(iscale, clamp):  # sum w*(x - l/iscale)^2 with l = nearest_int(iscale*x)
        li = _nearest_int(iscale * x)
        lf = (np.minimum(li, nmax) if clamp else li & 0xFF).astype(f)
        diff = x - (f(1) / iscale) * lf
        return _seq_sum(w * diff * diff)

    iscale = f(nmax) / vmax
    best = mse(iscale, False)  # the first L is stored unclamped
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        ik = (f(0.1) * f(k) + f(nmax)) / vmax
        e = mse(ik, True)
        win = e < best
        np.putmask(best, win, e)
        np.putmask(iscale, win, ik)
    L, sumlx, suml2 = _sweeps(x, w, np.minimum(_nearest_int(iscale * x), nmax), None, nmax, qp=True)
    scale = np.where(suml2 > 0, sumlx / suml2, f(0)).astype(f)
    L = L.astype(np.uint8)
    L[:, zero] = 0
    return L, np.where(zero, f(0), scale).astype(f)


def _sweeps(x: np.ndarray, w: np.ndarray, li: np.ndarray, lo, hi, qp: bool):
    """The refinement make_qp_quants and make_q3_quants share, on every column of x (weights w, start
    quants li int32): up to 5 sweeps over the values, each moving one quant to
    clamp(nearest_int(x*sl2/slx), lo, hi) (sl2, slx: the sums without it) when that raises
    sumlx^2/suml2 (float32 test `slx*slx*suml2 > sumlx*sumlx*sl2`). make_qp_quants (qp=True)
    stores quants to uint8 (a negative one wraps, and is read back so) and moves only where both
    sums without the value are positive; make_q3_quants where slx is and the new sl2 is. A sweep
    that changes nothing in a column leaves it as it was, so ggml's early stop per column is the
    same as sweeping on. -> (L int32, sumlx, suml2); the sums start from li, as in the C."""
    f = _F32
    wx = w * x
    lf = li.astype(f)
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum(w * lf * lf)
    L = li & 0xFF if qp else li.copy()
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            Li = L[i].astype(f)
            slx = sumlx - wx[i] * Li  # the sums without value i
            sl2 = suml2 - w[i] * Li * Li
            new = np.clip(_nearest_int(x[i] * sl2 / slx), lo, hi)  # garbage where slx <= 0: not taken
            ok = (slx > 0) & (new != L[i])
            if qp:
                ok &= sl2 > 0
            nf = new.astype(f)
            slx += wx[i] * nf  # ... and with the new quant
            sl2 += w[i] * nf * nf
            if not qp:
                ok &= sl2 > 0
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            if ok.any():
                changed = True
                np.putmask(L[i], ok, new & 0xFF if qp else new)
                np.putmask(sumlx, ok, slx)
                np.putmask(suml2, ok, sl2)
        if not changed:
            break
    return L, sumlx, suml2


def _columns(x: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) super-blocks -> (n, nb*256/n): one sub-block of n values per column."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _imatrix_weights(x: np.ndarray, qw: np.ndarray, n: int = 32, two: bool = True) -> np.ndarray:
    """The weights of the K-quants with an importance matrix: per super-block sigma2 =
    2*sum(x^2)/256 (Q3_K..Q5_K; Q2_K: sum(x^2)/256), summed in index order, weights
    qw*sqrt(sigma2 + x^2), as (n, sub-blocks) columns."""
    f = _F32
    xt = np.ascontiguousarray(x.T)  # (256, nb): the reduction over axis 0 is C's loop order
    sigma2 = f(2 if two else 1) * _seq_sum(xt * xt) / f(QK_K)
    return _columns(qw * np.sqrt(sigma2[:, None] + x * x), n)


def _encode_qk_asym(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, qw=None):
    """Shared Q4_K/Q5_K part: x (nb, 256) -> (d f16, dmin f16, packed scales, L uint8 (nb, 256)).

    qw (nb, 256): the importance of each value (quantize_row_q{4,5}_K_impl): weights from it,
    the make_qkx3_quants grid (rmin -0.9, step 0.05, 37 trials), and the 6-bit scales and mins
    fitted by make_qp_quants (weighted by each sub-block's sum of weights) instead of
    max-scaled. Q5_K caps them at 63 before packing, Q4_K packs them as they are (as ggml)."""
    f = _F32
    nb = x.shape[0]
    xt = _columns(x, 32)
    if qw is None:
        av = np.sqrt(_seq_sum(xt * xt) / f(32))
        w = av + np.abs(xt)
    else:
        w = _imatrix_weights(x, qw)
        rmin, rdelta, nstep = -0.9, 0.05, 36
    ns = nb * 8
    scale, the_min, isc, base = (np.empty(ns, f) for _ in range(4))
    for c0 in range(0, ns, _SUB_COLS):
        c = slice(c0, min(c0 + _SUB_COLS, ns))
        xc, wc = np.ascontiguousarray(xt[:, c]), np.ascontiguousarray(w[:, c])
        scale[c], the_min[c], isc[c], base[c] = _qkx2_search(xc, wc, nmax, rmin, rdelta, nstep, qw is not None)
    scale = scale.reshape(nb, 8)
    the_min = the_min.reshape(nb, 8)
    if qw is None:
        max_scale = np.maximum(scale.max(axis=1), f(0))
        max_min = np.maximum(the_min.max(axis=1), f(0))
        with np.errstate(divide="ignore"):
            inv_s = np.where(max_scale > 0, f(63) / max_scale, f(0)).astype(f)
            inv_m = np.where(max_min > 0, f(63) / max_min, f(0)).astype(f)
        ls, lm = _six_bits(inv_s, scale), _six_bits(inv_m, the_min)
        d = (max_scale / f(63)).astype(np.float16)
        dmin = (max_min / f(63)).astype(np.float16)
        packed = _pack_scales_k4(ls, lm)
    else:
        sw = np.ascontiguousarray(_seq_sum(w).reshape(nb, 8).T)
        ls, d_block = _qp_quants(np.ascontiguousarray(scale.T), sw, 63)
        lm, m_block = _qp_quants(np.ascontiguousarray(the_min.T), sw, 63)
        if nmax == 31:
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        d, dmin = d_block.astype(np.float16), m_block.astype(np.float16)
        packed = _pack_scales_k4(ls.T, lm.T)
        ls, lm = _unpack_scales_k4(packed)  # what the requantisation reads back (ggml: get_scale_min_k4)
    if not (np.isfinite(d).all() and np.isfinite(dmin).all()):
        raise OverflowError("block scale overflows fp16")
    dl = d.astype(f)[:, None] * ls.astype(f)  # (nb, 8)
    ml = dmin.astype(f)[:, None] * lm.astype(f)
    kept = dl == 0  # ggml skips these sub-blocks: their quants stay those of the search
    q = (x.reshape(nb, 8, 32) + ml[:, :, None]) / np.where(kept, f(1), dl)[:, :, None]
    np.rint(q, out=q)
    np.clip(q, f(0), f(nmax), out=q)
    if kept.any():
        j = np.flatnonzero(kept)
        xj = xt[:, j]
        q.reshape(ns, 32)[j] = _qkx2_quants(xj, base[j], isc[j], nmax, np.empty_like(xj), guard=qw is not None).T
    return d, dmin, packed, q.astype(np.uint8).reshape(nb, QK_K)


def _q4_k_blocks(x: np.ndarray, qw=None) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, sc, L = _encode_qk_asym(x, 15, -1.0, 0.1, 20, qw)
    L = L.reshape(nb, 4, 2, 32)
    out = np.empty((nb, 144), np.uint8)
    out[:, 0:2] = d.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = sc
    out[:, 16:144] = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _q5_k_blocks(x: np.ndarray, qw=None) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, sc, L = _encode_qk_asym(x, 31, -0.5, 0.1, 15, qw)
    L = L.reshape(nb, 4, 2, 32)
    hi = L >> 4  # (nb, 4, 2, 32): bit 2c (+1 for the second half) of qh[j]
    shifts = (2 * np.arange(4, dtype=np.uint8)[:, None] + np.arange(2, dtype=np.uint8)[None, :])[None, :, :, None]
    qh = np.bitwise_or.reduce((hi << shifts).reshape(nb, 8, 32), axis=1)
    lo = L & 0x0F
    out = np.empty((nb, 176), np.uint8)
    out[:, 0:2] = d.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = sc
    out[:, 16:48] = qh
    out[:, 48:176] = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


# ---------------------------------------------------------------------------------------------
# Q6_K: symmetric sub-blocks of 16 with the make_qx_quants search (rmse_type 1: weights x^2)
# ---------------------------------------------------------------------------------------------

def _qx_quants(x, iscale, nmax, out, ends):
    """clamp(nearest_int(iscale*x), -nmax, nmax - 1) per column."""
    np.multiply(x, iscale, out=out)
    np.rint(out, out=out)
    return _clamp(out, -nmax, nmax - 1, [e * iscale for e in ends])


def _qx_trial_iscale(k, nmax, vmax):
    # ggml: -nmax/max for the first trial, -(nmax + 0.1f*is)/max for is = -9..9 (is != 0)
    return -(_F32(nmax) + _F32(0.1) * _F32(k)) / vmax


_QX_TRIALS = [0] + [k for k in range(-9, 10) if k]


def _qx_search(x: np.ndarray, w: np.ndarray, nmax: int):
    """ggml's make_qx_quants (rmse_type 1) on every column of x (16 values x sub-blocks), weights w.

    Symmetric x ~ scale*l, l in -nmax..nmax-1 (ggml's weights: x^2, or quant_weights). Trial
    inverse scales -(nmax + 0.1 k)/max, k = 0 then -9..9 (max: the first value of largest |x|);
    a trial replaces the best when sumlx^2 > best*suml2 in float32. Returns (scale, live, k, max):
    live is False for all-zero columns (ggml: scale 0, L = 0), k the winning trial (its quants:
    `_qx_quants(x, _qx_trial_iscale(k, nmax, max), ...)`).
    """
    f = _F32
    n = x.shape[1]
    vmax = x[np.abs(x).argmax(axis=0), np.arange(n)]  # the first of equal |x| (C: strict '>')
    live = np.abs(vmax) >= GROUP_MAX_EPS
    vmax = np.where(live, vmax, f(1))
    wx = w * x
    ends = (x.min(axis=0), x.max(axis=0))
    l, t = np.empty_like(x), np.empty_like(x)
    for k in _QX_TRIALS:
        _qx_quants(x, _qx_trial_iscale(k, nmax, vmax), nmax, l, ends)
        slx = _dot_cols(wx, l, t)
        np.multiply(w, l, out=t)
        sl2 = _dot_cols(t, l, t)
        s = slx / sl2  # 0/0 where sl2 == 0: such a trial never wins
        if k == 0:
            scale = np.where(sl2 != 0, s, f(0))
            best = scale * slx
            kbest = np.zeros(n, np.int8)
            continue
        win = sl2 > 0
        win &= slx * slx > best * sl2
        np.putmask(scale, win, s)
        np.putmask(best, win, s * slx)
        np.putmask(kbest, win, k)
    return np.where(live, scale, f(0)), live, kbest, vmax


def _q6_k_blocks(x: np.ndarray, qw=None) -> np.ndarray:
    """quantize_row_q6_K_ref; with qw (nb, 256) quantize_row_q6_K_impl, whose only change is the
    search's weights: the importance itself instead of x^2."""
    f = _F32
    nb = x.shape[0]
    ns = nb * 16
    xt = _columns(x, 16)
    wt = None if qw is None else _columns(qw, 16)
    scales, vmax = np.empty(ns, f), np.empty(ns, f)
    live, kbest = np.empty(ns, bool), np.empty(ns, np.int8)
    for c0 in range(0, ns, 2 * _SUB_COLS):
        c = slice(c0, min(c0 + 2 * _SUB_COLS, ns))
        xc = np.ascontiguousarray(xt[:, c])
        wc = xc * xc if wt is None else np.ascontiguousarray(wt[:, c])
        scales[c], live[c], kbest[c], vmax[c] = _qx_search(xc, wc, 32)
    scales = scales.reshape(nb, 16)
    absS = np.abs(scales)
    imax = absS.argmax(axis=1)  # the first of equal |scale|, as ggml's strict '>' scan
    rows = np.arange(nb)
    max_scale = scales[rows, imax]
    zero = absS[rows, imax] < GROUP_MAX_EPS
    iscale = (f(-128) / np.where(zero, f(1), max_scale)).astype(f)
    d = np.where(zero, f(0), f(1) / iscale).astype(np.float16)
    if not np.isfinite(d).all():
        raise OverflowError("block scale overflows fp16")
    sc = np.minimum(np.rint(iscale[:, None] * scales), f(127))
    sc = np.where(zero[:, None], f(0), sc).astype(np.int8)
    dl = d.astype(f)[:, None] * sc.astype(f)  # (nb, 16)
    kept = dl == 0  # ggml skips these sub-blocks: their quants stay those of the search
    q = x.reshape(nb, 16, 16) / np.where(kept, f(1), dl)[:, :, None]
    np.rint(q, out=q)
    np.clip(q, f(-32), f(31), out=q)
    q += f(32)
    if kept.any():
        j = np.flatnonzero(kept)
        xj = xt[:, j]
        lj = _qx_quants(xj, _qx_trial_iscale(kbest[j].astype(f), 32, vmax[j]), 32, np.empty_like(xj), (xj.min(0), xj.max(0)))
        q.reshape(ns, 16)[j] = np.where(live[j], lj + f(32), f(0)).T  # all-zero sub-blocks: L = 0
    L = q.astype(np.uint8).reshape(nb, 2, 4, 32)  # [half, quarter, l]
    lo = L & 0x0F
    hi = L >> 4
    ql = np.empty((nb, 2, 2, 32), np.uint8)
    ql[:, :, 0, :] = lo[:, :, 0, :] | (lo[:, :, 2, :] << 4)
    ql[:, :, 1, :] = lo[:, :, 1, :] | (lo[:, :, 3, :] << 4)
    qh = hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6)
    out = np.empty((nb, 210), np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.reshape(nb, 1).view(np.uint8)
    # ggml zeroes whole blocks whose scales are all ~0
    out[zero] = 0
    return out


# ---------------------------------------------------------------------------------------------
# Q3_K and Q2_K: 16 sub-blocks of 16, 2 low bits of each quant packed four to a byte
# ---------------------------------------------------------------------------------------------

def _q3_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_q3_quants(16, nmax 4, do_rmse) on every column of x (16 values x sub-blocks)
    -> (scale, L uint8 in 0..7).

    Symmetric x ~ scale*l, l in -4..3: l = nearest_int(-4/max * x) (max: the first value of
    largest |x|), then `_sweeps` with weights x^2. All-zero columns (max |x| < 1e-15): scale 0,
    L = 0."""
    f = _F32
    n = x.shape[1]
    vmax = x[np.abs(x).argmax(axis=0), np.arange(n)]  # the first of equal |x| (C: strict '>')
    live = np.abs(vmax) >= GROUP_MAX_EPS
    vmax = np.where(live, vmax, f(1)).astype(f)
    L, sumlx, suml2 = _sweeps(x, x * x, np.clip(_nearest_int((f(-4) / vmax) * x), -4, 3), -4, 3, qp=False)
    scale = np.where(live & (suml2 > 0), sumlx / suml2, f(0)).astype(f)
    return scale, np.where(live, L + 4, 0).astype(np.uint8)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) quants in 0..3 -> ggml's 64 bytes: byte 32h + l holds elements 128h + 32s + l in
    bits 2s, 2s+1 (s = 0..3)."""
    L = L.reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _q3_k_blocks(x: np.ndarray, qw=None) -> np.ndarray:
    """quantize_row_q3_K_ref: make_q3_quants per sub-block, the 16 signed scales put on a 6-bit grid
    by the largest |scale| (-32/max, clamped to -32..31), d = max/-32. With qw (nb, 256)
    quantize_row_q3_K_impl: weights qw*sqrt(sigma2 + x^2), make_qx_quants (nmax 4) with them per
    sub-block, and the 16 scales fitted to the 6-bit grid by make_qx_quants (nmax 32) weighted
    by each sub-block's sum of weights. Then as in ggml: values re-quantised with the packed
    scales (sub-blocks whose scale is 0 keep the search's quants), 3rd bits to hmask.
    Block = hmask (32) | qs (64) | 12 bytes of packed 6-bit scales | d (f16)  (110 bytes)."""
    f = _F32
    nb = x.shape[0]
    ns = nb * 16
    xt = _columns(x, 16)
    scales = np.empty(ns, f)
    if qw is None:
        Ls = np.empty((16, ns), np.uint8)
        for c0 in range(0, ns, 2 * _SUB_COLS):
            c = slice(c0, min(c0 + 2 * _SUB_COLS, ns))
            scales[c], Ls[:, c] = _q3_quants(np.ascontiguousarray(xt[:, c]))
    else:
        w = _imatrix_weights(x, qw, 16)
        live, kbest, vmax = np.empty(ns, bool), np.empty(ns, np.int8), np.empty(ns, f)
        for c0 in range(0, ns, 2 * _SUB_COLS):
            c = slice(c0, min(c0 + 2 * _SUB_COLS, ns))
            scales[c], live[c], kbest[c], vmax[c] = _qx_search(np.ascontiguousarray(xt[:, c]),
                                                               np.ascontiguousarray(w[:, c]), 4)
    scales = scales.reshape(nb, 16)
    if qw is None:
        imax = np.abs(scales).argmax(axis=1)  # the first of equal |scale|
        max_scale = scales[np.arange(nb), imax]
        nz = max_scale != 0
        iscale = (f(-32) / np.where(nz, max_scale, f(1))).astype(f)
        ls = np.clip(_nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int32) + 32
        ls[~nz] = 0  # ggml leaves the scale bytes zeroed (and d = 0)
        d = np.where(nz, f(1) / iscale, f(0)).astype(np.float16)
    else:
        st = np.ascontiguousarray(scales.T)
        sw = np.ascontiguousarray(_seq_sum(w).reshape(nb, 16).T)
        d_block, live_b, kb, vb = _qx_search(st, sw, 32)
        lb = _qx_quants(st, _qx_trial_iscale(kb.astype(f), 32, vb), 32, np.empty_like(st), (st.min(0), st.max(0)))
        ls = np.where(live_b, lb + f(32), f(0)).T.astype(np.int32)
        d = d_block.astype(np.float16)
    if not np.isfinite(d).all():
        raise OverflowError("block scale overflows fp16")
    dl = d.astype(f)[:, None] * (ls - 32).astype(f)  # (nb, 16)
    kept = dl == 0  # ggml skips these sub-blocks: their quants stay those of the search
    q = np.clip(_nearest_int(x.reshape(nb, 16, 16) / np.where(kept, f(1), dl)[:, :, None]), -4, 3) + 4
    if kept.any():
        j = np.flatnonzero(kept)
        if qw is None:
            q.reshape(ns, 16)[j] = Ls[:, j].T
        else:
            xj = xt[:, j]
            lj = _qx_quants(xj, _qx_trial_iscale(kbest[j].astype(f), 4, vmax[j]), 4, np.empty_like(xj),
                            (xj.min(0), xj.max(0)))
            q.reshape(ns, 16)[j] = np.where(live[j], lj + f(4), f(0)).T.astype(np.int32)
    L = q.astype(np.uint8).reshape(nb, 256)
    hi = (L >> 2).reshape(nb, 8, 32)  # the 3rd bit of element 32b + m goes to bit b of hmask[m]
    hmask = np.bitwise_or.reduce(hi << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    ls = ls.astype(np.uint8)
    lo, top = ls & 0x0F, ls >> 4
    out = np.empty((nb, 110), np.uint8)
    out[:, 0:32] = hmask
    out[:, 32:96] = _pack_2bit(L & 3)
    out[:, 96:104] = lo[:, 0:8] | (lo[:, 8:16] << 4)
    out[:, 104:108] = top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)
    out[:, 108:110] = d.reshape(nb, 1).view(np.uint8)
    return out


def _q2_k_blocks(x: np.ndarray, qw=None) -> np.ndarray:
    """quantize_row_q2_K_ref: an affine fit x ~ s*q - m (q in 0..3) per sub-block by
    make_qkx2_quants with weights |x| and the absolute error (use_mad; trials rmin -0.5, step 0.1,
    16 trials), the 16 scales and 16 mins put on 4-bit grids by their maxima (15/max, d = max/15).
    With qw (nb, 256) quantize_row_q2_K_impl: weights qw*sqrt(sigma2 + x^2) (sigma2 =
    sum(x^2)/256, no factor 2 here), make_qkx3_quants (squared error, rmin -0.9, step 0.05, 37
    trials), and the scales and mins fitted to their 4-bit grids by make_qp_quants weighted by
    each sub-block's sum of weights. Then values re-quantised with the packed scale and min
    (sub-blocks whose scale is 0 keep the search's quants).
    Block = 16 bytes (scale | min << 4) | qs (64) | d (f16) | dmin (f16)  (84 bytes)."""
    f = _F32
    nb = x.shape[0]
    ns = nb * 16
    xt = _columns(x, 16)
    if qw is None:
        w, trials, guard = np.abs(xt), (-0.5, 0.1, 15), False
    else:
        w, trials, guard = _imatrix_weights(x, qw, 16, two=False), (-0.9, 0.05, 36), True
    scale, the_min, isc, base = (np.empty(ns, f) for _ in range(4))
    for c0 in range(0, ns, _SUB_COLS):
        c = slice(c0, min(c0 + _SUB_COLS, ns))
        scale[c], the_min[c], isc[c], base[c] = _qkx2_search(np.ascontiguousarray(xt[:, c]),
                                                             np.ascontiguousarray(w[:, c]), 3, *trials,
                                                             guard=guard, mad=qw is None)
    scale = scale.reshape(nb, 16)
    the_min = the_min.reshape(nb, 16)
    if qw is None:
        max_scale = np.maximum(scale.max(axis=1), f(0))
        max_min = np.maximum(the_min.max(axis=1), f(0))
        inv_s = (f(15) / np.where(max_scale > 0, max_scale, f(1))).astype(f)
        inv_m = (f(15) / np.where(max_min > 0, max_min, f(1))).astype(f)
        ls = np.where(max_scale[:, None] > 0, _nearest_int(inv_s[:, None] * scale), 0)
        lm = np.where(max_min[:, None] > 0, _nearest_int(inv_m[:, None] * the_min), 0)
        sc = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)  # uint8 stores, as the C
        d = (max_scale / f(15)).astype(np.float16)
        dmin = (max_min / f(15)).astype(np.float16)
    else:
        sw = np.ascontiguousarray(_seq_sum(w).reshape(nb, 16).T)
        ls, d_block = _qp_quants(np.ascontiguousarray(scale.T), sw, 15)
        lm, m_block = _qp_quants(np.ascontiguousarray(the_min.T), sw, 15)
        sc = (ls | (lm << 4)).T
        d, dmin = d_block.astype(np.float16), m_block.astype(np.float16)
    if not (np.isfinite(d).all() and np.isfinite(dmin).all()):
        raise OverflowError("block scale overflows fp16")
    dl = d.astype(f)[:, None] * (sc & 0x0F).astype(f)  # (nb, 16)
    ml = dmin.astype(f)[:, None] * (sc >> 4).astype(f)
    kept = dl == 0  # ggml skips these sub-blocks: their quants stay those of the search
    q = np.clip(_nearest_int((x.reshape(nb, 16, 16) + ml[:, :, None]) / np.where(kept, f(1), dl)[:, :, None]), 0, 3)
    if kept.any():
        j = np.flatnonzero(kept)
        xj = xt[:, j]
        q.reshape(ns, 16)[j] = _qkx2_quants(xj, base[j], isc[j], 3, np.empty_like(xj), guard=guard).T
    out = np.empty((nb, 84), np.uint8)
    out[:, 0:16] = sc
    out[:, 16:80] = _pack_2bit(q.astype(np.uint8).reshape(nb, 256))
    out[:, 80:82] = d.reshape(nb, 1).view(np.uint8)
    out[:, 82:84] = dmin.reshape(nb, 1).view(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# IQ4_XS and IQ4_NL: 4-bit indices into ggml's non-linear table kvalues_iq4nl
# ---------------------------------------------------------------------------------------------
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_IQ4_Q = IQ4_VALUES.astype(_F32)
# ggml's best_index_int8: level i once 2x reaches val[i-1] + val[i] (a branchless binary search
# over these 15 sums; NaN compares false everywhere: level 0)
_IQ4_MID2 = (IQ4_VALUES[:-1].astype(np.int32) + IQ4_VALUES[1:]).astype(_F32)


def _iq4_index(v: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, v) element-wise (int64 in 0..15)."""
    v2 = v + v
    i = np.searchsorted(_IQ4_MID2, v2, side="right")
    nan = np.isnan(v2)
    if nan.any():
        i[nan] = 0
    return i


def _iq4_scales(xt: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-block scale search of ggml's quantize_row_iq4_nl_impl (ntry 7) on every column of
    xt (32 values x blocks), weights w: a start d = max/127 (max: the first value of largest
    |x|) refitted by weighted least squares on its indices, then the 15 trial inverse scales
    (itry - 127)/max, itry = -7..7, each refitted, kept when sumqx^2 > best*sumq2 (float32,
    strict). Blocks with max |x| < 1e-15 get scale 0."""
    f = _F32
    n = xt.shape[1]
    vmax = xt[np.abs(xt).argmax(axis=0), np.arange(n)]
    live = np.abs(vmax) >= GROUP_MAX_EPS
    vmax = np.where(live, vmax, f(1)).astype(f)
    t = np.empty_like(xt)

    def fit(iscale):  # the indices of iscale*x -> (sumqx, sumq2) in the C's order
        q = _IQ4_Q[_iq4_index(iscale * xt)]
        wq = w * q
        return _dot_cols(wq, xt, t), _dot_cols(wq, q, t)

    sumqx, sumq2 = fit(f(1) / (-vmax / f(-127)))
    d = np.where(sumq2 > 0, sumqx / sumq2, f(0)).astype(f)
    best = d * sumqx
    for itry in range(-7, 8):
        sumqx, sumq2 = fit(f(itry - 127) / vmax)
        win = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        if win.any():
            dn = sumqx / sumq2
            np.putmask(d, win, dn)
            np.putmask(best, win, dn * sumqx)
    return np.where(live, d, f(0)).astype(f)


def _iq4_weights(x: np.ndarray, qw) -> np.ndarray:
    """quantize_row_iq4_nl_impl's weights as (32, blocks) columns: x^2, or with an importance
    qw*sqrt(sigma2 + x^2), sigma2 = sum(x^2) (index order) * 2/super-block size."""
    f = _F32
    if qw is None:
        return _columns(x * x, 32)
    xt = np.ascontiguousarray(x.T)
    sigma2 = _seq_sum(xt * xt) * f(2.0 / x.shape[1])
    return _columns(qw * np.sqrt(sigma2[:, None] + x * x), 32)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """(n, 32k) indices -> ggml's 16k bytes: byte 16i + j holds index 32i + j (low nibble) and
    32i + 16 + j (high)."""
    L = L.astype(np.uint8).reshape(L.shape[0], -1, 2, 16)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _iq4_xs_blocks(x: np.ndarray, qw=None) -> np.ndarray:
    """quantize_iq4_xs (quantize_row_iq4_nl_impl with super-block 256, blocks of 32, ntry 7;
    without qw the reference quantizer's x^2 weights): the scale search per block, then the 8
    scales on a signed 6-bit grid by the first largest |scale| (d = -max/32 in float32; l =
    nearest_int(scale/d) clamped to -32..31); the values re-indexed with d*l (the float32 d, not
    its fp16). Block = d (f16) | scales_h (u16: bits 4-5 of l+32, 2 per block) | scales_l (4
    bytes: bits 0-3 of l+32, 2 per byte) | qs (128)  (136 bytes)."""
    f = _F32
    nb = x.shape[0]
    xt = _columns(x, 32)
    w = _iq4_weights(x, qw)
    scales = np.empty(nb * 8, f)
    for c0 in range(0, nb * 8, _SUB_COLS):
        c = slice(c0, min(c0 + _SUB_COLS, nb * 8))
        scales[c] = _iq4_scales(np.ascontiguousarray(xt[:, c]), np.ascontiguousarray(w[:, c]))
    scales = scales.reshape(nb, 8)
    max_scale = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]
    d = -max_scale / f(32)
    dh = d.astype(np.float16)
    if not np.isfinite(dh).all():
        raise OverflowError("block scale overflows fp16")
    nz = d != 0
    inv = np.where(nz, f(1) / np.where(nz, d, f(1)), f(0)).astype(f)
    ls = np.clip(_nearest_int(inv[:, None] * scales), -32, 31)
    dl = d[:, None] * ls.astype(f)
    idl = np.where(dl != 0, f(1) / np.where(dl != 0, dl, f(1)), f(0)).astype(f)
    L = _iq4_index(x.reshape(nb, 8, 32) * idl[:, :, None]).reshape(nb, QK_K)
    u = (ls + 32).astype(np.uint16)
    out = np.empty((nb, 136), np.uint8)
    out[:, 0:2] = dh.reshape(nb, 1).view(np.uint8)
    sh = np.bitwise_or.reduce((u >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype(np.uint16)
    out[:, 2:4] = sh.reshape(nb, 1).view(np.uint8)
    lo = (u & 0x0F).astype(np.uint8)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    out[:, 8:136] = _pack_nibbles(L)
    return out


def _iq4_nl_blocks(x: np.ndarray, qw=None) -> np.ndarray:
    """quantize_iq4_nl (quantize_row_iq4_nl_impl with one block of 32, ntry 7, as llama-quantize
    runs it with or without an importance): d = fp16(scale) and the values re-indexed with the
    float32 scale. Block = d (f16) | qs (16)  (18 bytes)."""
    f = _F32
    nb = x.shape[0]
    xt = np.ascontiguousarray(x.T)
    w = _iq4_weights(x, qw)
    scales = np.empty(nb, f)
    for c0 in range(0, nb, _SUB_COLS):
        c = slice(c0, min(c0 + _SUB_COLS, nb))
        scales[c] = _iq4_scales(np.ascontiguousarray(xt[:, c]), np.ascontiguousarray(w[:, c]))
    dh = scales.astype(np.float16)
    if not np.isfinite(dh).all():
        raise OverflowError("block scale overflows fp16")
    nz = scales != 0
    inv = np.where(nz, f(1) / np.where(nz, scales, f(1)), f(0)).astype(f)
    out = np.empty((nb, 18), np.uint8)
    out[:, 0:2] = dh.reshape(nb, 1).view(np.uint8)
    out[:, 2:18] = _pack_nibbles(_iq4_index(x * inv[:, None]))
    return out


# ---------------------------------------------------------------------------------------------
# Q4_0, Q4_1, Q5_0, Q5_1 with an importance (quantize_row_q{4,5}_{0,1}_impl); without one
# gguf-py's reference encoders (ggml's *_ref, what llama-quantize writes then)
# ---------------------------------------------------------------------------------------------
LEGACY_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
_LEGACY_NMAX = {T.Q4_0: 8, T.Q5_0: 16, T.Q4_1: 15, T.Q5_1: 31}


def _legacy_blocks(x: np.ndarray, w: np.ndarray, qtype: T) -> np.ndarray:
    """x, w (nb, 32): values and their weights -> ggml blocks. Q4_0/Q5_0: make_qx_quants(32, nmax,
    rmse_type 1, weights) (d = its scale, L its quants + nmax); Q4_1/Q5_1: make_qkx3_quants(32, nmax,
    rmin -0.9, rdelta 0.05, 36 steps) (d its scale, m = its min). No requantisation after the search."""
    f = _F32
    nb = x.shape[0]
    nmax = _LEGACY_NMAX[qtype]
    xt, wt = _columns(x, 32), _columns(w, 32)
    L = np.empty((32, nb), f)
    d, m = np.empty(nb, f), np.zeros(nb, f)
    for c0 in range(0, nb, _SUB_COLS):
        c = slice(c0, min(c0 + _SUB_COLS, nb))
        xc, wc = np.ascontiguousarray(xt[:, c]), np.ascontiguousarray(wt[:, c])
        if qtype in (T.Q4_0, T.Q5_0):
            d[c], live, k, vmax = _qx_search(xc, wc, nmax)
            lc = _qx_quants(xc, _qx_trial_iscale(k.astype(f), nmax, vmax), nmax, np.empty_like(xc),
                            (xc.min(axis=0), xc.max(axis=0)))
            L[:, c] = np.where(live, lc + f(nmax), f(0))  # all-zero blocks: L = 0 (ggml)
        else:
            d[c], the_min, isc, base = _qkx2_search(xc, wc, nmax, -0.9, 0.05, 36, guard=True)
            L[:, c] = _qkx2_quants(xc, base, isc, nmax, np.empty_like(xc), guard=True)
            m[c] = -the_min
    L = L.T.astype(np.uint8)  # (nb, 32)
    head = [d.astype(np.float16)] + ([m.astype(np.float16)] if qtype in (T.Q4_1, T.Q5_1) else [])
    if not all(np.isfinite(h).all() for h in head):
        raise OverflowError("block scale overflows fp16")
    parts = [h.reshape(nb, 1).view(np.uint8) for h in head]
    if qtype in (T.Q5_0, T.Q5_1):  # the fifth bits: bit j of qh is L[j] >> 4
        hi = (L >> 4).astype(np.uint32)
        qh = np.bitwise_or.reduce(hi << np.arange(32, dtype=np.uint32), axis=1).astype("<u4")
        parts.append(qh.reshape(nb, 1).view(np.uint8))
    lo = L & 0x0F
    parts.append(lo[:, :16] | (lo[:, 16:] << 4))
    return np.concatenate(parts, axis=1)


def _quantize_legacy(rows: np.ndarray, qtype: T, name: str, importance) -> np.ndarray:
    """quantize_q{4,5}_{0,1} with quant_weights: per row sigma2 = sum(x^2)/row length (summed in index
    order), weights importance*sqrt(sigma2 + x^2), then each block of 32 searched (_legacy_blocks)."""
    f = _F32
    rows = np.ascontiguousarray(rows, dtype=f)
    cols = rows.shape[-1]
    if cols % 32:
        raise FormatError(f"{name}: row length {cols} is not a multiple of 32 ({qtype.name})")
    check_finite(rows, name)
    imp = _check_importance(importance, cols, name)
    lead = rows.shape[:-1]
    flat = rows.reshape(-1, cols)
    size = GGML_QUANT_SIZES[qtype][1]
    out = np.empty((flat.shape[0], cols // 32 * size), np.uint8)
    step = max(1, 16384 * 32 // cols)  # rows per call: ~16k blocks, a few MB of temporaries
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            for r0 in range(0, flat.shape[0], step):
                x = flat[r0:r0 + step]
                xt = np.ascontiguousarray(x.T)
                sigma2 = _seq_sum(xt * xt) / f(cols)
                w = imp[None, :] * np.sqrt(sigma2[:, None] + x * x)
                out[r0:r0 + step] = _legacy_blocks(x.reshape(-1, 32), w.reshape(-1, 32), qtype).reshape(len(x), -1)
    except OverflowError:
        raise FormatError(f"{name}: values up to {float(np.abs(rows).max()):.3g} are too large for {qtype.name} "
                          "(a block scale overflows fp16)") from None
    return out.reshape(*lead, out.shape[-1])


IMPORTANCE_TYPES = ENCODED_TYPES + LEGACY_TYPES  # the types an importance matrix changes

_BLOCK_FN = {T.Q2_K: _q2_k_blocks, T.Q3_K: _q3_k_blocks, T.Q4_K: _q4_k_blocks, T.Q5_K: _q5_k_blocks,
             T.Q6_K: _q6_k_blocks, T.IQ4_XS: _iq4_xs_blocks, T.IQ4_NL: _iq4_nl_blocks}


def _check_importance(importance, cols: int, name: str) -> np.ndarray:
    imp = np.asarray(importance, dtype=_F32)
    if imp.ndim != 1 or imp.shape[0] != cols:
        raise FormatError(f"{name}: importance has shape {list(imp.shape)}, expected [{cols}] (one value per column)")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise FormatError(f"{name}: importance has non-finite or negative values")
    return imp


def _quantize_k(rows: np.ndarray, qtype: T, name: str, importance=None) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=_F32)
    qk, type_size = GGML_QUANT_SIZES[qtype]
    if rows.shape[-1] % qk:
        raise FormatError(f"{name}: row length {rows.shape[-1]} is not a multiple of {qk} ({qtype.name})")
    check_finite(rows, name)
    lead = rows.shape[:-1]
    blocks = rows.reshape(-1, qk)
    per_row = rows.shape[-1] // qk
    imp = None if importance is None else _check_importance(importance, rows.shape[-1], name).reshape(per_row, qk)
    out = np.empty((blocks.shape[0], type_size), np.uint8)
    step = 2048 * QK_K // qk  # blocks per call (2048 super-blocks): bounds the temporaries to a few MB
    fn = _BLOCK_FN[qtype]
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            for b0 in range(0, blocks.shape[0], step):
                b1 = min(b0 + step, blocks.shape[0])
                qw = None if imp is None else imp[np.arange(b0, b1) % per_row]  # block b: columns of b % per_row
                out[b0:b1] = fn(blocks[b0:b1], qw)
    except OverflowError:
        raise FormatError(
            f"{name}: values up to {float(np.abs(rows).max()):.3g} are too large for {qtype.name} "
            "(a block scale overflows fp16)"
        ) from None
    return out.reshape(*lead, per_row * type_size)


def quantize(array: np.ndarray, qtype: T | str, name: str = "tensor", importance=None) -> np.ndarray:
    """Encode `array` (any float dtype; last dim = row) as ggml type `qtype`.

    Returns float32/float16 arrays for F32/F16, and uint8 arrays of shape
    (*lead, bytes_per_row) for BF16 and the block types (the layout GGUFWriter expects).

    importance: an importance matrix's values for this matrix, one per column (an imatrix's
    in_sum2/counts), float32 [row length]; or, for a 3-D array of matrices (experts), one row per
    matrix [array.shape[0], row length]. The K types, IQ4_XS/IQ4_NL and Q4_0/Q4_1/Q5_0/Q5_1 then
    encode as llama.cpp's quantize_q{2..6}_K / quantize_iq4_{xs,nl} / quantize_q{4,5}_{0,1} with
    quant_weights. Q8_0 and the float types ignore it (ggml's Q8_0 has no importance path).
    """
    if isinstance(qtype, str):
        try:
            qtype = T[qtype.upper()]
        except KeyError:
            raise FormatError(f"{name}: unknown ggml type {qtype!r}") from None
    arr = np.asarray(array)
    if arr.dtype.kind != "f" and arr.dtype != np.uint16:
        raise FormatError(f"{name}: cannot quantize dtype {arr.dtype}")
    if qtype in ENCODED_TYPES or (qtype in LEGACY_TYPES and importance is not None):
        enc = _quantize_k if qtype in ENCODED_TYPES else _quantize_legacy
        if importance is not None and np.ndim(importance) == 2:
            if arr.ndim != 3 or np.shape(importance)[0] != arr.shape[0]:
                raise FormatError(f"{name}: importance has shape {list(np.shape(importance))}; one row per matrix "
                                  f"needs a 3-D array with as many matrices (array {list(arr.shape)})")
            return np.stack([enc(a, qtype, name, i) for a, i in zip(arr, importance)])
        return enc(arr, qtype, name, importance)
    if qtype not in GGUF_TYPES:
        raise FormatError(f"{name}: no encoder for ggml type {qtype.name}")
    block = GGML_QUANT_SIZES[qtype][0]
    if arr.ndim == 0 or arr.shape[-1] % block:
        raise FormatError(f"{name}: row length {arr.shape[-1] if arr.ndim else 0} is not a multiple of {block} ({qtype.name})")
    check_finite(arr, name)
    if qtype == T.F16 and arr.dtype != np.float16:
        a32 = arr.astype(_F32, copy=False)
        if a32.size and float(np.abs(a32).max()) > 65504.0:
            raise FormatError(f"{name}: values up to {float(np.abs(a32).max()):.3g} overflow F16")
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        arr = arr.astype(_F32, copy=False)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            out = _gq.quantize(arr, qtype)
        f16 = 4 if qtype in (T.Q4_1, T.Q5_1) else 2  # d, and the block minimum m of Q4_1 / Q5_1
        d = out.reshape(-1, GGML_QUANT_SIZES[qtype][1])[:, 0:f16].copy().view(np.float16)
        if not np.isfinite(d).all():
            what = "scale or minimum" if f16 == 4 else "scale"
            raise FormatError(f"{name}: values too large for {qtype.name} (a block {what} overflows fp16)")
        return out
    return _gq.quantize(arr, qtype)
