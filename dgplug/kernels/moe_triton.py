"""The Triton path of the fused MoE (dgplug/kernels/moe.py has the contract, the twin and the dispatch).

Triton path (one step of the denoiser: M = 256 x batch tokens, ~16 (token, slot) pairs per expert
at batch 1 with top-8 of 128):
  1. align (two small Triton launches, no sort, no host sync): the T*K (token, slot) pairs are
     placed by expert, stably, in blocks of BLOCK_M rows, each expert's run padded to a
     multiple of BLOCK_M (the moe_align_block_size idea): a per-chunk expert histogram, then
     each chunk's prefix offsets and in-chunk ranks (one-hot cumsum). The grid is an upper
     bound on the number of blocks; surplus blocks carry expert -1 and exit at once.
     `_align_torch` is the same step in torch ops (identical output, ~400 us on an H100 vs 18).
  2. gate_up grouped GEMM: one program = one block of BLOCK_M pairs x BLOCK_N intermediate
     columns; it accumulates the gate tile (rows n) and the up tile (rows I + n) of the same
     expert together and writes gelu_tanh(gate) * up to a [blocks * BLOCK_M, I] buffer in the
     sorted (padded) order, so the next GEMM reads contiguous rows.
  3. down grouped GEMM: reads that buffer, multiplies the routing weight in the epilogue and
     writes each pair's fp32 row to [T*K, D] at the pair's own index (no two programs write the
     same row: no atomics, deterministic); a sum over K gives [T, D].
  Weights are dequantised in the kernel. int8 / fp8: converted to the compute dtype, the
  per-channel scale applied to the fp32 accumulator after the K loop. int4: when a K tile lies
  inside one group (group % BLOCK_K == 0, the usual case) the nibbles go into tl.dot raw
  (exact in bf16/fp16) and the group's scale and zero are folded into the accumulator,
  acc += s * (a @ q - z * rowsum(a)), with the next tile's scale/zero loaded a step ahead (the
  swapped kernels read rowsum(a) per K tile from sums taken once: x's by tile_sums before the
  gate_up step, h's by the gate_up step's epilogue when its N tile is the down step's K tile;
  summed in every program instead, the reduction crossed warps in every K step);
  otherwise (groups smaller than a tile) each element is dequantised, (q - z) * s, before the
  dot. Activations bf16/fp16 (fp32 accepted; tl.dot then runs in IEEE fp32).

int4 with each K tile inside one group (the default tiles) runs swapped (SWAP_AB): out^T =
W @ x^T, so the 64 weight rows of a program are the MMA's M dimension and the ~16-32 pairs its
N dimension, the dequantised nibbles being the register-held A operand; the nibbles are built
from their bits (MAGIC: 0x4300 | q is 128 + q in bf16, 0x6400 | q is 1024 + q in fp16) and the
offset leaves with the folded zero point. SWAP_AB on 16-bit, int8 or fp8 weights (opt-in, not
timed yet) swaps the generic kernels' dots the same way: at BLOCK_M 16 they otherwise build with
mma.sync, a 16-row tile being below wgmma's 64 (benchmarks/sm90_build.py, its mma column).

Measured on an H200 (torch 2.11, triton 3.6; one layer at D=2816, I=704, E=128, K=8, bf16
activations, random routing; medians; TB/s = weight bytes of the experts touched / time;
benchmarks/results/gpu_check_h200_28dc59a.log): T=256 (batch 1): bf16 weights 0.60 ms (2.62 TB/s),
int8 0.46 ms (1.73), fp8 0.45 ms (1.78), int4 0.67 ms swapped (0.65; BLOCK_M 16, now the default,
0.615; unswapped 0.83); T=2048 (batch 8): bf16 1.30 ms, int8 1.39, fp8 1.34, int4 1.86. The int4
kernels' profile at T=256: gate_up 276 us + down 158 us, against a byte floor of about 0.08 ms for
both. The fragments nibble order (the default on CUDA since) is not timed yet. The torch twin:
~15-20 ms at T=256.
"""

from __future__ import annotations

import torch

from . import backend  # backend.COMPILE_ONLY is read at call time (benchmarks/sm90_build.py sets it)
from .ggml import GGMLWeight
from .moe import _check_args
from .quantized_weight import QuantizedWeight

_WQ_CODE = {None: 0, "int4": 1, "int8": 2, "fp8": 3}  # the kernels' WQ: how a weight tile is read

if backend.HAS_TRITON:
    import triton
    import triton.language as tl

    from .ggml import tile as ggml_tile, tile_at as ggml_tile_at

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _swapped_dot(a, w, acc, IEEE: tl.constexpr):
        """acc [BM, BN] + a [BM, BK] @ w [BK, BN], computed as (w^T @ a^T)^T: with ~16 pairs per
        expert the token tile is below wgmma's M of 64 (Triton then emits mma.sync, sm90_build's mma
        column); swapped, the BN weight rows are the M dimension and the converted weight tile can
        stay in registers as the A operand."""
        t = _dot(tl.trans(w), tl.trans(a), tl.zeros((w.shape[1], a.shape[0]), dtype=tl.float32), IEEE)
        return acc + tl.trans(t)

    @triton.jit
    def _load_rows(ptr, rows, row_mask, stride_m, stride_k, offs_k, K, CDT: tl.constexpr):
        """[BM, BK] activation tile ptr[rows, offs_k], zero outside, converted at once."""
        p = ptr + rows[:, None].to(tl.int64) * stride_m + offs_k[None, :] * stride_k
        return tl.load(p, mask=row_mask[:, None] & (offs_k[None, :] < K), other=0.0).to(CDT)

    @triton.jit
    def _load_w(w_ptr, e, rows, nmask, offs_k, K, stride_we, stride_wn, stride_wk,
                WQ: tl.constexpr, CDT: tl.constexpr, A8: tl.constexpr = False,
                k0=0, BLOCK_K: tl.constexpr = 0, GGML_RUNS: tl.constexpr = False):
        """[BK, BN] tile of weight[e, rows, offs_k]^T (plain, int8/fp8 without the scale, or ggml
        blocks decoded whole: WQ = 100 + the ggml type; A8: fp8 as it is, for an fp8 x fp8 dot).
        GGML_RUNS (offs_k = k0 + arange(BLOCK_K)): ggml blocks decoded by runs of 32 (ggml.tile_at),
        except Q8_0 and Q6_K: their blocks (34 and 210 bytes) leave rows unaligned, so the run loads
        stay byte loads, and the sm_90 build counted more instructions in the K loop by runs (gate_up
        Q6_K 1445 against 1195 element by element, down Q8_0 375 against 332; Q4_K gate_up 629
        against 860, Q5_0 down 511 against 706: benchmarks/results/sm90_build_ggml_runs_triton371.txt)."""
        if WQ >= 100 and GGML_RUNS and WQ != 108 and WQ != 114:
            w = ggml_tile_at(w_ptr, e, rows, nmask, k0, K, stride_we, stride_wn, WQ - 100, BLOCK_K)
        elif WQ >= 100:
            w = ggml_tile(w_ptr, e, rows, nmask, offs_k, K, stride_we, stride_wn, WQ - 100)
        else:
            p = (w_ptr + e.to(tl.int64) * stride_we + rows[None, :].to(tl.int64) * stride_wn
                 + offs_k[:, None] * stride_wk)
            w = tl.load(p, mask=(offs_k[:, None] < K) & nmask[None, :], other=0.0)
            if WQ != 0 and not A8:
                w = w.to(tl.float32)
        return w.to(CDT)

    @triton.jit
    def _byte_mask(offs_b, K, EVEN_K: tl.constexpr):
        """Which bytes of an int4 K tile hold weights (two K positions a byte). EVEN_K (K % BLOCK_K
        == 0): all of them, as a constant the compiler can see. With the bound offs_b * 2 < K along
        the contiguous axis, the sm_90 build read the weights one byte at a time, synchronously (64
        LDG.E.U8 a thread per K step of the swapped gate_up kernel); without it they stream through
        cp.async (4-byte copies in the pairs order, 8-byte in the halves order)."""
        if EVEN_K:
            return tl.full(offs_b.shape, 1, tl.int1)
        else:
            return offs_b * 2 < K

    @triton.jit
    def _load_w_int4(w_ptr, s_ptr, z_ptr, e, rows, nmask, k0, K,
                     stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                     BLOCK_K: tl.constexpr, GROUP: tl.constexpr, CDT: tl.constexpr, EVEN_K: tl.constexpr):
        """Dequantised int4 tiles for K positions k0+2j (low nibbles) and k0+2j+1 (high).

        Returns two [BLOCK_K/2, BN] tiles: one contiguous byte load, no interleaving; the
        caller pairs them with the even and odd activation columns.
        """
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        bmask = _byte_mask(offs_b, K, EVEN_K)[:, None] & nmask[None, :]
        p = (w_ptr + e.to(tl.int64) * stride_we + rows[None, :].to(tl.int64) * stride_wn
             + offs_b[:, None] * stride_wk)
        b = tl.load(p, mask=bmask, other=0).to(tl.int32)
        lo = (b & 0xF).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
        if GROUP % BLOCK_K == 0:
            # the whole K tile lies in one group: one scale / zero per output row
            so = (e.to(tl.int64) * stride_se + rows.to(tl.int64) * stride_sn
                  + (k0 // GROUP) * stride_sk)
            s = tl.load(s_ptr + so, mask=nmask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + so, mask=nmask, other=0).to(tl.float32)[None, :]
        else:  # GROUP is even, so elements 2j and 2j+1 share a group
            so = (e.to(tl.int64) * stride_se + rows[None, :].to(tl.int64) * stride_sn
                  + ((offs_b[:, None] * 2) // GROUP) * stride_sk)
            s = tl.load(s_ptr + so, mask=bmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + so, mask=bmask, other=0).to(tl.float32)
        return ((lo - z) * s).to(CDT), ((hi - z) * s).to(CDT)

    @triton.jit
    def _nib(q, CDT: tl.constexpr, MAGIC: tl.constexpr):
        """Nibbles 0..15 as CDT. MAGIC 1 (bf16) / 2 (fp16): the value is built from its bits,
        0x4300 | q = 128 + q in bf16 and 0x6400 | q = 1024 + q in fp16 (no int->float
        conversion); the caller subtracts the offset through the folded zero point."""
        if MAGIC == 1:
            return (q.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
        elif MAGIC == 2:
            return (q.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        else:
            return q.to(tl.float32).to(CDT)

    @triton.jit
    def _int4_raw(w_ptr, e, rows, nmask, k0, K, stride_we, stride_wn, stride_wk,
                  BLOCK_K: tl.constexpr, CDT: tl.constexpr, MAGIC: tl.constexpr, EVEN_K: tl.constexpr):
        """Raw nibbles (0..15, exact in fp16/bf16) for K positions k0+2j (low) and k0+2j+1."""
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        bmask = _byte_mask(offs_b, K, EVEN_K)[:, None] & nmask[None, :]
        p = (w_ptr + e.to(tl.int64) * stride_we + rows[None, :].to(tl.int64) * stride_wn
             + offs_b[:, None] * stride_wk)
        b = tl.load(p, mask=bmask, other=0)
        return _nib(b & 0xF, CDT, MAGIC), _nib(b >> 4, CDT, MAGIC)

    @triton.jit
    def _int4_scale_zero(s_ptr, z_ptr, e, rows, nmask, g, stride_se, stride_sn, stride_sk):
        so = e.to(tl.int64) * stride_se + rows.to(tl.int64) * stride_sn + g * stride_sk
        s = tl.load(s_ptr + so, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + so, mask=nmask, other=0).to(tl.float32)
        return s, z

    @triton.jit
    def _int4_join(lo, hi, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Interleave low/high nibble tiles [BK/2, BN] into the [BK, BN] tile in K order."""
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))

    @triton.jit
    def _int4_tile_dot(a, q, s, z, acc, IEEE: tl.constexpr):
        """acc += a @ ((q - z) * s), as s * (a @ q - z * rowsum(a)); q is raw nibbles."""
        d = _dot(a, q, tl.zeros(acc.shape, dtype=tl.float32), IEEE)
        asum = tl.sum(a.to(tl.float32), axis=1)
        return acc + s[None, :] * (d - z[None, :] * asum[:, None])

    @triton.jit
    def _block_pairs(sorted_ids_ptr, pid_m, TK, BLOCK_M: tl.constexpr):
        """Rows of block pid_m in the sorted order, their (token, slot) pair ids, which are real."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        return offs_m, pair, pair < TK

    @triton.jit
    def _channel_scale(s_ptr, e, rows, nmask, stride_se, stride_sn):
        return tl.load(s_ptr + e.to(tl.int64) * stride_se + rows.to(tl.int64) * stride_sn,
                       mask=nmask, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _moe_gate_up_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr,
        TK, I, D, TOPK,
        stride_xt, stride_xd,
        stride_we, stride_wn, stride_wk,
        stride_se, stride_sn, stride_sk,
        stride_hm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr, WQ: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
        INT4_TILE_GROUP: tl.constexpr, MAGIC: tl.constexpr,
        BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        sx_ptr=None, hs_ptr=None, stride_hs=0, A8: tl.constexpr = False, GGML_RUNS: tl.constexpr = False,
        SWAP: tl.constexpr = False,
    ):
        """h[row] = gelu_tanh(gate[e] @ x[tok]) * (up[e] @ x[tok]) for one block x BLOCK_N cols.
        A8 (fp8 weights): x is fp8 with per-token scales sx; h is written in fp8 with one scale per
        row and BLOCK_N columns (hs_ptr[row, pid_n]), the down step's K tiles. SWAP (16-bit, int8 and
        fp8 weights): the dots run as W @ x^T (_swapped_dot), the weight rows the MMA's M."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m)
        if e < 0:  # surplus block of the upper-bound grid
            return
        offs_m, pair, valid = _block_pairs(sorted_ids_ptr, pid_m, TK, BLOCK_M)
        tok = pair // TOPK
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < I
        rows_g = offs_n
        rows_u = offs_n + I
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if INT4_TILE_GROUP:
            # int4 with each K tile inside one group; the next tile's scale/zero are loaded a
            # step ahead (small strided loads the pipeliner would leave on the critical path)
            sg, zg = _int4_scale_zero(s_ptr, z_ptr, e, rows_g, nmask, 0, stride_se, stride_sn, stride_sk)
            su, zu = _int4_scale_zero(s_ptr, z_ptr, e, rows_u, nmask, 0, stride_se, stride_sn, stride_sk)
            for k0 in range(0, D, BLOCK_K):
                gn = tl.minimum(k0 + BLOCK_K, D - 1) // GROUP
                sg_n, zg_n = _int4_scale_zero(s_ptr, z_ptr, e, rows_g, nmask, gn,
                                              stride_se, stride_sn, stride_sk)
                su_n, zu_n = _int4_scale_zero(s_ptr, z_ptr, e, rows_u, nmask, gn,
                                              stride_se, stride_sn, stride_sk)
                g_lo, g_hi = _int4_raw(w_ptr, e, rows_g, nmask, k0, D, stride_we, stride_wn,
                                       stride_wk, BLOCK_K, CDT, MAGIC, EVEN_K)
                u_lo, u_hi = _int4_raw(w_ptr, e, rows_u, nmask, k0, D, stride_we, stride_wn,
                                       stride_wk, BLOCK_K, CDT, MAGIC, EVEN_K)
                a = _load_rows(x_ptr, tok, valid, stride_xt, stride_xd, k0 + tl.arange(0, BLOCK_K), D, CDT)
                acc_g = _int4_tile_dot(a, _int4_join(g_lo, g_hi, BLOCK_K, BLOCK_N), sg, zg + BIAS, acc_g, IEEE)
                acc_u = _int4_tile_dot(a, _int4_join(u_lo, u_hi, BLOCK_K, BLOCK_N), su, zu + BIAS, acc_u, IEEE)
                sg, zg, su, zu = sg_n, zg_n, su_n, zu_n
        else:
            for k0 in range(0, D, BLOCK_K):
                if WQ == 1:
                    offs_ev = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                    a_ev = _load_rows(x_ptr, tok, valid, stride_xt, stride_xd, offs_ev, D, CDT)
                    a_od = _load_rows(x_ptr, tok, valid, stride_xt, stride_xd, offs_ev + 1, D, CDT)
                    g_lo, g_hi = _load_w_int4(w_ptr, s_ptr, z_ptr, e, rows_g, nmask, k0, D,
                                              stride_we, stride_wn, stride_wk,
                                              stride_se, stride_sn, stride_sk, BLOCK_K, GROUP, CDT, EVEN_K)
                    u_lo, u_hi = _load_w_int4(w_ptr, s_ptr, z_ptr, e, rows_u, nmask, k0, D,
                                              stride_we, stride_wn, stride_wk,
                                              stride_se, stride_sn, stride_sk, BLOCK_K, GROUP, CDT, EVEN_K)
                    acc_g = _dot(a_ev, g_lo, acc_g, IEEE)
                    acc_g = _dot(a_od, g_hi, acc_g, IEEE)
                    acc_u = _dot(a_ev, u_lo, acc_u, IEEE)
                    acc_u = _dot(a_od, u_hi, acc_u, IEEE)
                else:
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    a = _load_rows(x_ptr, tok, valid, stride_xt, stride_xd, offs_k, D, CDT)
                    wg = _load_w(w_ptr, e, rows_g, nmask, offs_k, D, stride_we, stride_wn, stride_wk,
                                 WQ, CDT, A8, k0, BLOCK_K, GGML_RUNS)
                    wu = _load_w(w_ptr, e, rows_u, nmask, offs_k, D, stride_we, stride_wn, stride_wk,
                                 WQ, CDT, A8, k0, BLOCK_K, GGML_RUNS)
                    if SWAP:
                        acc_g = _swapped_dot(a, wg, acc_g, IEEE)
                        acc_u = _swapped_dot(a, wu, acc_u, IEEE)
                    else:
                        acc_g = _dot(a, wg, acc_g, IEEE)
                        acc_u = _dot(a, wu, acc_u, IEEE)
        if WQ == 2 or WQ == 3:  # int8 / fp8: per-output-channel scale on the accumulator
            acc_g = acc_g * _channel_scale(s_ptr, e, rows_g, nmask, stride_se, stride_sn)
            acc_u = acc_u * _channel_scale(s_ptr, e, rows_u, nmask, stride_se, stride_sn)
        if A8:  # the tokens' own scales
            sx = tl.load(sx_ptr + tok, mask=valid, other=0.0)[:, None]
            acc_g = acc_g * sx
            acc_u = acc_u * sx
        # gelu_tanh(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3))  (exact identity)
        inner = 1.5957691216057308 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        hval = acc_g / (1.0 + tl.exp(-inner)) * acc_u
        if A8:  # fp8 per (row, BLOCK_N columns): scale = max |h| / 448 (1 where the tile is 0)
            hmax = tl.max(tl.where(nmask[None, :], tl.abs(hval), 0.0), axis=1)
            hsc = tl.where(hmax > 0, hmax / 448.0, 1.0)
            hval = _fp8(hval / hsc[:, None])
            tl.store(hs_ptr + offs_m.to(tl.int64) * stride_hs + pid_n, hsc)
        tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :],
                 hval.to(h_ptr.dtype.element_ty), mask=nmask[None, :])

    @triton.jit
    def _moe_down_kernel(
        h_ptr, w_ptr, s_ptr, z_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, topk_w_ptr,
        TK, D, I,
        stride_hm,
        stride_we, stride_wn, stride_wk,
        stride_se, stride_sn, stride_sk,
        stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr, WQ: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr,
        INT4_TILE_GROUP: tl.constexpr, MAGIC: tl.constexpr,
        BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        hs_ptr=None, stride_hs=0, A8: tl.constexpr = False, GGML_RUNS: tl.constexpr = False,
        SWAP: tl.constexpr = False,
    ):
        """out[pair] = w[pair] * down[e] @ h[row] (fp32), one row per (token, slot) pair. A8: h in
        fp8 with a scale per row and K tile (hs_ptr), each tile's dot scaled before it is added.
        SWAP: as in the gate_up kernel."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m)
        if e < 0:
            return
        offs_m, pair, valid = _block_pairs(sorted_ids_ptr, pid_m, TK, BLOCK_M)
        all_rows = offs_m >= 0
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if INT4_TILE_GROUP:
            sc, zc = _int4_scale_zero(s_ptr, z_ptr, e, offs_n, nmask, 0, stride_se, stride_sn, stride_sk)
            for k0 in range(0, I, BLOCK_K):
                gn = tl.minimum(k0 + BLOCK_K, I - 1) // GROUP
                sc_n, zc_n = _int4_scale_zero(s_ptr, z_ptr, e, offs_n, nmask, gn,
                                              stride_se, stride_sn, stride_sk)
                w_lo, w_hi = _int4_raw(w_ptr, e, offs_n, nmask, k0, I, stride_we, stride_wn,
                                       stride_wk, BLOCK_K, CDT, MAGIC, EVEN_K)
                a = _load_rows(h_ptr, offs_m, all_rows, stride_hm, 1, k0 + tl.arange(0, BLOCK_K), I, CDT)
                acc = _int4_tile_dot(a, _int4_join(w_lo, w_hi, BLOCK_K, BLOCK_N), sc, zc + BIAS, acc, IEEE)
                sc, zc = sc_n, zc_n
        else:
            for k0 in range(0, I, BLOCK_K):
                if WQ == 1:
                    offs_ev = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                    a_ev = _load_rows(h_ptr, offs_m, all_rows, stride_hm, 1, offs_ev, I, CDT)
                    a_od = _load_rows(h_ptr, offs_m, all_rows, stride_hm, 1, offs_ev + 1, I, CDT)
                    w_lo, w_hi = _load_w_int4(w_ptr, s_ptr, z_ptr, e, offs_n, nmask, k0, I,
                                              stride_we, stride_wn, stride_wk,
                                              stride_se, stride_sn, stride_sk, BLOCK_K, GROUP, CDT, EVEN_K)
                    acc = _dot(a_ev, w_lo, acc, IEEE)
                    acc = _dot(a_od, w_hi, acc, IEEE)
                else:
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    a = _load_rows(h_ptr, offs_m, all_rows, stride_hm, 1, offs_k, I, CDT)
                    w = _load_w(w_ptr, e, offs_n, nmask, offs_k, I, stride_we, stride_wn, stride_wk,
                                WQ, CDT, A8, k0, BLOCK_K, GGML_RUNS)
                    if A8:
                        hsc = tl.load(hs_ptr + offs_m.to(tl.int64) * stride_hs + k0 // BLOCK_K)
                        acc += _dot(a, w, tl.zeros(acc.shape, dtype=tl.float32), IEEE) * hsc[:, None]
                    elif SWAP:
                        acc = _swapped_dot(a, w, acc, IEEE)
                    else:
                        acc = _dot(a, w, acc, IEEE)
        if WQ == 2 or WQ == 3:
            acc = acc * _channel_scale(s_ptr, e, offs_n, nmask, stride_se, stride_sn)
        rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
        tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc,
                 mask=valid[:, None] & nmask[None, :])

    # -- int4 with the operands swapped: out^T = W @ x^T -------------------------------------
    # At ~16 pairs per expert the token tile is too short for Hopper's wgmma (M >= 64) and the
    # dequantised weight tile, made in registers, would have to go through shared memory as the
    # B operand. Swapped, the weight rows are the M dimension (64 per program), the pairs the N
    # dimension, and the dequantised tile is the register-held A operand.

    @triton.jit
    def _int4_nibbles(w_ptr, e, rows, nmask, k0, K, stride_we, stride_wn, stride_wk,
                      BLOCK_K: tl.constexpr, CDT: tl.constexpr, MAGIC: tl.constexpr, EVEN_K: tl.constexpr):
        """Raw low and high nibbles [BN, BK/2] of bytes k0/2.. of weight rows `rows`: K positions
        k0 + 2j and k0 + 2j + 1 in the pairs order; in the halves order (kpack = BLOCK_K) the two
        halves of the K tile, k0 + j and k0 + BK/2 + j."""
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = (w_ptr + e.to(tl.int64) * stride_we + rows[:, None].to(tl.int64) * stride_wn
             + offs_b[None, :] * stride_wk)
        b = tl.load(p, mask=nmask[:, None] & _byte_mask(offs_b, K, EVEN_K)[None, :], other=0)
        return _nib(b & 0xF, CDT, MAGIC), _nib(b >> 4, CDT, MAGIC)

    @triton.jit
    def _frag_pairs(W, MAGIC: tl.constexpr, LOP3: tl.constexpr):
        """Nibbles j and j + 4 of 32-bit words as two 16-bit halves: raw (0..15), or with the
        magic bits of 128 + q (bf16) / 1024 + q (fp16) set. LOP3 (GPU builds): the mask and the
        magic bits in one lop3 (immLut 0xEA = (a & b) | c); written as two operations, each with
        its constant as an immediate, ptxas emitted two LOP3 per register (sm_90)."""
        if MAGIC == 0:
            out = W & 0x000F000F
        else:
            bits = tl.full(W.shape, (0x4300 + (MAGIC - 1) * 0x2100) * 0x10001, tl.int32)  # 0x43004300 / 0x64006400
            if LOP3:
                out = tl.inline_asm_elementwise("lop3.b32 $0, $1, 983055, $2, 234;", "=r,r,r", [W, bits],
                                                dtype=tl.int32, is_pure=True, pack=1)
            else:
                out = (W & 0x000F000F) | bits
        return out

    @triton.jit
    def _frag_half(R, SHIFT: tl.constexpr, CDT: tl.constexpr, MAGIC: tl.constexpr):
        v = ((R >> SHIFT) & 0xFFFF).to(tl.uint16)
        if MAGIC == 1:
            out = v.to(tl.bfloat16, bitcast=True)
        elif MAGIC == 2:
            out = v.to(tl.float16, bitcast=True)
        else:
            out = v.to(tl.float32).to(CDT)
        return out

    @triton.jit
    def _int4_rows(w_ptr, e, rows, nmask, k0, K, stride_we, stride_wn, stride_wk,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CDT: tl.constexpr, MAGIC: tl.constexpr,
                   EVEN_K: tl.constexpr, FRAG: tl.constexpr, LOP3: tl.constexpr = False):
        """[BN, BK] raw nibbles of weight rows `rows`, K positions k0.. in order: from the pairs
        order (a join on the last axis is the natural interleave), or (FRAG) from 32-bit words in
        the fragments order (the permute below undoes the repack's; in the MMA's register layout
        it moves nothing)."""
        if FRAG:
            w32 = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            p = (w32 + e.to(tl.int64) * (stride_we // 4) + rows[:, None].to(tl.int64) * (stride_wn // 4)
                 + offs_w[None, :])
            W = tl.reshape(tl.load(p, mask=nmask[:, None], other=0), (BLOCK_N, 4, BLOCK_K // 32))  # [n, t, i]
            R = tl.join(tl.join(_frag_pairs(W, MAGIC, LOP3), _frag_pairs(W >> 4, MAGIC, LOP3)),
                        tl.join(_frag_pairs(W >> 8, MAGIC, LOP3), _frag_pairs(W >> 12, MAGIC, LOP3)))
            H = tl.join(_frag_half(R, 0, CDT, MAGIC), _frag_half(R, 16, CDT, MAGIC))  # [n, t, i, c, d, half]
            out = tl.reshape(tl.permute(H, (0, 2, 4, 3, 1, 5)), (BLOCK_N, BLOCK_K))
        else:
            lo, hi = _int4_nibbles(w_ptr, e, rows, nmask, k0, K, stride_we, stride_wn, stride_wk, BLOCK_K, CDT,
                                   MAGIC, EVEN_K)
            out = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        return out

    @triton.jit
    def _cols_t(ptr, cols, col_mask, stride_c, stride_k, k0, K, BLOCK_K: tl.constexpr, CDT: tl.constexpr):
        """[BK, BM] tile ptr[cols, k0..]^T (activation rows as columns), zero outside."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        p = ptr + cols[None, :].to(tl.int64) * stride_c + offs_k[:, None] * stride_k
        return tl.load(p, mask=col_mask[None, :] & (offs_k[:, None] < K), other=0.0).to(CDT)

    @triton.jit
    def _int4_dot_t(wq, xt, s, z, xs, acc, IEEE: tl.constexpr, XSUM: tl.constexpr):
        """acc^T += ((q - z) * s) @ x^T, as s * (q @ x^T - z * colsum(x^T)). XSUM: colsum(x^T)
        is `xs`, summed before the kernel (tile_sums); otherwise reduced here, across warps."""
        d = _dot(wq, xt, tl.zeros(acc.shape, dtype=tl.float32), IEEE)
        if not XSUM:
            xs = tl.sum(xt.to(tl.float32), axis=0)
        return acc + s[:, None] * (d - z[:, None] * xs[None, :])

    @triton.jit
    def _int4_halves_dot_t(lo, hi, xt_lo, xt_hi, s, z, xs, acc, IEEE: tl.constexpr, XSUM: tl.constexpr):
        """_int4_dot_t for a K tile in halves: q = [lo | hi] along K, x^T = [xt_lo; xt_hi]."""
        d = _dot(lo, xt_lo, tl.zeros(acc.shape, dtype=tl.float32), IEEE)
        d = _dot(hi, xt_hi, d, IEEE)
        if not XSUM:
            xs = tl.sum(xt_lo.to(tl.float32), axis=0) + tl.sum(xt_hi.to(tl.float32), axis=0)
        return acc + s[:, None] * (d - z[:, None] * xs[None, :])

    @triton.jit
    def _tile_sum(xs_ptr, rows, row_mask, stride_r, tile, XSUM: tl.constexpr):
        """Sums of K tile `tile` of activation rows `rows` (0 where masked; XSUM only)."""
        if XSUM:
            return tl.load(xs_ptr + rows.to(tl.int64) * stride_r + tile, mask=row_mask, other=0.0)
        else:
            return tl.zeros(rows.shape, dtype=tl.float32)

    @triton.jit
    def _tile_sums_kernel(x_ptr, out_ptr, D, stride_x, stride_o,
                          BLOCK_K: tl.constexpr, TILES: tl.constexpr, CDT: tl.constexpr):
        """out[r, j] = sum of x[r, j*BK:(j+1)*BK] as the MoE's dot sees it (converted to CDT)."""
        r = tl.program_id(0)
        offs = tl.arange(0, TILES)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        v = tl.load(x_ptr + r.to(tl.int64) * stride_x + offs, mask=offs < D, other=0.0).to(CDT)
        tl.store(out_ptr + r.to(tl.int64) * stride_o + tl.arange(0, TILES), tl.sum(v.to(tl.float32), axis=1),
                 mask=tl.arange(0, TILES) * BLOCK_K < D)

    @triton.jit
    def _moe_gate_up_int4t_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, xs_ptr, hs_ptr,
        TK, I, D, TOPK,
        stride_xt, stride_xd, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_hm,
        stride_xs, stride_hs,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
        CDT: tl.constexpr, IEEE: tl.constexpr, MAGIC: tl.constexpr, BIAS: tl.constexpr, HALVES: tl.constexpr,
        EVEN_K: tl.constexpr, XSUM: tl.constexpr, HSUM: tl.constexpr, FRAG: tl.constexpr, LOP3: tl.constexpr,
        ONE_DOT: tl.constexpr = False,
    ):
        """The gate_up step for int4 weights whose K tiles lie inside one group, swapped (HALVES:
        the weight is in the halves nibble order for K tiles of BLOCK_K, two dots per tile).
        XSUM: x's K-tile sums come from xs_ptr [T, tiles]; HSUM: the program also writes its h
        tile's row sums to hs_ptr[row, pid_n] (the down step's K tiles are then its BLOCK_N)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m)
        if e < 0:
            return
        offs_m, pair, valid = _block_pairs(sorted_ids_ptr, pid_m, TK, BLOCK_M)
        tok = pair // TOPK
        rows_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rows_g < I
        rows_u = rows_g + I
        if ONE_DOT:  # gate rows then up rows as one [2 BN, BK] operand: one dot (and one wait) a K tile
            r2 = tl.arange(0, 2 * BLOCK_N)
            rows = pid_n * BLOCK_N + r2 % BLOCK_N + (r2 // BLOCK_N) * I
            m2 = (pid_n * BLOCK_N + r2 % BLOCK_N) < I
            acc = tl.zeros((2 * BLOCK_N, BLOCK_M), dtype=tl.float32)
            s2, z2 = _int4_scale_zero(s_ptr, z_ptr, e, rows, m2, 0, stride_se, stride_sn, stride_sk)
            xs = _tile_sum(xs_ptr, tok, valid, stride_xs, 0, XSUM)
            for k0 in range(0, D, BLOCK_K):
                gn = tl.minimum(k0 + BLOCK_K, D - 1) // GROUP
                s2_n, z2_n = _int4_scale_zero(s_ptr, z_ptr, e, rows, m2, gn, stride_se, stride_sn, stride_sk)
                xs_n = _tile_sum(xs_ptr, tok, valid, stride_xs, tl.minimum(k0 + BLOCK_K, D - 1) // BLOCK_K, XSUM)
                xt = _cols_t(x_ptr, tok, valid, stride_xt, stride_xd, k0, D, BLOCK_K, CDT)
                q2 = _int4_rows(w_ptr, e, rows, m2, k0, D, stride_we, stride_wn, stride_wk,
                                2 * BLOCK_N, BLOCK_K, CDT, MAGIC, EVEN_K, FRAG, LOP3)
                acc = _int4_dot_t(q2, xt, s2, z2 + BIAS, xs, acc, IEEE, XSUM)
                s2, z2, xs = s2_n, z2_n, xs_n
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N, BLOCK_M)), (1, 2, 0)))
        else:
            acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            sg, zg = _int4_scale_zero(s_ptr, z_ptr, e, rows_g, nmask, 0, stride_se, stride_sn, stride_sk)
            su, zu = _int4_scale_zero(s_ptr, z_ptr, e, rows_u, nmask, 0, stride_se, stride_sn, stride_sk)
            xs = _tile_sum(xs_ptr, tok, valid, stride_xs, 0, XSUM)
            for k0 in range(0, D, BLOCK_K):
                gn = tl.minimum(k0 + BLOCK_K, D - 1) // GROUP
                sg_n, zg_n = _int4_scale_zero(s_ptr, z_ptr, e, rows_g, nmask, gn, stride_se, stride_sn, stride_sk)
                su_n, zu_n = _int4_scale_zero(s_ptr, z_ptr, e, rows_u, nmask, gn, stride_se, stride_sn, stride_sk)
                xs_n = _tile_sum(xs_ptr, tok, valid, stride_xs, tl.minimum(k0 + BLOCK_K, D - 1) // BLOCK_K, XSUM)
                if HALVES:
                    xt_lo = _cols_t(x_ptr, tok, valid, stride_xt, stride_xd, k0, D, BLOCK_K // 2, CDT)
                    xt_hi = _cols_t(x_ptr, tok, valid, stride_xt, stride_xd, k0 + BLOCK_K // 2, D, BLOCK_K // 2, CDT)
                    g_lo, g_hi = _int4_nibbles(w_ptr, e, rows_g, nmask, k0, D, stride_we, stride_wn, stride_wk,
                                               BLOCK_K, CDT, MAGIC, EVEN_K)
                    u_lo, u_hi = _int4_nibbles(w_ptr, e, rows_u, nmask, k0, D, stride_we, stride_wn, stride_wk,
                                               BLOCK_K, CDT, MAGIC, EVEN_K)
                    acc_g = _int4_halves_dot_t(g_lo, g_hi, xt_lo, xt_hi, sg, zg + BIAS, xs, acc_g, IEEE, XSUM)
                    acc_u = _int4_halves_dot_t(u_lo, u_hi, xt_lo, xt_hi, su, zu + BIAS, xs, acc_u, IEEE, XSUM)
                else:
                    xt = _cols_t(x_ptr, tok, valid, stride_xt, stride_xd, k0, D, BLOCK_K, CDT)
                    gq = _int4_rows(w_ptr, e, rows_g, nmask, k0, D, stride_we, stride_wn, stride_wk,
                                    BLOCK_N, BLOCK_K, CDT, MAGIC, EVEN_K, FRAG, LOP3)
                    uq = _int4_rows(w_ptr, e, rows_u, nmask, k0, D, stride_we, stride_wn, stride_wk,
                                    BLOCK_N, BLOCK_K, CDT, MAGIC, EVEN_K, FRAG, LOP3)
                    acc_g = _int4_dot_t(gq, xt, sg, zg + BIAS, xs, acc_g, IEEE, XSUM)
                    acc_u = _int4_dot_t(uq, xt, su, zu + BIAS, xs, acc_u, IEEE, XSUM)
                sg, zg, su, zu, xs = sg_n, zg_n, su_n, zu_n, xs_n
        inner = 1.5957691216057308 * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        hval = (acc_g / (1.0 + tl.exp(-inner)) * acc_u).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs_m[None, :].to(tl.int64) * stride_hm + rows_g[:, None], hval, mask=nmask[:, None])
        if HSUM:  # the stored values, as the down step reads them (in h's dtype: its CDT)
            hs = tl.sum(tl.where(nmask[:, None], hval.to(tl.float32), 0.0), axis=0)
            tl.store(hs_ptr + offs_m.to(tl.int64) * stride_hs + pid_n, hs)

    @triton.jit
    def _moe_down_int4t_kernel(
        h_ptr, w_ptr, s_ptr, z_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, topk_w_ptr, hs_ptr,
        TK, D, I,
        stride_hm, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_om, stride_hs,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
        CDT: tl.constexpr, IEEE: tl.constexpr, MAGIC: tl.constexpr, BIAS: tl.constexpr, HALVES: tl.constexpr,
        EVEN_K: tl.constexpr, XSUM: tl.constexpr, FRAG: tl.constexpr, LOP3: tl.constexpr,
    ):
        """The down step for int4 weights whose K tiles lie inside one group, swapped (HALVES as
        in the gate_up step)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m)
        if e < 0:
            return
        offs_m, pair, valid = _block_pairs(sorted_ids_ptr, pid_m, TK, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < D
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        sc, zc = _int4_scale_zero(s_ptr, z_ptr, e, offs_n, nmask, 0, stride_se, stride_sn, stride_sk)
        hsum = _tile_sum(hs_ptr, offs_m, offs_m >= 0, stride_hs, 0, XSUM)
        for k0 in range(0, I, BLOCK_K):
            gn = tl.minimum(k0 + BLOCK_K, I - 1) // GROUP
            sc_n, zc_n = _int4_scale_zero(s_ptr, z_ptr, e, offs_n, nmask, gn, stride_se, stride_sn, stride_sk)
            hsum_n = _tile_sum(hs_ptr, offs_m, offs_m >= 0, stride_hs, tl.minimum(k0 + BLOCK_K, I - 1) // BLOCK_K, XSUM)
            if HALVES:
                at_lo = _cols_t(h_ptr, offs_m, offs_m >= 0, stride_hm, 1, k0, I, BLOCK_K // 2, CDT)
                at_hi = _cols_t(h_ptr, offs_m, offs_m >= 0, stride_hm, 1, k0 + BLOCK_K // 2, I, BLOCK_K // 2, CDT)
                w_lo, w_hi = _int4_nibbles(w_ptr, e, offs_n, nmask, k0, I, stride_we, stride_wn, stride_wk,
                                           BLOCK_K, CDT, MAGIC, EVEN_K)
                acc = _int4_halves_dot_t(w_lo, w_hi, at_lo, at_hi, sc, zc + BIAS, hsum, acc, IEEE, XSUM)
            else:
                at = _cols_t(h_ptr, offs_m, offs_m >= 0, stride_hm, 1, k0, I, BLOCK_K, CDT)
                wq = _int4_rows(w_ptr, e, offs_n, nmask, k0, I, stride_we, stride_wn, stride_wk,
                                BLOCK_N, BLOCK_K, CDT, MAGIC, EVEN_K, FRAG, LOP3)
                acc = _int4_dot_t(wq, at, sc, zc + BIAS, hsum, acc, IEEE, XSUM)
            sc, zc, hsum = sc_n, zc_n, hsum_n
        rw = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * rw[None, :]
        tl.store(out_ptr + pair[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc,
                 mask=valid[None, :] & nmask[:, None])

    @triton.jit
    def _fp8(v):
        """fp32 (|v| <= 448) -> fp8 e4m3, round to nearest even, done in fp32 arithmetic: adding
        1.5 * 2^23 ulp rounds to a multiple of the value's e4m3 ulp (2^(e-3); 2^-9 below 2^-6), and the
        conversion of the rounded value is exact. (The interpreter's own fp32 -> fp8 conversion lost
        a binade where the mantissa rounds up: 127.97 -> 64.)"""
        eb = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
        ulp = tl.where(eb >= 121, (eb - 3) << 23, 118 << 23).to(tl.float32, bitcast=True)
        big = ulp * 12582912.0
        r = tl.where(v < 0, -((-v + big) - big), (v + big) - big)
        return r.to(tl.float8e4nv)

    @triton.jit
    def _fp8_rows_kernel(x_ptr, out_ptr, s_ptr, D, stride_x, stride_o, BLOCK_D: tl.constexpr):
        """One row: s = max |x| / 448 (1 for a zero row), out = x / s in fp8 e4m3 (fp8_rows)."""
        r = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        v = tl.load(x_ptr + r.to(tl.int64) * stride_x + d, mask=d < D, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(v), axis=0)
        sc = tl.where(amax > 0, amax / 448.0, 1.0)
        tl.store(out_ptr + r.to(tl.int64) * stride_o + d, _fp8(v / sc), mask=d < D)
        tl.store(s_ptr + r, sc)

    @triton.jit
    def _sum_slots_kernel(pairs_ptr, idx_ptr, out_ptr, D, E, stride_o, K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[t] = sum over the slots k of token t routed to an expert (0 <= idx < E) of pairs[t*K + k],
        in fp32, in slot order, cast once: no zeroed [T*K, D] buffer, no separate cast."""
        t = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for k in tl.static_range(K):
            e = tl.load(idx_ptr + t * K + k)
            routed = (e >= 0) & (e < E)
            acc += tl.load(pairs_ptr + (t * K + k).to(tl.int64) * D + d, mask=(d < D) & routed, other=0.0)
        tl.store(out_ptr + t.to(tl.int64) * stride_o + d, acc.to(out_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def _align_count_kernel(idx_ptr, chunk_counts_ptr, sorted_ids_ptr, TK, E, n_sorted,
                            fill_per_prog,
                            CHUNK: tl.constexpr, EP: tl.constexpr, FILL: tl.constexpr):
        """Per-chunk expert histogram [n_chunks, EP]; also fills sorted_ids with TK (padding)."""
        c = tl.program_id(0)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        key = tl.load(idx_ptr + offs, mask=offs < TK, other=-1).to(tl.int32)
        key = tl.where((key >= 0) & (key < E), key, -1)
        ex = tl.arange(0, EP)
        onehot = (key[:, None] == ex[None, :]).to(tl.int32)
        tl.store(chunk_counts_ptr + c * EP + ex, tl.sum(onehot, axis=0))
        for f0 in range(0, fill_per_prog, FILL):
            j = f0 + tl.arange(0, FILL)
            o = c * fill_per_prog + j
            tl.store(sorted_ids_ptr + o, tl.zeros((FILL,), tl.int32) + TK,
                     mask=(j < fill_per_prog) & (o < n_sorted))

    @triton.jit
    def _align_scatter_kernel(idx_ptr, chunk_counts_ptr, sorted_ids_ptr, block_expert_ptr,
                              TK, E, n_chunks, num_blocks, blocks_per_prog,
                              CHUNK: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr,
                              BB: tl.constexpr):
        """Stable placement: pair p of expert e goes to row_start[e] + (its rank within e)."""
        c = tl.program_id(0)
        ex = tl.arange(0, EP)
        total = tl.zeros((EP,), tl.int32)
        before = tl.zeros((EP,), tl.int32)
        for j in range(0, n_chunks):
            row = tl.load(chunk_counts_ptr + j * EP + ex)
            total += row
            before += tl.where(j < c, row, 0)
        nblk = (total + BLOCK_M - 1) // BLOCK_M
        blk_end = tl.cumsum(nblk, axis=0)
        base = (blk_end - nblk) * BLOCK_M + before
        offs = c * CHUNK + tl.arange(0, CHUNK)
        key = tl.load(idx_ptr + offs, mask=offs < TK, other=-1).to(tl.int32)
        key = tl.where((key >= 0) & (key < E), key, -1)
        onehot = (key[:, None] == ex[None, :]).to(tl.int32)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        dest = tl.sum(onehot * base[None, :], axis=1) + rank
        tl.store(sorted_ids_ptr + dest, offs, mask=key >= 0)
        jb = tl.arange(0, BB)
        b = c * blocks_per_prog + jb
        eb = tl.sum((blk_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(eb < E, eb, -1),
                 mask=(jb < blocks_per_prog) & (b < num_blocks))


def _num_blocks(TK: int, E: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / BLOCK_M) (at most min(E, TK) experts are non-empty)."""
    return (TK + min(E, TK) * (block_m - 1)) // block_m


def _align_torch(topk_index: torch.Tensor, E: int, block_m: int):
    """Torch version of the align step (reference for the Triton one; identical output).

    Returns sorted_ids [num_blocks * BLOCK_M] int32 (pair index t*K + k, or T*K for padding),
    block_expert [num_blocks] int32 (-1 for surplus blocks) and num_blocks (an upper bound).
    """
    dev = topk_index.device
    flat_e = topk_index.reshape(-1).long()
    TK = flat_e.numel()
    key = torch.where((flat_e >= 0) & (flat_e < E), flat_e, torch.full_like(flat_e, E))
    counts = torch.bincount(key, minlength=E + 1)
    nblk = torch.div(counts[:E] + (block_m - 1), block_m, rounding_mode="floor")
    blk_end = torch.cumsum(nblk, 0)
    row_start = (blk_end - nblk) * block_m  # first padded row of each expert
    cnt_start = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    num_blocks = _num_blocks(TK, E, block_m)
    order = torch.argsort(key, stable=True)
    skey = key[order]
    rank = torch.arange(TK, device=dev) - cnt_start[skey]
    row_start_x = torch.cat([row_start, row_start.new_full((1,), num_blocks * block_m)])
    dest = row_start_x[skey] + rank  # dropped pairs land past the end
    sorted_ids = torch.full((num_blocks * block_m + TK,), TK, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    sorted_ids = sorted_ids[: num_blocks * block_m]
    blocks = torch.arange(num_blocks, device=dev)
    bexp = torch.searchsorted(blk_end, blocks, right=True)
    block_expert = torch.where(bexp < E, bexp, torch.full_like(bexp, -1)).to(torch.int32)
    return sorted_ids, block_expert, num_blocks


def _align(topk_index: torch.Tensor, E: int, block_m: int, chunk: int = 128):
    """The align step in two Triton launches (no host sync, no sort); see _align_torch. Chunks of
    128 pairs: with 256 the scatter's [chunk, 128 experts] rank tile spilled (sm_90, 92-144 B)."""
    flat = topk_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    TK = flat.numel()
    dev = flat.device
    num_blocks = _num_blocks(TK, E, block_m)
    chunk = min(chunk, triton.next_power_of_2(TK))
    n_chunks = triton.cdiv(TK, chunk)
    ep = max(16, triton.next_power_of_2(E))
    n_sorted = num_blocks * block_m
    sorted_ids = torch.empty(n_sorted, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    counts = torch.empty(n_chunks, ep, dtype=torch.int32, device=dev)
    fill_per_prog = triton.cdiv(n_sorted, n_chunks)
    _align_count_kernel[(n_chunks,)](flat, counts, sorted_ids, TK, E, n_sorted, fill_per_prog,
                                     CHUNK=chunk, EP=ep, FILL=min(1024, triton.next_power_of_2(fill_per_prog)),
                                     num_warps=4)
    bpp = triton.cdiv(num_blocks, n_chunks)
    _align_scatter_kernel[(n_chunks,)](flat, counts, sorted_ids, block_expert, TK, E, n_chunks,
                                       num_blocks, bpp, CHUNK=chunk, EP=ep, BLOCK_M=block_m,
                                       BB=max(16, triton.next_power_of_2(bpp)), num_warps=8)
    return sorted_ids, block_expert, num_blocks


_TL_DTYPES = {}


def _tl_dtype(dt: torch.dtype):
    if not _TL_DTYPES:
        _TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16,
                           torch.bfloat16: tl.bfloat16, torch.float8_e4m3fn: tl.float8e4nv})
    return _TL_DTYPES[dt]


def _weight_args(w, device):
    """(qweight, scale, zero, strides..., group, wq code) for a plain or quantized [E, N, K]."""
    if isinstance(w, GGMLWeight):  # the raw blocks; the kernel decodes scales and quants itself
        b = w.blocks
        return b, b, b, b.stride(), (0, 0, 0), 1, 100 + int(w.qtype)
    if isinstance(w, QuantizedWeight):
        q = w.qweight
        s = w.scale
        if w.scheme == "int4":
            s = s.contiguous()
            z = w.zero.contiguous()
            ss = s.stride()
        else:
            z = s
            ss = (s.stride(0), s.stride(1), 0)
        return q, s, z, q.stride(), ss, int(w.group_size), _WQ_CODE[w.scheme]
    return w, w, w, w.stride(), (0, 0, 0), 1, 0


def _default_config(T: int, K: int, E: int, D: int, I: int, interp: bool, int4: bool = False,
                    ggml: bool = False) -> dict:
    """Tile sizes. GPU numbers behind them (H100, bf16 activations, D=2816, I=704, E=128,
    K=8, one call = one layer): BLOCK_M 16 vs 32 made no difference for bf16/int8 at T=256,
    BLOCK_M 64 was 5-8% faster at T=1024. int4, swapped, at T=256 (H200, the run in
    benchmarks/results): the defaults 0.95 ms, BLOCK_M 16 1.13, BLOCK_M 64 1.23, BLOCK_N 128
    1.02, num_stages 3 1.25; an earlier run (defaults 0.97 ms): num_stages 2 1.06, 5 1.12,
    BLOCK_K 64 1.29, BLOCK_N 128 with 8 warps 1.20. At T=2048 BLOCK_M 64 and 32 within 4%.
    The H200 run at 28dc59a (benchmarks/results/gpu_check_h200_28dc59a.log; the kernel as now):
    int4 at T=256 BLOCK_M 32 0.667 ms, 16 0.615, 64 1.066 -> 16; at T=2048 64 1.856, 32 1.980.
    GGUF blocks (decoded per element): chosen by ptxas first (benchmarks/sm90_build.py): with the
    int4 tiles, Q6_K / IQ4_XS gate_up tiles spilled 0.8-2.4 KB a thread on Triton 3.7.1 and 6-22 KB
    on 3.6.0; 32 x 32 with 2 stages spills nothing for any type, T or version, nor does K 64 x N 32
    with 3 stages, which the same H200 run timed at 1.541 ms against 1.994 (Q4_K / Q5_0, T=256)
    -> K 64 x N 32, 3 stages where an expert gets few rows; T=2048 not timed -> 32 x 32 there."""
    if interp:  # few, big programs: the interpreter's cost is programs x ops
        bm = 16 if T * K <= 16 * E else 32
        return dict(BLOCK_M=bm, BLOCK_N1=64, BLOCK_K1=64, BLOCK_N2=64, BLOCK_K2=64,
                    num_warps=4, num_stages=1, SWAP_AB=int4)
    per_expert = T * K / max(E, 1)
    if ggml:
        bk, st = (64, 3) if per_expert <= 24 else (32, 2)
        return dict(BLOCK_M=16 if per_expert <= 24 else 64, BLOCK_N1=32, BLOCK_K1=bk, BLOCK_N2=32, BLOCK_K2=bk,
                    num_warps=4, num_stages=st, SWAP_AB=False)
    bm = 16 if per_expert <= 24 else 64
    return dict(BLOCK_M=bm, BLOCK_N1=64, BLOCK_K1=128, BLOCK_N2=64, BLOCK_K2=64,
                num_warps=4, num_stages=4, SWAP_AB=int4)


def tile_sums(x: torch.Tensor, block_k: int, cdt: torch.dtype) -> torch.Tensor:
    """[T, ceil(D / block_k)] fp32 sums of x's K tiles, each element first rounded to `cdt` as the
    MoE's dot reads it (one launch). The int4 kernels fold the zero point as z * (tile sum)."""
    T, D = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    tiles = triton.cdiv(D, block_k)
    out = torch.empty(T, tiles, dtype=torch.float32, device=x.device)
    _tile_sums_kernel[(T,)](x, out, D, x.stride(0), out.stride(0), BLOCK_K=block_k,
                            TILES=triton.next_power_of_2(tiles), CDT=_tl_dtype(cdt), num_warps=4)
    return out


def _order(name: str, w, swapped: bool, block_k: int, key: str) -> tuple[bool, bool]:
    """(halves, fragments): the int4 nibble order of `w`. Only the swapped folded kernel with K tiles
    of its kpack reads either; anything else is refused (it would read the nibbles wrong)."""
    kpack = w.kpack if isinstance(w, QuantizedWeight) else 0
    if kpack and not (swapped and block_k == kpack):
        raise ValueError(
            f"{name}: int4 weight in the {w.order} nibble order for K tiles of {kpack} (kpack) runs only on "
            f"the swapped kernel with {key}={kpack} and groups of whole tiles; this call has {key}={block_k}, "
            f"group {w.group_size}, swapped={swapped}")
    return bool(kpack) and w.order == "halves", bool(kpack) and w.order == "fragments"


def moe_forward_triton(x, topk_index, topk_weights, gate_up, down, *, config: dict | None = None):
    """The Triton path (GPU, or CPU under TRITON_INTERPRET=1). `config` overrides tile sizes."""
    if not backend.HAS_TRITON:
        raise RuntimeError("triton is not importable; use impl='torch'")
    T, D, E, I, K = _check_args(x, topk_index, topk_weights, gate_up, down)
    interp = backend.interpreting()
    if x.device.type != "cuda" and not interp and not backend.COMPILE_ONLY:
        raise RuntimeError("the Triton MoE needs CUDA tensors (or TRITON_INTERPRET=1)")
    if T == 0 or K == 0:
        return torch.zeros_like(x)
    int4 = any(isinstance(w, QuantizedWeight) and w.scheme == "int4" for w in (gate_up, down))
    ggml = any(isinstance(w, GGMLWeight) for w in (gate_up, down))
    cfg = _default_config(T, K, E, D, I, interp, int4, ggml)
    for w, key in ((gate_up, "BLOCK_K1"), (down, "BLOCK_K2")):  # a repacked weight brings its K tile
        if isinstance(w, QuantizedWeight) and w.kpack:
            cfg[key] = w.kpack
    if config:
        cfg.update(config)
    bm = cfg["BLOCK_M"]
    if x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16):
        cdt = torch.float32  # the interpreter gets bf16 arithmetic wrong
    else:
        cdt = x.dtype
    a8 = bool(cfg.get("A8", False))  # fp8 activations (vLLM's fp8 MoE arithmetic; opt-in)
    x_in, sx = x, None
    if a8:
        if not all(isinstance(w, QuantizedWeight) and w.scheme == "fp8" for w in (gate_up, down)):
            raise ValueError("A8 (fp8 activations) needs fp8 expert weights")
        if cfg["BLOCK_N1"] != cfg["BLOCK_K2"]:
            raise ValueError(f"A8: BLOCK_N1 ({cfg['BLOCK_N1']}) must equal BLOCK_K2 ({cfg['BLOCK_K2']}): "
                             f"h's fp8 scales are per gate_up column tile")
        cdt = torch.float8_e4m3fn
        x_in, sx = fp8_rows_triton(x)
    ieee = cdt == torch.float32
    TK = T * K
    dev = x.device
    runs = bool(cfg.get("GGML_RUNS", True))  # ggml blocks decoded by runs of 32 (0: element by element)

    # magic-number nibble conversion (folded-scale int4 path only, 16-bit compute)
    magic = {torch.bfloat16: 1, torch.float16: 2}.get(cdt, 0) if cfg.get("MAGIC", True) else 0
    bias = (0.0, 128.0, 1024.0)[magic]
    # h = gelu_tanh(gate) * up, the down step's activations: in cdt, except with fp16 activations,
    # where it is kept in fp32 (gate and up near 256 already make it overflow fp16's 65504: inf, then
    # NaN, where the fp32 twin stays finite) and the down step's dots take fp32 operands as tf32 (fp16's
    # 10-bit mantissa, fp32's range; fp16 weights are exact in it). Bytes: 2 more per element of h
    # ([blocks * BLOCK_M, I]: at T=2048, top-8, I=704, 24448 rows, +34 MB written and read once, against
    # 1.5 GB of 16-bit expert weights read).
    hdt = torch.float32 if cdt == torch.float16 else cdt
    sorted_ids, block_expert, num_blocks = _align(topk_index, E, bm)
    topk_w = topk_weights.reshape(-1).float().contiguous()
    h = torch.empty(num_blocks * bm, I, dtype=hdt, device=dev)
    hs8 = torch.empty(num_blocks * bm, triton.cdiv(I, cfg["BLOCK_N1"]), dtype=torch.float32, device=dev) if a8 else h
    pairs = torch.empty(TK, D, dtype=torch.float32, device=dev)  # every routed pair's row is written

    q1, s1, z1, sw1, ss1, g1, wq1 = _weight_args(gate_up, dev)
    grid1 = (num_blocks, triton.cdiv(I, cfg["BLOCK_N1"]))
    fold1 = wq1 == 1 and g1 % cfg["BLOCK_K1"] == 0 and cfg.get("INT4_FOLD", True)
    even1 = D % cfg["BLOCK_K1"] == 0 and cfg.get("EVEN_K", True)  # int4: no K bound on the weight bytes
    swap = dict(CDT=_tl_dtype(cdt), IEEE=ieee, MAGIC=magic, BIAS=bias, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], LOP3=bool(cfg.get("LOP3", not interp)))  # the interpreter runs no PTX
    if cfg.get("maxnreg") and not interp:  # a register cap per thread (ptxas .maxnreg): more programs per SM
        swap["maxnreg"] = int(cfg["maxnreg"])
    swap1 = fold1 and cfg.get("SWAP_AB", False)
    halves1, frag1 = _order("gate_up", gate_up, swap1, cfg["BLOCK_K1"], "BLOCK_K1")
    # the activations' K-tile sums of the folded zero point, summed once instead of in every program
    xsum = cfg.get("XSUM", True)
    q2, s2, z2, sw2, ss2, g2, wq2 = _weight_args(down, dev)
    fold2 = wq2 == 1 and g2 % cfg["BLOCK_K2"] == 0 and cfg.get("INT4_FOLD", True)
    swap2 = fold2 and cfg.get("SWAP_AB", False)
    hsum = xsum and swap1 and swap2 and cfg["BLOCK_N1"] == cfg["BLOCK_K2"]
    if hdt != cdt:  # the down step reads h in fp32 (tf32 dots; no magic nibbles: they are 16-bit)
        swap_down = dict(swap, CDT=_tl_dtype(hdt), MAGIC=0, BIAS=0.0)
    else:
        swap_down = swap
    hs = torch.empty(h.shape[0], grid1[1], dtype=torch.float32, device=dev) if hsum else h
    if swap1:
        xs = tile_sums(x, cfg["BLOCK_K1"], cdt) if xsum else x
        _moe_gate_up_int4t_kernel[grid1](
            x, q1, s1, z1, h, sorted_ids, block_expert, xs, hs, TK, I, D, K, x.stride(0), x.stride(1),
            sw1[0], sw1[1], sw1[2], ss1[0], ss1[1], ss1[2], h.stride(0), xs.stride(0), hs.stride(0),
            BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"], GROUP=g1, HALVES=halves1,
            EVEN_K=even1, XSUM=xsum, HSUM=hsum, FRAG=frag1, ONE_DOT=bool(cfg.get("ONE_DOT", False)) and not halves1,
            **swap)
    else:
        _moe_gate_up_kernel[grid1](
            x_in, q1, s1, z1, h, sorted_ids, block_expert,
            TK, I, D, K,
            x_in.stride(0), x_in.stride(1),
            sw1[0], sw1[1], sw1[2],
            ss1[0], ss1[1], ss1[2],
            h.stride(0),
            BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"],
            GROUP=g1, WQ=wq1, CDT=_tl_dtype(cdt), IEEE=ieee,
            INT4_TILE_GROUP=fold1,
            MAGIC=magic, BIAS=bias, EVEN_K=even1,
            sx_ptr=sx if a8 else x, hs_ptr=hs8, stride_hs=hs8.stride(0), A8=a8, GGML_RUNS=runs,
            SWAP=bool(cfg.get("SWAP_AB", False)) and wq1 in (0, 2, 3) and not a8,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    grid2 = (num_blocks, triton.cdiv(D, cfg["BLOCK_N2"]))
    even2 = I % cfg["BLOCK_K2"] == 0 and cfg.get("EVEN_K", True)
    halves2, frag2 = _order("down", down, swap2, cfg["BLOCK_K2"], "BLOCK_K2")
    if swap2:
        _moe_down_int4t_kernel[grid2](
            h, q2, s2, z2, pairs, sorted_ids, block_expert, topk_w, hs, TK, D, I, h.stride(0),
            sw2[0], sw2[1], sw2[2], ss2[0], ss2[1], ss2[2], pairs.stride(0), hs.stride(0),
            BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"], GROUP=g2, HALVES=halves2,
            EVEN_K=even2, XSUM=hsum, FRAG=frag2, **swap_down)
    else:
        _moe_down_kernel[grid2](
            h, q2, s2, z2, pairs, sorted_ids, block_expert, topk_w,
            TK, D, I,
            h.stride(0),
            sw2[0], sw2[1], sw2[2],
            ss2[0], ss2[1], ss2[2],
            pairs.stride(0),
            BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"],
            GROUP=g2, WQ=wq2, CDT=swap_down["CDT"], IEEE=ieee,
            INT4_TILE_GROUP=fold2,
            MAGIC=swap_down["MAGIC"], BIAS=swap_down["BIAS"], EVEN_K=even2,
            hs_ptr=hs8, stride_hs=hs8.stride(0), A8=a8, GGML_RUNS=runs,
            SWAP=bool(cfg.get("SWAP_AB", False)) and wq2 in (0, 2, 3) and not a8,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return sum_slots(pairs, topk_index, E, x.dtype)


def fp8_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_rows in one launch."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _fp8_rows_kernel[(x.shape[0],)](x, out, s, x.shape[1], x.stride(0), out.stride(0),
                                    BLOCK_D=triton.next_power_of_2(x.shape[1]), num_warps=4)
    return out, s


def sum_slots(pairs: torch.Tensor, topk_index: torch.Tensor, E: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, D] in `dtype`: each token's routed slots (0 <= index < E) of pairs [T*K, D] fp32 summed in
    slot order; the rows of dropped slots are never read (they are never written either)."""
    T, K = topk_index.shape
    D = pairs.shape[1]
    out = torch.empty(T, D, dtype=dtype, device=pairs.device)
    flat = topk_index.reshape(-1)
    block_d = min(1024, triton.next_power_of_2(D))
    _sum_slots_kernel[(T, triton.cdiv(D, block_d))](pairs, flat if flat.is_contiguous() else flat.contiguous(), out,
                                                   D, E, out.stride(0), K=K, BLOCK_D=block_d, num_warps=4)
    return out

