"""The packed expert / linear weight of dgplug's int4, int8 and fp8 checkpoints: `QuantizedWeight`.

The converters write it (dgplug/converters/quant.py), the loaders wrap the tensors in it without a copy,
and the MoE kernels (dgplug/kernels/moe.py, dgplug/kernels/moe_triton.py) and packed linears read it as it is.
The int4 nibble orders the GPU kernels read fastest are made here once, at load time
(`for_gpu_kernels`).

Quantized layouts (logical weight [..., N, K], "K" the input dimension, "..." the expert dim):
  int4: qweight uint8 [..., N, K//2]; byte j of a row holds element 2j in the low nibble and
        2j+1 in the high nibble, values 0..15. scale fp16 [..., N, ceil(K/g)], zero uint8 of the
        same shape (integer zero point 0..15; symmetric schemes store 8). w = (q - zero) * scale.
        Group g (default 128) runs along K; element k uses group k // g. (The down projection
        has K = 704 = 5.5 * 128: use g = 64, or ceil(K/g) groups with a short last group; both
        work here.)
        Opt-in "halves" order (QuantizedWeight.kpack = BK, made by repack_int4_halves): within each
        K tile [k0, k0+BK), byte k0/2 + j holds element k0 + j low and k0 + BK/2 + j high, so the
        low and high nibble tiles are the two halves of the tile in order and the swapped kernel
        does two dots per tile with no interleave. Only that kernel with BLOCK_K = BK reads it (any
        other path refuses it); made for the GPU sweep (benchmarks/gpu_check.py), where it was slower.
        "fragments" order (kpack = BK, order="fragments", made by repack_int4_fragments; BK a
        multiple of 32): each K tile's nibbles are placed so that a thread of the swapped kernel
        reads its share of a weight row as whole 32-bit words, and each word gives four bf16x2 /
        fp16x2 registers of the MMA's A fragment by one shift and one mask each:
        (w >> 4j) & 0x000F000F | magic holds the K pair (k, k+1) from nibbles j and j + 4. Word
        t * BK/32 + i of a tile (t = 0..3, i = 0..BK/32-1), nibble n (j = n % 4 = 2d + c, half =
        n // 4) holds K position (2i + d) * 16 + c * 8 + 2t + half: thread t of a 4-thread
        group holds columns 2t, 2t+1, 2t+8, 2t+9 of every 16-column step in Hopper's wgmma and
        Ampere's mma.m16n8k16 register layouts. The bytes then load as 16-byte vectors and the
        nibbles need no byte permutes (sm_90 build of the gate_up step at T=256, with the mask and
        magic bits in one lop3: 343 instructions in the K loop and 155 registers, against 590 and
        215 in the pairs order; benchmarks/results/sm90_build_moe_fragments_triton371.txt).
  int8: qweight int8 [..., N, K], scale fp32 [..., N] (per output channel); w = q * scale.
  fp8:  qweight float8_e4m3fn [..., N, K], scale fp32 [..., N]; w = q.float() * scale.
        With fp8 activations (config A8, or DGPLUG_FP8_ACTIVATIONS=1 through moe_forward; opt-in,
        vLLM's fp8 MoE arithmetic, not transformers'): x in fp8 with one scale per token
        (max |x| / 448), h in fp8 with one scale per row and K tile of the down step, both GEMMs
        fp8 x fp8 with fp32 sums, each tile's products scaled before they are added; the twin is
        moe_forward_fp8_activations_torch. sm_90 build, T=256: gate_up K loop 224 instructions
        and 96 registers against 461 and 128 with 16-bit activations (T=2048: 133 against 473).
  ggml: a GGUF's blocks as they are in the file (kernels.ggml.GGMLWeight: Q8_0, Q4_0, Q4_1, Q5_0,
        Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, IQ4_NL); the twin dequantises one expert at a
        time, the Triton kernels decode each [BLOCK_K, BLOCK_N] weight tile from the blocks
        (kernels.ggml.tile: per element, its block's fp16 scale(s), 4/6-bit sub-block scale/min or
        int8 scale, and quant bits; IQ4: the non-linear level of its 4-bit index),
        with no scratch copy of the experts; Q4_0 .. Q5_1, Q4_K and Q5_K a run of 32 at a time
        (kernels.ggml.tile_at: the run's bytes in one load along the row, its scales once a row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from dgplug import settings

__all__ = ["QuantizedWeight", "repack_int4_halves", "repack_int4_fragments", "for_gpu_kernels", "expert_weight"]

SCHEMES = ("int4", "int8", "fp8")


@dataclass
class QuantizedWeight:
    """A packed weight of logical shape [..., N, K] (layouts above).

    `scheme` is "int4", "int8" or "fp8"; `zero` is used by int4 only; `group_size` by int4 only.
    `kpack` (int4 only): 0 = nibble pairs (element 2j low, 2j+1 high), BK > 0 = K tiles of BK in
    `order` "halves" (repack_int4_halves) or "fragments" (repack_int4_fragments).
    Indexing (`qw[e]`) returns the per-expert QuantizedWeight (views, no copy).
    """

    scheme: str
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor] = None
    group_size: int = 128
    shape: Optional[tuple] = None
    kpack: int = 0
    order: Optional[str] = None  # None: "pairs" when kpack is 0, else "halves"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; expected one of {SCHEMES}")
        if self.kpack and self.scheme != "int4":
            raise ValueError(f"kpack={self.kpack} is an int4 nibble order; {self.scheme} has none")
        if self.order is None:
            self.order = "halves" if self.kpack else "pairs"
        if self.order not in ("pairs", "halves", "fragments") or (self.order == "pairs") != (self.kpack == 0):
            raise ValueError(f"int4 nibble order {self.order!r} with kpack={self.kpack}: use pairs (kpack 0), "
                             f"halves or fragments (kpack = the K tile)")
        if self.order == "fragments" and self.kpack % 32:
            raise ValueError(f"the fragments order needs K tiles of a multiple of 32, got kpack={self.kpack}")
        lead = tuple(self.qweight.shape[:-1])
        if self.scheme == "int4":
            if self.qweight.dtype != torch.uint8:
                raise TypeError("int4 qweight must be uint8 (two nibbles per byte)")
            k = self.qweight.shape[-1] * 2
            if self.group_size <= 0 or self.group_size % 2:
                raise ValueError(f"int4 group_size must be a positive even number, got {self.group_size}")
            if self.zero is None:
                raise ValueError("int4 needs a zero tensor (store 8 for a symmetric scheme)")
            ng = -(-k // self.group_size)
            if tuple(self.scale.shape) != lead + (ng,) or tuple(self.zero.shape) != lead + (ng,):
                raise ValueError(
                    f"int4 scale/zero must be {lead + (ng,)} for K={k}, group {self.group_size}; "
                    f"got {tuple(self.scale.shape)} / {tuple(self.zero.shape)}"
                )
            if self.kpack < 0 or self.kpack % 2 or (self.kpack and k % self.kpack):
                raise ValueError(f"int4 kpack must be 0 or an even divisor of K={k}, got {self.kpack}")
        else:
            want = torch.int8 if self.scheme == "int8" else torch.float8_e4m3fn
            if self.qweight.dtype != want:
                raise TypeError(f"{self.scheme} qweight must be {want}, got {self.qweight.dtype}")
            k = self.qweight.shape[-1]
            if tuple(self.scale.shape) != lead:
                raise ValueError(f"{self.scheme} scale must be {lead} (per output channel)")
        logical = lead + (k,)
        if self.shape is None:
            self.shape = logical
        else:
            self.shape = tuple(int(s) for s in self.shape)
            if self.shape != logical:
                raise ValueError(f"shape {self.shape} does not match the packed tensors ({logical})")

    # -- tensor-like helpers ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        n = self.qweight.numel() * self.qweight.element_size()
        n += self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, e) -> "QuantizedWeight":
        if len(self.shape) < 3:
            raise IndexError("indexing selects an expert; this weight has no expert dimension")
        zero = self.zero[e] if self.zero is not None else None
        qw = self.qweight[e]
        return QuantizedWeight(self.scheme, qw, self.scale[e], zero, self.group_size, None, self.kpack, self.order)

    def to(self, device) -> "QuantizedWeight":
        zero = self.zero.to(device) if self.zero is not None else None
        return QuantizedWeight(self.scheme, self.qweight.to(device), self.scale.to(device), zero,
                               self.group_size, self.shape, self.kpack, self.order)

    def codes(self) -> torch.Tensor:
        """int4: the nibbles 0..15 as uint8 [..., N, K] in K order, for either nibble order."""
        b = self.qweight
        q = torch.stack((b & 15, b >> 4), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
        if self.kpack:  # K tiles of kpack in the halves or fragments order: undo its permutation
            inv = torch.argsort(nibble_perm(self.order, self.kpack)).to(b.device)
            q = q.reshape(*b.shape[:-1], -1, self.kpack)[..., inv].reshape(q.shape)
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The logical weight [..., N, K] in `dtype` (math in fp32)."""
        if self.scheme == "int4":
            q = self.codes()
            k = q.shape[-1]
            g = self.group_size
            s = self.scale.float().repeat_interleave(g, dim=-1)[..., :k]
            z = self.zero.float().repeat_interleave(g, dim=-1)[..., :k]
            w = (q.float() - z) * s
        else:
            w = self.qweight.float() * self.scale.float()[..., None]
        return w.to(dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor, scheme: str, group_size: int = 128,
                 symmetric: bool = False) -> "QuantizedWeight":
        """Reference round-to-nearest quantizer for weights [..., N, K] (tests and tools)."""
        w = w.float()
        if scheme == "int4":
            n, k = w.shape[-2:]
            if k % 2:
                raise ValueError("int4 needs an even input dimension")
            ng = -(-k // group_size)
            pad = ng * group_size - k
            wp = F.pad(w, (0, pad)) if pad else w
            wg = wp.reshape(*w.shape[:-1], ng, group_size)
            if pad:  # padded elements must not widen the range of the last group
                valid = torch.arange(ng * group_size, device=w.device).reshape(ng, group_size) < k
                lo = torch.where(valid, wg, torch.full_like(wg, float("inf"))).amin(-1)
                hi = torch.where(valid, wg, torch.full_like(wg, float("-inf"))).amax(-1)
            else:
                lo, hi = wg.amin(-1), wg.amax(-1)
            if symmetric:
                scale = torch.maximum(lo.abs(), hi.abs()) / 7.0
                zero = torch.full_like(scale, 8.0)
            else:
                lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
                scale = (hi - lo) / 15.0
                zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
                zero = zero.clamp(0, 15)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half()
            sf = scale.float()[..., None]
            q = torch.round(wg / sf + zero[..., None]).clamp(0, 15)
            q = q.reshape(*w.shape[:-1], ng * group_size)[..., :k].to(torch.uint8)
            packed = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
            return cls("int4", packed, scale.contiguous(), zero.to(torch.uint8).contiguous(),
                       group_size, tuple(w.shape))
        amax = w.abs().amax(-1)
        if scheme == "int8":
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
        elif scheme == "fp8":
            scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
            q = (w / scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            raise ValueError(f"unknown quantization scheme {scheme!r}")
        return cls(scheme, q.contiguous(), scale.float().contiguous(), None, group_size, tuple(w.shape))


def nibble_perm(order: str, block_k: int) -> torch.Tensor:
    """perm[P] = the K position (within a tile of block_k) held by nibble P of the tile (byte P // 2,
    low nibble first) in the "halves" or "fragments" order (layouts above)."""
    P = torch.arange(block_k)
    if order == "halves":
        return (P % 2) * (block_k // 2) + P // 2
    word, n = P // 8, P % 8
    t, i = word // (block_k // 32), word % (block_k // 32)
    j, half = n % 4, n // 4
    c, d = j % 2, j // 2
    return (2 * i + d) * 16 + c * 8 + 2 * t + half


def _repack_int4(qw: QuantizedWeight, block_k: int, order: str, multiple: int) -> QuantizedWeight:
    if qw.scheme != "int4":
        raise ValueError(f"repack_int4_{order} needs an int4 weight, got {qw.scheme}")
    k = qw.shape[-1]
    if block_k <= 0 or block_k % multiple or k % block_k:
        raise ValueError(f"block_k must be a multiple of {multiple} dividing K={k}, got {block_k}")
    q = qw.codes()
    t = q.reshape(*q.shape[:-1], k // block_k, block_k)[..., nibble_perm(order, block_k).to(q.device)]
    packed = (t[..., 0::2] | (t[..., 1::2] << 4)).reshape(*q.shape[:-1], k // 2)
    return QuantizedWeight("int4", packed.contiguous(), qw.scale, qw.zero, qw.group_size, qw.shape, block_k, order)


def repack_int4_halves(qw: QuantizedWeight, block_k: int) -> QuantizedWeight:
    """The same int4 weight in the halves nibble order for K tiles of block_k (exact): within each
    tile [k0, k0 + block_k), byte k0/2 + j holds element k0 + j low and k0 + block_k/2 + j high."""
    return _repack_int4(qw, block_k, "halves", 2)


def repack_int4_fragments(qw: QuantizedWeight, block_k: int) -> QuantizedWeight:
    """The same int4 weight in the fragments order for K tiles of block_k (exact; a multiple of 32
    dividing K): what the swapped kernel with BLOCK_K = block_k reads fastest."""
    return _repack_int4(qw, block_k, "fragments", 32)


def linears_stay_packed() -> bool:
    """DGPLUG_PACKED_LINEARS=1: on a GPU too, packed linears are dequantised in every call (dgplug.load
    and the transformers integration otherwise keep them dequantised there)."""
    return settings.on("DGPLUG_PACKED_LINEARS")


GPU_K_TILES = {"gate_up": 128, "down": 64}  # BLOCK_K1 / BLOCK_K2 of the int4 kernels on a GPU


def for_gpu_kernels(w, which: str, block_k: int | None = None):
    """int4 expert weights in the fragments order for the GPU's K tiles (GPU_K_TILES, or block_k)
    where the swapped kernel takes them (K a multiple of the tile, groups of whole tiles); anything
    else as it is. dgplug.load and the vLLM plugin call it on CUDA; DGPLUG_INT4_ORDER=pairs keeps
    the order of the file."""
    bk = block_k or GPU_K_TILES[which]
    if (not isinstance(w, QuantizedWeight) or w.scheme != "int4" or w.kpack or w.shape[-1] % bk
            or w.group_size % bk or settings.switch("DGPLUG_INT4_ORDER") == "pairs"):
        return w
    return repack_int4_fragments(w, bk)



def expert_weight(w, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e of a plain or packed (QuantizedWeight, GGMLWeight) [E, N, K] weight, dequantised alone."""
    if not isinstance(w, torch.Tensor):
        return w[e].dequantize(dtype)
    return w[e].to(dtype)
