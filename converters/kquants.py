"""Vectorised numpy encoders for ggml's K-quants (Q4_K, Q5_K, Q6_K) and one `quantize` front.

The gguf package (gguf-py) decodes every ggml type but encodes none of the K-quants; this module
fills that gap. The block layouts are ggml's, byte for byte (``gguf.quants.dequantize`` is the
check), and the scale search is the one of ggml's reference quantizers
(``quantize_row_q{4,5,6}_K_ref``, i.e. what ``llama-quantize`` does without an importance matrix):

* Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32. Per sub-block an affine fit
  ``x ~ s*q - m`` (q in 0..15 or 0..31) found by ggml's ``make_qkx2_quants`` search: weights
  ``w = rms(sub-block) + |x|``, 21 (Q4_K: rmin -1, step 0.1) or 16 (Q5_K: rmin -0.5, step 0.1)
  trial inverse scales, a weighted least-squares (scale, min) for each, the lowest weighted
  squared error kept. The 8 scales and 8 mins are then quantized to 6 bits against fp16 super
  scales ``d`` / ``dmin`` and the values are re-quantized with the final scales.
  Block = d (f16) | dmin (f16) | 12 bytes of packed 6-bit scales/mins | [Q5_K: 32 bytes of high
  bits] | 128 bytes of 4-bit quants  (144 / 176 bytes).
* Q6_K: 16 sub-blocks of 16, symmetric ``x ~ s*q`` (q in -32..31) with ggml's ``make_qx_quants``
  search (weights x^2, 19 trial scales), scales quantized to int8 against an fp16 ``d``.
  Block = ql (128) | qh (64) | int8 scales (16) | d (f16)  (210 bytes).

The search runs over all sub-blocks at once (numpy, float32), one pass per trial scale; the
squared error of a trial is computed in closed form from the same weighted sums that give its
least-squares fit, so nothing per element is kept between trials.

Entry points:
    quantize(array, qtype, name="tensor") -> np.ndarray[uint8 or float]
        F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1 through ``gguf.quants.quantize``; Q4_K, Q5_K, Q6_K
        here. The last dimension must be a multiple of the type's block size. NaN/Inf in the input
        raise ``FormatError`` naming the tensor (for every type).
    quantize_q4_k / quantize_q5_k / quantize_q6_k(rows) -> (n_rows, bytes_per_row) uint8
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as _gq

from dgplug.errors import FormatError

QK_K = 256
_F32 = np.float32
GROUP_MAX_EPS = 1e-15
# rows of a sub-block matrix processed at once (keeps the working set in cache)
_SUB_ROWS = 4096

K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
GGUF_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1)


def check_finite(x: np.ndarray, name: str) -> None:
    """Raise FormatError naming the tensor (and the first bad index) when x has NaN or Inf."""
    if x.dtype.kind != "f":
        return
    flat = x.reshape(-1)
    # cheap test first: NaN/Inf poison a sum (a finite sum means a finite array)
    if np.isfinite(np.add.reduce(flat, dtype=np.float64)):
        return
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size == 0:  # the sum overflowed to inf without a non-finite element
        return
    idx = np.unravel_index(int(bad[0]), x.shape)
    raise FormatError(
        f"{name}: {bad.size} non-finite value(s) (first {flat[bad[0]]!r} at index {tuple(int(i) for i in idx)}); "
        "refusing to quantize NaN/Inf"
    )


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K: asymmetric sub-blocks of 32 with the make_qkx2_quants search
# ---------------------------------------------------------------------------------------------

def _qkx2_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Best (scale, the_min) per row of x (rows = sub-blocks), weighted squared error.

    Returns scale >= 0 and the_min >= 0 with x ~ scale*q - the_min, q in 0..nmax.
    """
    nmax_f = _F32(nmax)
    xmin = np.minimum(x.min(axis=1), _F32(0))
    xmax = x.max(axis=1)
    rng = xmax - xmin
    live = rng > 0
    rng = np.where(live, rng, _F32(1))
    # u in [0, 1]: the position of each value in its sub-block's [min, max]
    u = (x - xmin[:, None]) / rng[:, None]
    wx = w * x
    f64 = np.float64
    ones = np.ones_like(w)
    sum_w = _rowdot(w, ones).astype(f64)
    sum_x = _rowdot(wx, ones).astype(f64)
    sum_x2 = _rowdot(wx, x).astype(f64)
    t = np.empty_like(x)
    wl = np.empty_like(x)

    def sums(c):
        np.multiply(u, c, out=t)
        np.rint(t, out=t)
        if c >= nmax_f + _F32(0.5):  # u <= 1, so only the top trial scales can overshoot nmax
            np.clip(t, _F32(0), nmax_f, out=t)
        np.multiply(t, w, out=wl)
        return _rowdot(wl, ones), _rowdot(wl, t), _rowdot(wl, x)

    def err(s, m, sl, sl2, sxl):
        # sum w*(s*l + m - x)^2, expanded
        return s * (s * sl2 + 2 * m * sl - 2 * sxl) + m * (m * sum_w - 2 * sum_x) + sum_x2

    # every trial's sums first (the per-element work), then the fits of all trials at once
    K = nstep + 1
    sl, sl2, sxl = (np.empty((x.shape[0], K)) for _ in range(3))
    for k in range(K):
        sl[:, k], sl2[:, k], sxl[:, k] = sums(_F32(rmin) + _F32(rdelta) * _F32(k) + nmax_f)
    sw, sx = sum_w[:, None], sum_x[:, None]
    D = sw * sl2 - sl * sl
    ok = D > 0
    Dz = np.where(ok, D, 1.0)
    s = (sw * sxl - sx * sl) / Dz
    m = (sl2 * sx - sl * sxl) / Dz
    pos = m > 0  # a positive min is not allowed: refit the scale alone with min 0
    if pos.any():
        m[pos] = 0
        s[pos] = sxl[pos] / np.where(sl2[pos] > 0, sl2[pos], 1.0)
    # weighted squared error of each least-squares fit: sum w x^2 - s sum w l x - m sum w x
    # (the residual is orthogonal to the fitted terms; with m = 0 too)
    e = np.where(ok, sum_x2[:, None] - s * sxl - m * sx, np.inf)
    # ggml's starting point: the plain min/max fit (its quants are those of the trial c = nmax)
    k0 = int(round(-rmin / rdelta))
    best_s = rng.astype(f64) / nmax
    best_m = xmin.astype(f64)
    best_e = err(best_s, best_m, sl[:, k0], sl2[:, k0], sxl[:, k0])
    kb = np.argmin(e, axis=1)  # the first of equal errors, as ggml's strict '<' scan
    rows = np.arange(x.shape[0])
    better = e[rows, kb] < best_e
    best_s = np.where(better, s[rows, kb], best_s)
    best_m = np.where(better, m[rows, kb], best_m)
    scale = np.where(live, best_s, 0.0).astype(_F32)
    the_min = np.where(live, -best_m, -xmin).astype(_F32)
    return scale, the_min


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins -> ggml's 12-byte layout (get_scale_min_k4)."""
    nb = ls.shape[0]
    out = np.empty((nb, 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _encode_qk_asym(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K/Q5_K part: x (nb, 256) -> (d f16, dmin f16, packed scales, L uint8 (nb, 256))."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    av = np.sqrt(_rowdot(xs, xs) / _F32(32)).astype(_F32)
    w = np.abs(xs) + av[:, None]
    scale = np.empty(nb * 8, _F32)
    the_min = np.empty(nb * 8, _F32)
    for r0 in range(0, nb * 8, _SUB_ROWS):
        r1 = min(r0 + _SUB_ROWS, nb * 8)
        scale[r0:r1], the_min[r0:r1] = _qkx2_search(xs[r0:r1], w[r0:r1], nmax, rmin, rdelta, nstep)
    scale = scale.reshape(nb, 8)
    the_min = the_min.reshape(nb, 8)
    max_scale = scale.max(axis=1)
    max_min = the_min.max(axis=1)
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_m = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
    ls = np.clip(np.rint(inv_s[:, None] * scale), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_m[:, None] * the_min), 0, 63).astype(np.uint8)
    d = (max_scale / _F32(63)).astype(np.float16)
    dmin = (max_min / _F32(63)).astype(np.float16)
    if not (np.isfinite(d).all() and np.isfinite(dmin).all()):
        raise OverflowError("block scale overflows fp16")
    dl = d.astype(_F32)[:, None] * ls.astype(_F32)  # (nb, 8)
    ml = dmin.astype(_F32)[:, None] * lm.astype(_F32)
    live = dl > 0
    dz = np.where(live, dl, _F32(1))
    q = (x.reshape(nb, 8, 32) + ml[:, :, None]) / dz[:, :, None]
    np.rint(q, out=q)
    np.clip(q, _F32(0), _F32(nmax), out=q)
    q *= live[:, :, None]
    return d, dmin, _pack_scales_k4(ls, lm), q.astype(np.uint8).reshape(nb, QK_K)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, sc, L = _encode_qk_asym(x, 15, -1.0, 0.1, 20)
    L = L.reshape(nb, 4, 2, 32)
    out = np.empty((nb, 144), np.uint8)
    out[:, 0:2] = d.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = sc
    out[:, 16:144] = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d, dmin, sc, L = _encode_qk_asym(x, 31, -0.5, 0.1, 15)
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

def _qx_search(x: np.ndarray, nmax: int) -> np.ndarray:
    """Signed scale per row (x ~ scale*l, l in -nmax..nmax-1), maximising (sum w x l)^2 / sum w l^2."""
    n = x.shape[0]
    ax = np.abs(x)
    idx = ax.argmax(axis=1)  # first index of the largest |x|, as ggml's strict '>' scan
    vmax = x[np.arange(n), idx]
    live = np.abs(vmax) >= GROUP_MAX_EPS
    vmax = np.where(live, vmax, _F32(1))
    w = x * x
    wx = w * x
    # v = -x/max in [-1, 1]: trial j quantises v * (nmax + 0.1 j) (ggml: x * (-(nmax + 0.1 j)/max))
    v = x / (-vmax)[:, None]
    t = np.empty_like(x)
    lo, hi = _F32(-nmax), _F32(nmax - 1)

    def sums(num):
        np.multiply(v, _F32(num), out=t)
        np.rint(t, out=t)
        if num >= hi + _F32(0.5):  # |v| <= 1: only the larger trials can leave [-nmax, nmax-1]
            np.clip(t, lo, hi, out=t)
        slx = _rowdot(t, wx)
        np.multiply(t, t, out=t)
        return slx, _rowdot(t, w)

    # trial order as ggml's scan: the plain nmax first, then nmax - 0.9 ... nmax + 0.9; a later
    # trial replaces the best only when strictly better, so the first of equal ones wins
    order = [0] + [k for k in range(-9, 10) if k != 0]
    slx, sl2 = (np.empty((n, len(order))) for _ in range(2))
    for j, k in enumerate(order):
        slx[:, j], sl2[:, j] = sums(_F32(nmax) + _F32(0.1) * _F32(k))
    pos = sl2 > 0
    scale = np.where(pos, slx / np.where(pos, sl2, 1.0), 0.0)
    score = scale * slx  # (sum w x l)^2 / sum w l^2, the error reduction of the best fit
    score[:, 1:][~pos[:, 1:]] = -np.inf
    jb = np.argmax(score, axis=1)
    scale = scale[np.arange(n), jb]
    return np.where(live, scale, 0.0).astype(_F32)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    scales = np.empty(nb * 16, _F32)
    for r0 in range(0, nb * 16, 2 * _SUB_ROWS):
        r1 = min(r0 + 2 * _SUB_ROWS, nb * 16)
        scales[r0:r1] = _qx_search(xs[r0:r1], 32)
    scales = scales.reshape(nb, 16)
    absS = np.abs(scales)
    imax = absS.argmax(axis=1)
    max_scale = scales[np.arange(nb), imax]
    zero = absS[np.arange(nb), imax] < GROUP_MAX_EPS
    ms = np.where(zero, _F32(1), max_scale)
    iscale = (_F32(-128) / ms).astype(_F32)
    d = np.where(zero, _F32(0), _F32(1) / iscale).astype(np.float16)
    if not np.isfinite(d).all():
        raise OverflowError("block scale overflows fp16")
    sc = np.minimum(np.rint(iscale[:, None] * scales), _F32(127))
    sc = np.where(zero[:, None], _F32(0), sc).astype(np.int8)
    dl = d.astype(_F32)[:, None] * sc.astype(_F32)  # (nb, 16)
    live = dl != 0
    dz = np.where(live, dl, _F32(1))
    q = x.reshape(nb, 16, 16) / dz[:, :, None]
    np.rint(q, out=q)
    np.clip(q, _F32(-32), _F32(31), out=q)
    q *= live[:, :, None]
    L = (q.astype(np.int8) + np.int8(32)).view(np.uint8).reshape(nb, 2, 4, 32)  # [half, quarter, l]
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


_BLOCK_FN = {T.Q4_K: _q4_k_blocks, T.Q5_K: _q5_k_blocks, T.Q6_K: _q6_k_blocks}


def _quantize_k(rows: np.ndarray, qtype: T, name: str) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=_F32)
    if rows.shape[-1] % QK_K:
        raise FormatError(f"{name}: row length {rows.shape[-1]} is not a multiple of {QK_K} ({qtype.name})")
    check_finite(rows, name)
    type_size = GGML_QUANT_SIZES[qtype][1]
    lead = rows.shape[:-1]
    blocks = rows.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), np.uint8)
    step = 2048  # super-blocks per call: bounds the temporaries to a few MB
    fn = _BLOCK_FN[qtype]
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            for b0 in range(0, blocks.shape[0], step):
                out[b0:b0 + step] = fn(blocks[b0:b0 + step])
    except OverflowError:
        raise FormatError(
            f"{name}: values up to {float(np.abs(rows).max()):.3g} are too large for {qtype.name} "
            "(a block scale overflows fp16)"
        ) from None
    return out.reshape(*lead, rows.shape[-1] // QK_K * type_size)


def quantize_q4_k(rows: np.ndarray, name: str = "tensor") -> np.ndarray:
    return _quantize_k(rows, T.Q4_K, name)


def quantize_q5_k(rows: np.ndarray, name: str = "tensor") -> np.ndarray:
    return _quantize_k(rows, T.Q5_K, name)


def quantize_q6_k(rows: np.ndarray, name: str = "tensor") -> np.ndarray:
    return _quantize_k(rows, T.Q6_K, name)


def quantize(array: np.ndarray, qtype: T | str, name: str = "tensor") -> np.ndarray:
    """Encode `array` (any float dtype; last dim = row) as ggml type `qtype`.

    Returns float32/float16 arrays for F32/F16, and uint8 arrays of shape
    (*lead, bytes_per_row) for BF16 and the block types (the layout GGUFWriter expects).
    """
    if isinstance(qtype, str):
        try:
            qtype = T[qtype.upper()]
        except KeyError:
            raise FormatError(f"{name}: unknown ggml type {qtype!r}") from None
    arr = np.asarray(array)
    if arr.dtype.kind != "f" and arr.dtype != np.uint16:
        raise FormatError(f"{name}: cannot quantize dtype {arr.dtype}")
    if qtype in K_TYPES:
        return _quantize_k(arr, qtype, name)
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
    if qtype in (T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1):
        arr = arr.astype(_F32, copy=False)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            out = _gq.quantize(arr, qtype)
        d = out.reshape(-1, GGML_QUANT_SIZES[qtype][1])[:, 0:2].copy().view(np.float16)
        if not np.isfinite(d).all():
            raise FormatError(f"{name}: values too large for {qtype.name} (a block scale overflows fp16)")
        return out
    return _gq.quantize(arr, qtype)
