"""GGUF weights kept in ggml's block formats, dequantised where they are used.

A GGUF file stores each quantized weight as rows of blocks; `GGMLWeight` holds those bytes as
they are (a uint8 tensor [..., N, row bytes], on the target device; on the CPU a view of the
file's memory map) with the ggml type and the logical shape [..., N, K]. It is dgplug's second
packed-weight type beside kernels.quantized_weight.QuantizedWeight, with the same contract:

    w[e]                    expert e of a [E, N, K] weight, still packed (a view)
    w.dequantize(dtype)     the whole logical weight (linears: dequantised per call, as int4/int8)
    w.rows(v0, v1, dtype)   rows v0..v1 of a [N, K] table (the head + sampler read the tied
                            embedding one chunk of rows at a time)
    w.lookup(ids, dtype)    the rows `ids` (the embedding lookup: only those blocks are decoded)
    w[v0:v1]                a slice of a 2-D table = w.rows(v0, v1): code written for a plain
                            [V, D] table (the sampler's tile loop) reads a packed one unchanged
    F.linear(x, w), F.embedding(ids, w), torch.matmul(p, w)
                            handled through torch's __torch_function__ protocol, a chunk of rows
                            decoded at a time: the head, the embedding lookup and the soft
                            embedding of dgplug's model and of transformers' modules run packed

`dtype` (the attribute) is the dtype rows are served in by default: the model's dtype.

Block formats (ggml; QK elements per block, little-endian fp16 scales; j = element in block):
  Q8_0  32 el / 34 B: d, int8 q[32];                              w = q * d
  Q4_0  32 / 18: d, 16 B nibbles (j < 16 low, j >= 16 high);      w = d * (q - 8)
  Q4_1  32 / 20: d, m, nibbles;                                   w = d * q + m
  Q5_0  32 / 22: d, qh (bit j = 5th bit of j), nibbles;           w = d * (q - 16)
  Q5_1  32 / 24: d, m, qh, nibbles;                               w = d * q + m
  Q4_K 256 / 144: d, dmin, 12 B of 6-bit (scale, min) for 8 sub-blocks of 32, 128 B nibbles
                  (byte 32g + l: low nibble = element 64g + l, high = 64g + 32 + l);
                  w = (d * sc) * q - dmin * m
  Q5_K 256 / 176: as Q4_K plus qh[32] (bit s of byte l = 5th bit of element 32s + l)
  Q6_K 256 / 210: ql[128], qh[64], int8 scales[16] (one per 16 elements), d at the end;
                  w = (d * scale) * (q - 32), q = 4 low bits from ql, 2 high from qh
  Q2_K 256 / 84:  scales[16] (low nibble: scale, high: min, one pair per 16 elements), qs[64]
                  (byte 32h + l, bits 2s: element 128h + 32s + l), d, dmin;
                  w = (d * sc) * q - dmin * m
  Q3_K 256 / 110: hmask[32] (bit b of byte l: 3rd bit of element 32b + l), qs[64] (as Q2_K),
                  12 B of 6-bit scales (low 4 bits: nibble t % 8 >> 4 (t // 8); high 2: byte
                  8 + t % 4 >> 2 (t // 4)), d; w = (d * (sc - 32)) * (q - 4 * (1 - 3rd bit))
The torch dequantisers below follow gguf-py's `gguf.quants.dequantize` operation by operation,
so they agree with it bit for bit in fp32 (tests/test_ggml.py); `tile` is the same decoding for
one [BLOCK_K, BLOCK_N] tile inside the Triton MoE kernels, element by element, and `tile_at` the
same again a run of 32 elements at a time for the formats built of such runs (each row's bytes of a
run loaded once along the row, its scales once a row): the row decoder and the MoE use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .backend import HAS_TRITON, interpreting, pick_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["GGMLWeight", "PACKED_TYPES", "dequantize_blocks"]

PACKED_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL,
                T.IQ4_XS)
_CHUNK = 1 << 20  # elements decoded at once (bounds the int/fp32 temporaries)
# byte offsets of the fp16 scale fields of one block (their finiteness is the weight's)
_F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q4_K: (0, 2),
               T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q2_K: (80, 82), T.Q3_K: (108,), T.IQ4_NL: (0,), T.IQ4_XS: (0,)}
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---------------------------------------------------------------------------------------------
# Torch dequantisers: blocks uint8 [n, bytes] -> fp32 [n, QK]
# ---------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block, as fp32 [n, 1]."""
    return b[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, G, L] bytes -> [n, G, 2, L]: low nibbles, then high nibbles."""
    return torch.stack((qs & 15, qs >> 4), dim=-2)


def _bits(qh: torch.Tensor, n_bits: int, width: int) -> torch.Tensor:
    """[n, L] bytes -> [n, n_bits, L] fields of `width` bits, field s = bits width*s.."""
    shifts = torch.arange(0, n_bits * width, width, dtype=torch.uint8, device=qh.device)
    return (qh[:, None, :] >> shifts[None, :, None]) & ((1 << width) - 1)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b):
    q = _nibbles(b[:, None, 2:]).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b):
    q = _nibbles(b[:, None, 4:]).reshape(b.shape[0], 32).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _q5(b, at_qh):
    """5-bit values of a Q5_0 / Q5_1 block: nibbles | (bit j of the 32-bit qh) << 4."""
    n = b.shape[0]
    low = _nibbles(b[:, None, at_qh + 4:]).reshape(n, 32)
    high = _bits(b[:, at_qh:at_qh + 4], 8, 1).transpose(1, 2).reshape(n, 32)  # byte j // 8, bit j % 8
    return low | (high << 4)


def _q5_0(b):
    return _f16(b, 0) * (_q5(b, 2).to(torch.int8) - 16).float()


def _q5_1(b):
    return _f16(b, 0) * _q5(b, 4).float() + _f16(b, 2)


def _scale_min_k4(s: torch.Tensor):
    """The 8 6-bit (scale, min) pairs of a Q4_K / Q5_K block from its 12 bytes."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), dim=1)
    mn = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), dim=1)
    return sc, mn


def _k4_affine(b, q):
    """(d * sc) * q - dmin * m for Q4_K / Q5_K with q [n, 8, 32]."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.float())[:, :, None]
    dm = (_f16(b, 2) * mn.float())[:, :, None]
    return (d * q.float() - dm).reshape(b.shape[0], 256)


def _q4_k(b):
    return _k4_affine(b, _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32))


def _q5_k(b):
    low = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k4_affine(b, low | (_bits(b[:, 16:48], 8, 1) << 4))


def _q6_k(b):
    n = b.shape[0]
    low = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _bits(b[:, 128:192].reshape(2 * n, 32), 4, 2).reshape(n, 8, 32)  # 2 halves x 4 shifts
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    d = _f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (d[:, :, None] * q).reshape(n, 256)


def _q2_k(b):
    n = b.shape[0]
    sc = b[:, :16]
    d = _f16(b, 80) * (sc & 15).float()
    m = _f16(b, 82) * (sc >> 4).float()
    q = _bits(b[:, 16:80].reshape(2 * n, 32), 4, 2).reshape(n, 16, 16).float()  # 2 halves x 4 shifts
    return (d[:, :, None] * q - m[:, :, None]).reshape(n, 256)


def _q3_k(b):
    n = b.shape[0]
    s = b[:, 96:108]
    sc = _bits(s[:, :8], 2, 4).reshape(n, 16) | (_bits(s[:, 8:], 4, 2).reshape(n, 16) << 4)
    d = _f16(b, 108) * (sc.to(torch.int8) - 32).float()
    low = _bits(b[:, 32:96].reshape(2 * n, 32), 4, 2).reshape(n, 16, 16)
    third = _bits(b[:, :32], 8, 1).reshape(n, 16, 16)
    q = (low.to(torch.int8) - ((third ^ 1) << 2).to(torch.int8)).float()  # 3rd bit 0: q - 4
    return (d[:, :, None] * q).reshape(n, 256)


def _iq4_levels(q: torch.Tensor) -> torch.Tensor:
    """4-bit indices -> kvalues_iq4nl's levels, fp32."""
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=q.device)[q.long()]


def _iq4_nl(b):
    return _f16(b, 0) * _iq4_levels(_nibbles(b[:, None, 2:]).reshape(b.shape[0], 32))


def _iq4_xs(b):
    n = b.shape[0]
    sl = b[:, 4:8]
    low = torch.stack((sl & 15, sl >> 4), dim=-1).reshape(n, 8)  # block 2i: low nibble of byte i
    sh = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    high = (sh >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3
    dl = _f16(b, 0) * ((low.to(torch.int32) | (high << 4)) - 32).float()
    q = _nibbles(b[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (dl[:, :, None] * _iq4_levels(q)).reshape(n, 256)


_DECODE = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q4_K: _q4_k,
           T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs}


def dequantize_blocks(raw: torch.Tensor, qtype, dtype=torch.float32, impl: str | None = None) -> torch.Tensor:
    """uint8 rows [..., row bytes] of ggml type `qtype` -> [..., elements] in `dtype` (math in fp32).
    impl "torch": decoded _CHUNK elements at a time into the output, operation by operation as
    gguf-py; "triton": one kernel over the rows (`tile`, the MoE kernels' decoder; CUDA, or the
    CPU under TRITON_INTERPRET=1). None: kernels.backend.pick_impl's choice for CUDA rows (and in the
    interpreter); CPU rows otherwise always take the torch path, whatever DGPLUG_KERNELS says."""
    qtype = T(qtype)
    qk, nb = GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.shape[-1] % nb:
        raise ValueError(f"{qtype.name} rows must be uint8 with a multiple of {nb} bytes, got "
                         f"{raw.dtype}{list(raw.shape)}")
    lead, row_bytes = tuple(raw.shape[:-1]), raw.shape[-1]
    k = row_bytes // nb * qk
    flat = raw.reshape(-1, row_bytes)
    out = torch.empty(flat.shape[0], k, dtype=dtype, device=raw.device)
    if impl is None and not (raw.is_cuda or interpreting()):
        impl = "torch"  # CPU rows (a load, a GGUF run on the CPU): DGPLUG_KERNELS=triton cannot mean them
    if pick_impl(raw, impl) == "triton":
        if not HAS_TRITON:
            raise RuntimeError("dequantize_blocks(impl='triton') needs triton")
        if out.numel():
            _decode_rows(flat.contiguous(), out, qtype)
        return out.reshape(*lead, k)
    step = max(1, _CHUNK // max(k, 1))
    decode = _DECODE[qtype]
    for r0 in range(0, flat.shape[0], step):
        r1 = min(r0 + step, flat.shape[0])
        out[r0:r1] = decode(flat[r0:r1].reshape(-1, nb)).reshape(r1 - r0, k)
    return out.reshape(*lead, k)


# ---------------------------------------------------------------------------------------------
# The packed weight
# ---------------------------------------------------------------------------------------------
@dataclass
class GGMLWeight:
    """A GGUF weight of logical shape [..., N, K] kept as its ggml blocks [..., N, K / QK * bytes]."""

    qtype: T
    blocks: torch.Tensor
    shape: tuple
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.qtype = T(self.qtype)
        if self.qtype not in PACKED_TYPES:
            raise ValueError(f"ggml type {self.qtype.name} is not kept packed (supported: "
                             f"{', '.join(t.name for t in PACKED_TYPES)})")
        self.shape = tuple(int(s) for s in self.shape)
        qk, nb = GGML_QUANT_SIZES[self.qtype]
        want = self.shape[:-1] + (self.shape[-1] // qk * nb,)
        if self.shape[-1] % qk or self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != want:
            raise ValueError(f"{self.qtype.name} weight of shape {list(self.shape)} needs uint8 blocks "
                             f"{list(want)}, got {self.blocks.dtype}{list(self.blocks.shape)}")

    # -- tensor-like ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self) -> int:
        """Bytes per element of the rows it serves (what a chunk of dequantised rows costs)."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice) and len(self.shape) == 2:
            v0, v1, step = i.indices(self.shape[0])
            if step != 1:
                raise IndexError("a packed table is sliced in steps of 1")
            return self.rows(v0, max(v0, v1))
        if len(self.shape) < 3 or not isinstance(i, int):
            raise IndexError(f"a packed {self.qtype.name} weight of shape {list(self.shape)} takes an expert index "
                             f"(3-D) or a row slice (2-D), not {i!r}")
        return GGMLWeight(self.qtype, self.blocks[i], self.shape[1:], self.dtype)

    def to(self, device=None, dtype=None) -> "GGMLWeight":
        """Blocks to `device`; `dtype` changes the dtype rows are served in (the blocks stay)."""
        blocks = self.blocks.to(device) if device is not None else self.blocks
        return GGMLWeight(self.qtype, blocks, self.shape, dtype or self.dtype)

    def contiguous(self) -> "GGMLWeight":
        return self

    def float(self) -> torch.Tensor:
        return self.dequantize(torch.float32)

    # -- decoding ------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The logical weight [..., N, K] in `dtype` (default: self.dtype; math in fp32)."""
        return dequantize_blocks(self.blocks, self.qtype, dtype or self.dtype)

    def rows(self, v0: int, v1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows v0..v1 of a 2-D table [N, K], dequantised: [v1 - v0, K]."""
        if len(self.shape) != 2:
            raise IndexError(f"rows() reads a 2-D table; this weight is {list(self.shape)}")
        return dequantize_blocks(self.blocks[v0:v1], self.qtype, dtype or self.dtype)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """F.embedding(ids, table) for a packed 2-D table: only the rows asked for are decoded."""
        if len(self.shape) != 2:
            raise IndexError(f"lookup() reads a 2-D table; this weight is {list(self.shape)}")
        return dequantize_blocks(self.blocks[ids], self.qtype, dtype or self.dtype)

    def _row_chunks(self, dtype):
        """(v0, v1, rows v0..v1) over a 2-D weight, _CHUNK elements at a time."""
        if len(self.shape) != 2:
            raise IndexError(f"a [N, K] weight is read by rows; this one is {list(self.shape)}")
        step = max(1, _CHUNK // self.shape[1])
        for v0 in range(0, self.shape[0], step):
            v1 = min(v0 + step, self.shape[0])
            yield v0, v1, self.rows(v0, v1, dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear(x, W) = x @ W^T in x's dtype, W decoded a chunk of rows at a time (one chunk for
        a linear layer's weight; the tied head reads the table in V / chunk pieces)."""
        out = None
        for v0, v1, rows in self._row_chunks(x.dtype):
            if v0 == 0 and v1 == self.shape[0]:
                return torch.nn.functional.linear(x, rows)
            if out is None:
                out = torch.empty(*x.shape[:-1], self.shape[0], dtype=x.dtype, device=x.device)
            out[..., v0:v1] = torch.nn.functional.linear(x, rows)
        return out

    def product(self, p: torch.Tensor) -> torch.Tensor:
        """p @ W ([.., N] @ [N, K]: the soft embedding) in p's dtype, summed chunk by chunk of rows."""
        out = None
        for v0, v1, rows in self._row_chunks(p.dtype):
            part = torch.matmul(p[..., v0:v1], rows)
            out = part if out is None else out.add_(part)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """The torch calls a [N, K] weight meets in a model, on the packed blocks: F.linear(x, W),
        F.embedding(ids, W) and torch.matmul(p, W) (so transformers' own modules and dgplug's model
        run on it unchanged); anything else asks for an explicit .dequantize()."""
        kwargs = kwargs or {}
        w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
        x = args[0] if args else kwargs.get("input")
        if isinstance(w, GGMLWeight) and isinstance(x, torch.Tensor):
            if func is torch.nn.functional.linear and (len(args) < 3 or args[2] is None) \
                    and kwargs.get("bias") is None:
                return w.linear(x)
            if func is torch.nn.functional.embedding:
                return w.lookup(x)
            if func is torch.matmul:
                return w.product(x)
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"{name} does not take a packed GGUF weight ({cls.__name__}); call .dequantize() first")

    def nonfinite(self) -> bool:
        """Whether any value is NaN or Inf: exactly when an fp16 scale field is (the quants are integers)."""
        nb = GGML_QUANT_SIZES[self.qtype][1]
        b = self.blocks.reshape(-1, nb)
        for at in _F16_FIELDS[self.qtype]:
            bits = b[:, at:at + 2].contiguous().view(torch.int16)
            if bool(((bits & 0x7C00) == 0x7C00).any()):
                return True
        return False

    def __repr__(self) -> str:
        return f"GGMLWeight({self.qtype.name}, shape={list(self.shape)}, dtype={self.dtype}, device={self.device})"


# ---------------------------------------------------------------------------------------------
# Triton: one [BLOCK_K, BLOCK_N] tile decoded from the blocks (the MoE kernels' weight loader)
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _byte(p, mask):
        return tl.load(p, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _half(p, mask):
        """The little-endian fp16 at p, as fp32."""
        bits = tl.load(p, mask=mask, other=0).to(tl.uint16) | (tl.load(p + 1, mask=mask, other=0).to(tl.uint16) << 8)
        return bits.to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _tile_32(row, k, mask, NB: tl.constexpr, QS: tl.constexpr, QH: tl.constexpr, MIN: tl.constexpr,
                 OFFSET: tl.constexpr):
        """Q4_0 / Q4_1 / Q5_0 / Q5_1: 32-element blocks of NB bytes, nibbles at QS, 5th bits at QH (0: none)."""
        blk = row + (k // 32) * NB
        j = k % 32
        q = (_byte(blk + QS + j % 16, mask) >> (4 * (j // 16))) & 15
        if QH != 0:
            q = q | (((_byte(blk + QH + j // 8, mask) >> (j % 8)) & 1) << 4)
        if MIN:
            return _half(blk, mask) * q.to(tl.float32) + _half(blk + 2, mask)
        else:
            return _half(blk, mask) * (q - OFFSET).to(tl.float32)

    @triton.jit
    def _blocks_32(DECODE: tl.constexpr, row, k, mask, QT: tl.constexpr):
        """Q4_0 / Q4_1 / Q5_0 / Q5_1 through DECODE (_tile_32 element by element, _run_32 a run at a
        time): block bytes, nibbles at, 5th bits at (0: none), min, offset."""
        if QT == 2:  # Q4_0
            w = DECODE(row, k, mask, 18, 2, 0, False, 8)
        elif QT == 3:  # Q4_1
            w = DECODE(row, k, mask, 20, 4, 0, True, 0)
        elif QT == 6:  # Q5_0
            w = DECODE(row, k, mask, 22, 6, 2, False, 16)
        else:  # Q5_1
            w = DECODE(row, k, mask, 24, 8, 4, True, 0)
        return w

    @triton.jit
    def _k4_scale_min(blk, s, mask):
        """(d * scale, dmin * min) of sub-block s of the Q4_K / Q5_K super-block at blk (6-bit
        scale and min from the 12 bytes at 4, as ggml's get_scale_min_k4)."""
        low = s < 4
        a = _byte(blk + 4 + s, mask)
        b = _byte(blk + 8 + s, mask)
        c = _byte(blk + 4 + tl.where(low, s, s - 4), mask)
        sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
        return _half(blk, mask) * sc.to(tl.float32), _half(blk + 2, mask) * mn.to(tl.float32)

    @triton.jit
    def _tile_k45(row, k, mask, NB: tl.constexpr, QS: tl.constexpr, FIVE: tl.constexpr):
        """Q4_K (NB 144, nibbles at 16) / Q5_K (NB 176, 5th bits at 16, nibbles at 48)."""
        blk = row + (k // 256) * NB
        j = k % 256
        s = j // 32
        q = (_byte(blk + QS + (j // 64) * 32 + j % 32, mask) >> (4 * (s % 2))) & 15
        if FIVE:
            q = q | (((_byte(blk + 16 + j % 32, mask) >> s) & 1) << 4)
        scale, low = _k4_scale_min(blk, s, mask)
        return scale * q.to(tl.float32) - low

    @triton.jit
    def _tile_q6_k(row, k, mask):
        blk = row + (k // 256) * 210
        j = k % 256
        h = j // 128
        i = j % 128
        ql = (_byte(blk + h * 64 + i % 64, mask) >> (4 * (i // 64))) & 15
        qh = (_byte(blk + 128 + h * 32 + i % 32, mask) >> (2 * (i // 32))) & 3
        sc = tl.load(blk + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        return (_half(blk + 208, mask) * sc) * ((ql | (qh << 4)) - 32).to(tl.float32)

    @triton.jit
    def _low2(blk, j, mask, QS: tl.constexpr):
        """The 2 low bits of element j of a Q2_K / Q3_K block (qs at QS)."""
        return (_byte(blk + QS + (j // 128) * 32 + j % 32, mask) >> (2 * ((j % 128) // 32))) & 3

    @triton.jit
    def _tile_q2_k(row, k, mask):
        blk = row + (k // 256) * 84
        j = k % 256
        sc = _byte(blk + j // 16, mask)
        q = _low2(blk, j, mask, 16).to(tl.float32)
        return (_half(blk + 80, mask) * (sc & 15).to(tl.float32)) * q - _half(blk + 82, mask) * (sc >> 4).to(tl.float32)

    @triton.jit
    def _tile_q3_k(row, k, mask):
        blk = row + (k // 256) * 110
        j = k % 256
        t = j // 16
        sc = ((_byte(blk + 96 + t % 8, mask) >> (4 * (t // 8))) & 15) | \
            (((_byte(blk + 104 + t % 4, mask) >> (2 * (t // 4))) & 3) << 4)
        third = (_byte(blk + j % 32, mask) >> (j // 32)) & 1
        q = _low2(blk, j, mask, 32) - 4 * (1 - third)
        return (_half(blk + 108, mask) * (sc - 32).to(tl.float32)) * q.to(tl.float32)

    @triton.jit
    def _iq4_level(q):
        """kvalues_iq4nl[q] for 4-bit q: the 16 int8 levels packed four to an int32 (little-endian)."""
        packed = tl.where(q < 8, tl.where(q < 4, -1079142271, -152379953), tl.where(q < 12, 639175937, 1901675829))
        v = (packed >> (8 * (q % 4))) & 255
        return ((v ^ 128) - 128).to(tl.float32)

    @triton.jit
    def _tile_iq4(row, k, mask, XS: tl.constexpr):
        """IQ4_XS (256-element blocks of 136 bytes) / IQ4_NL (32 / 18)."""
        if XS:
            blk = row + (k // 256) * 136
            j = k % 256
            s = j // 32
            i = j % 32
            q = (_byte(blk + 8 + s * 16 + i % 16, mask) >> (4 * (i // 16))) & 15
            sc = ((_byte(blk + 4 + s // 2, mask) >> (4 * (s % 2))) & 15) | \
                (((_byte(blk + 2 + s // 4, mask) >> (2 * (s % 4))) & 3) << 4)
            d = _half(blk, mask) * (sc - 32).to(tl.float32)
        else:
            blk = row + (k // 32) * 18
            j = k % 32
            q = (_byte(blk + 2 + j % 16, mask) >> (4 * (j // 16))) & 15
            d = _half(blk, mask)
        return d * _iq4_level(q)

    @triton.jit
    def tile(w_ptr, e, rows, nmask, offs_k, K, stride_we, stride_wn, QT: tl.constexpr):
        """fp32 [BK, BN] tile of weight[e, rows, offs_k]^T decoded from ggml blocks (QT: the ggml
        type id; strides in bytes), zero outside K / the masked rows."""
        mask = (offs_k[:, None] < K) & nmask[None, :]
        row = w_ptr + e.to(tl.int64) * stride_we + rows[None, :].to(tl.int64) * stride_wn
        k = offs_k[:, None]
        if QT == 8:  # Q8_0
            blk = row + (k // 32) * 34
            q = tl.load(blk + 2 + k % 32, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = q * _half(blk, mask)
        elif QT == 2 or QT == 3 or QT == 6 or QT == 7:
            w = _blocks_32(_tile_32, row, k, mask, QT)
        elif QT == 10:  # Q2_K
            w = _tile_q2_k(row, k, mask)
        elif QT == 11:  # Q3_K
            w = _tile_q3_k(row, k, mask)
        elif QT == 12:  # Q4_K
            w = _tile_k45(row, k, mask, 144, 16, False)
        elif QT == 13:  # Q5_K
            w = _tile_k45(row, k, mask, 176, 48, True)
        elif QT == 20:  # IQ4_NL
            w = _tile_iq4(row, k, mask, False)
        elif QT == 23:  # IQ4_XS
            w = _tile_iq4(row, k, mask, True)
        else:  # Q6_K
            w = _tile_q6_k(row, k, mask)
        return tl.where(mask, w, 0.0)

    # -- the same decoding a run of 32 elements at a time: each row's bytes of the run loaded
    # once (a vector load along the row) and its scales once, instead of per element; every value
    # comes out of the same operations as in `tile`, so with the same bits --------------------
    @triton.jit
    def _halves(a, b):
        """[2n, BN]: the rows of a, then those of b (two [n, BN] tiles of consecutive K runs)."""
        return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * a.shape[0], a.shape[1]))

    @triton.jit
    def _run_32(row, k0, mask, NB: tl.constexpr, QS: tl.constexpr, QH: tl.constexpr, MIN: tl.constexpr,
                OFFSET: tl.constexpr):
        """Q4_0 / Q4_1 / Q5_0 / Q5_1: block k0 / 32 of each row (row: [BN] byte pointers)."""
        blk = row + (k0 // 32) * NB
        qs = tl.load(blk[None, :] + QS + tl.arange(0, 16)[:, None], mask=mask[None, :], other=0).to(tl.int32)
        q = _halves(qs & 15, qs >> 4)
        if QH != 0:
            h = _byte(blk + QH, mask) | (_byte(blk + QH + 1, mask) << 8) | (_byte(blk + QH + 2, mask) << 16) | \
                (_byte(blk + QH + 3, mask) << 24)
            q = q | (((h[None, :] >> tl.arange(0, 32)[:, None]) & 1) << 4)
        if MIN:
            return _half(blk, mask)[None, :] * q.to(tl.float32) + _half(blk + 2, mask)[None, :]
        else:
            return _half(blk, mask)[None, :] * (q - OFFSET).to(tl.float32)

    @triton.jit
    def _run_k45(row, k0, mask, NB: tl.constexpr, QS: tl.constexpr, FIVE: tl.constexpr):
        """Q4_K / Q5_K: sub-block s of super-block k0 / 256 (one scale and min a row)."""
        blk = row + (k0 // 256) * NB
        s = (k0 % 256) // 32
        t = tl.arange(0, 32)[:, None]
        q = (tl.load(blk[None, :] + QS + (s // 2) * 32 + t, mask=mask[None, :], other=0).to(tl.int32)
             >> (4 * (s % 2))) & 15
        if FIVE:
            q = q | (((tl.load(blk[None, :] + 16 + t, mask=mask[None, :], other=0).to(tl.int32) >> s) & 1) << 4)
        scale, low = _k4_scale_min(blk, s, mask)
        return scale[None, :] * q.to(tl.float32) - low[None, :]

    @triton.jit
    def _run_q6_k(row, k0, mask):
        """Q6_K: elements j0 .. j0+31 of super-block k0 / 256 (two 16-element scales a row)."""
        blk = row + (k0 // 256) * 210
        j0 = k0 % 256
        h = j0 // 128
        i0 = j0 % 128
        t = tl.arange(0, 32)[:, None]
        ql = (tl.load(blk[None, :] + h * 64 + i0 % 64 + t, mask=mask[None, :], other=0).to(tl.int32)
              >> (4 * (i0 // 64))) & 15
        qh = (tl.load(blk[None, :] + 128 + h * 32 + t, mask=mask[None, :], other=0).to(tl.int32)
              >> (2 * (i0 // 32))) & 3
        d = _half(blk + 208, mask)
        s_a = tl.load(blk + 192 + j0 // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        s_b = tl.load(blk + 193 + j0 // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        sc = tl.where(t < 16, (d * s_a)[None, :], (d * s_b)[None, :])
        return sc * ((ql | (qh << 4)) - 32).to(tl.float32)

    @triton.jit
    def _run(row, k0, mask, QT: tl.constexpr):
        """fp32 [32, BN]: elements k0 .. k0+31 (k0 a multiple of 32) of each row; zero where masked."""
        if QT == 8:  # Q8_0
            blk = row + (k0 // 32) * 34
            q = tl.load(blk[None, :] + 2 + tl.arange(0, 32)[:, None], mask=mask[None, :], other=0)
            w = q.to(tl.int8, bitcast=True).to(tl.float32) * _half(blk, mask)[None, :]
        elif QT == 2 or QT == 3 or QT == 6 or QT == 7:
            w = _blocks_32(_run_32, row, k0, mask, QT)
        elif QT == 12:  # Q4_K
            w = _run_k45(row, k0, mask, 144, 16, False)
        elif QT == 13:  # Q5_K
            w = _run_k45(row, k0, mask, 176, 48, True)
        else:  # Q6_K
            w = _run_q6_k(row, k0, mask)
        return tl.where(mask[None, :], w, 0.0)

    @triton.jit
    def tile_at(w_ptr, e, rows, nmask, k0, K, stride_we, stride_wn, QT: tl.constexpr, BLOCK_K: tl.constexpr):
        """`tile` for K positions k0 .. k0 + BLOCK_K (k0 a multiple of BLOCK_K): BLOCK_K 32, 64 or 128
        of the types whose blocks hold runs of 32 (Q8_0, Q4_0 .. Q5_1, Q4_K, Q5_K, Q6_K) decoded by
        runs; anything else element by element."""
        if (QT == 8 or QT == 2 or QT == 3 or QT == 6 or QT == 7 or QT == 12 or QT == 13 or QT == 14) and \
                (BLOCK_K == 32 or BLOCK_K == 64 or BLOCK_K == 128):
            row = w_ptr + e.to(tl.int64) * stride_we + rows.to(tl.int64) * stride_wn
            w = _run(row, k0, nmask & (k0 < K), QT)
            if BLOCK_K >= 64:
                w = _halves(w, _run(row, k0 + 32, nmask & (k0 + 32 < K), QT))
            if BLOCK_K == 128:
                w = _halves(w, _halves(_run(row, k0 + 64, nmask & (k0 + 64 < K), QT),
                                       _run(row, k0 + 96, nmask & (k0 + 96 < K), QT)))
            return w
        else:
            return tile(w_ptr, e, rows, nmask, k0 + tl.arange(0, BLOCK_K), K, stride_we, stride_wn, QT)

    @triton.jit
    def _decode_rows_kernel(w_ptr, out_ptr, N, K, row_bytes, QT: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, ROUND_BF16: tl.constexpr):
        """out[n, k] (a [N, K] row-major tensor) = element k of packed row n, one [BLOCK_N, BLOCK_K]
        tile. ROUND_BF16: round to nearest even in the fp32 bits first (the interpreter's cast
        truncates; a GPU's rounds), so that both give torch's .to(bfloat16) of the fp32 decode."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        nmask = offs_n < N
        w = tile_at(w_ptr, tl.program_id(0) * 0, offs_n, nmask, tl.program_id(1) * BLOCK_K, K, 0, row_bytes, QT,
                    BLOCK_K)  # [BK, BN]
        if ROUND_BF16:
            bits = w.to(tl.uint32, bitcast=True)
            w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        dst = out_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & nmask[None, :])


def _decode_rows(flat: torch.Tensor, out: torch.Tensor, qtype: T):
    """The Triton decode of uint8 rows [N, row bytes] into out [N, K] (any float dtype)."""
    n, k = out.shape
    interp = interpreting()
    bn, bk = (16, 128) if interp else (8, 128)  # K tiles of 128: decoded by runs of 32 where tile_at can
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _decode_rows_kernel[grid](flat, out, n, k, flat.shape[1], QT=int(qtype), BLOCK_N=bn, BLOCK_K=bk,
                              ROUND_BF16=out.dtype == torch.bfloat16, num_warps=4)
