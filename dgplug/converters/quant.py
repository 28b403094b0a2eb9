"""Weight-only quantization to safetensors (int4 / int8 / fp8) in the layout dgplug's kernels read.

Layout (see docs/quantized-format.md; the fused MoE's `QuantizedWeight` reads exactly this):

* int4: group-wise along the input dim K (group g, default 128). ``qweight`` uint8 ``[..., N, K//2]``,
  byte j of a row holds element 2j in the low nibble and 2j+1 in the high nibble (values 0..15);
  ``scale`` fp16 ``[..., N, K//g]``; ``zero`` uint8 ``[..., N, K//g]`` (integer zero point 0..15);
  ``w = (q - zero) * scale``.
* int8: ``qweight`` int8 ``[..., N, K]``, ``scale`` fp32 ``[..., N]`` (per output row), ``w = q * scale``,
  symmetric, ``scale = absmax / 127``.
* fp8: ``qweight`` float8_e4m3fn ``[..., N, K]``, ``scale`` fp32 ``[..., N]``, ``w = q.float() * scale``,
  ``scale = absmax / 448``.

Leading dims ``...`` are experts: every expert and every row has its own scales, so the gate and up
halves of the fused ``gate_up_proj`` (rows 0..Im-1 and Im..2Im-1) never share a scale.

Choice of the int4 scheme (measured by ``python -m converters.quant --measure``; relative MSE
``sum((w - deq)^2) / sum(w^2)``, group 128):

=====================================  =========  =========  =========  ===========  =========  =========
weights                                 sym /7     sym /-8    asym       asym + clip  int8       fp8
=====================================  =========  =========  =========  ===========  =========  =========
gaussian [2048, 2048]                   1.38e-2    1.07e-2    1.01e-2    9.04e-3      6.9e-5     7.0e-4
gaussian + 0.1 % outliers x10           2.93e-2    2.30e-2    1.47e-2    1.33e-2      7.4e-4     6.5e-4
student-t (df 4) [2048, 2048]           3.72e-2    2.89e-2    2.10e-2    1.91e-2      5.5e-4     6.7e-4
tiny model (make_checkpoint) linears    1.38e-2    1.06e-2    1.01e-2    9.02e-3      4.2e-5     6.6e-4
=====================================  =========  =========  =========  ===========  =========  =========

``sym /7`` is absmax/7 with zero 8 (15 levels), ``sym /-8`` the llama.cpp Q4_0 trick (the largest
magnitude maps to -8, negative scales; 16 levels), ``asym`` min/max with an integer zero point.
Asymmetric has the least error on every distribution (27-44 % less than sym/7, 5-36 % less than
sym/-8; the gap grows with outliers and heavy tails), and the least next-step KL in
benchmarks/quant_quality.py (8.8e-2 vs 1.04e-1 for sym/7, 8.83e-2 for sym/-8), so **int4 is
asymmetric**: ``scale = (max - min) / 15`` over the group (the range always includes 0),
``zero = round(-min / scale)``. The fp16 scale is rounded *up*, so every element stays within
``scale / 2`` of its dequantised value (the round-trip bound the tests check).

The MSE-optimal clipping search (``clip=True``: per group, shrink the range by a factor in
1.00, 0.98, ..., 0.70 and keep the factor with the least squared error) lowers the weight error by
another ~10 % and the benchmark KL by ~5 % (8.80e-2 -> 8.38e-2), but it is ~25x slower (6 MB/s vs
144 MB/s of bf16 input on 2 CPU cores: hours instead of ~6 minutes for the 52 GB release) and clipped
elements exceed the ``scale / 2`` bound. It is therefore off by default and offered as
``quantize_checkpoint(..., clip=True)``; it is recorded as ``"clip": true`` in quantization_config
(informational: the layout is the same). Group 64 lowers the KL by ~9 % for 4 % more bytes.

The tied embedding (also the output head and the self-conditioning soft-embedding table) stays in
its original dtype by default; ``quantize_embedding=True`` stores it as int8 per row whatever the
scheme (see the benchmark for the effect).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgplug.checkpoint import DTYPES, INDEX, dtype_name, open_safetensors, read_index, torch_dtype
from dgplug.config import read_config_json, refuse_quantized
from dgplug.errors import CheckpointError, DGPlugError, FormatError, InputError

from .output import publish_dir
from .progress import conversion_progress

SCHEMES = ("int4", "int8", "fp8")
FORMAT_VERSION = 1
QUANT_METHOD = "dgplug"
FP8_MAX = 448.0
INT8_MAX = 127.0
DEFAULT_SHARD_BYTES = 2_000_000_000
CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(16))  # 1.00 .. 0.70

_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


# --------------------------------------------------------------------------- packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] -> uint8 [..., K//2]; element 2j low nibble, 2j+1 high nibble."""
    if q.shape[-1] % 2:
        raise InputError(f"pack_int4: last dim {q.shape[-1]} is odd")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K//2] -> uint8 values 0..15 [..., K] (inverse of pack_int4)."""
    lo = p & 0x0F
    hi = p >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# --------------------------------------------------------------------------- helpers


def _fp16_up(s: torch.Tensor) -> torch.Tensor:
    """fp32 positive scale -> fp16 scale >= s (rounded up, never 0, never inf)."""
    s = s.clamp(min=_FP16_TINY, max=65504.0)
    h = s.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    return torch.where(h.float() < s, up, h)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., K] -> fp32 [..., ceil(K/g), g]; a short last group is padded with copies of the row's last
    element (which cannot widen its range) and the padding is dropped after quantization."""
    K = w.shape[-1]
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise InputError(f"group size {group_size!r} must be a positive even integer")
    if K % 2:
        raise InputError(f"int4 needs an even input dim, got K={K}")
    w = w.float()
    pad = -K % group_size
    if pad:
        w = torch.cat((w, w[..., -1:].expand(*w.shape[:-1], pad)), dim=-1)
    return w.reshape(*w.shape[:-1], (K + pad) // group_size, group_size)


# --------------------------------------------------------------------------- int4


def _int4_asym_params(lo: torch.Tensor, hi: torch.Tensor):
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = _fp16_up((hi - lo) / 15.0)
    zero = torch.round(-lo / scale.float()).clamp(0, 15)
    return scale, zero


def _int4_sym_params(g: torch.Tensor, mode: str):
    if mode == "sym":  # absmax / 7, zero 8
        scale = _fp16_up(g.abs().amax(-1) / 7.0)
    else:  # "sym8": Q4_0 style, signed max -> -8 (scale may be negative)
        idx = g.abs().argmax(-1, keepdim=True)
        m = torch.gather(g, -1, idx).squeeze(-1)
        mag = _fp16_up(m.abs() / 8.0)
        scale = torch.where(m > 0, -mag, mag)
    zero = torch.full(scale.shape, 8.0)
    return scale, zero


def _q_groups(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round(g / scale.float().unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 15)


def quantize_int4(w: torch.Tensor, group_size: int = 128, mode: str = "asym", clip: bool = False,
                  importance: torch.Tensor | None = None):
    """w [..., N, K] -> (qweight uint8 [..., N, K//2], scale fp16 [..., N, K//g], zero uint8 [..., N, K//g]).

    mode: "asym" (default, chosen by measured error), "sym" (absmax/7) or "sym8" (Q4_0 style).
    clip: per-group MSE-optimal range shrink (asym only).
    importance: per input column, broadcastable to [..., 1, K] (an imatrix's mean of squared
    activations): the clip search then minimises sum_j importance_j * err_j^2 (implies clip).
    """
    g = _groups(w, group_size)
    imp = None
    if importance is not None:
        imp = importance.float()
        imp = torch.nn.functional.pad(imp, (0, g.shape[-2] * group_size - imp.shape[-1]))  # padding weighs 0
        imp = imp.reshape(*imp.shape[:-1], g.shape[-2], group_size)
        clip = True
    if mode == "asym":
        lo, hi = g.amin(-1), g.amax(-1)
        scale, zero = _int4_asym_params(lo, hi)
        if clip:
            best_err = None
            for r in CLIP_RATIOS:
                s_r, z_r = _int4_asym_params(lo * r, hi * r)
                q = _q_groups(g, s_r, z_r)
                err = ((q - z_r.unsqueeze(-1)) * s_r.float().unsqueeze(-1) - g).square()
                err = (err if imp is None else err * imp).sum(-1)
                if best_err is None:
                    best_err, scale, zero = err, s_r, z_r
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    scale = torch.where(better, s_r, scale)
                    zero = torch.where(better, z_r, zero)
    elif mode in ("sym", "sym8"):
        if clip:
            raise InputError("clip search is implemented for the asymmetric int4 scheme only")
        scale, zero = _int4_sym_params(g, mode)
    else:
        raise InputError(f"unknown int4 mode {mode!r} (asym, sym, sym8)")
    q = _q_groups(g, scale, zero).to(torch.uint8).reshape(*w.shape[:-1], -1)[..., : w.shape[-1]]
    return pack_int4(q), scale, zero.to(torch.uint8)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_int4. group_size None: inferred as K / groups (only valid without a short
    last group; pass the group_size of quantization_config when reading files)."""
    q = unpack_int4(qweight)
    K = q.shape[-1]
    ng = scale.shape[-1]
    if group_size is None:
        if K % ng:
            raise InputError(f"int4: K={K} is not a multiple of {ng} groups; pass group_size")
        group_size = K // ng
    if -(-K // group_size) != ng:
        raise FormatError(f"int4: {ng} groups do not fit K={K} with group size {group_size}")
    s = scale.float().repeat_interleave(group_size, -1)[..., :K]
    z = zero.float().repeat_interleave(group_size, -1)[..., :K]
    return ((q.float() - z) * s).to(dtype)


# --------------------------------------------------------------------------- int8 / fp8


def quantize_int8(w: torch.Tensor):
    """w [..., N, K] -> (qweight int8 [..., N, K], scale fp32 [..., N]); symmetric absmax/127 per row."""
    w = w.float()
    scale = (w.abs().amax(-1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    return (qweight.float() * scale.float().unsqueeze(-1)).to(dtype)


def quantize_fp8(w: torch.Tensor):
    """w [..., N, K] -> (qweight float8_e4m3fn [..., N, K], scale fp32 [..., N]); absmax/448 per row."""
    w = w.float()
    scale = (w.abs().amax(-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    return (qweight.float() * scale.float().unsqueeze(-1)).to(dtype)


# --------------------------------------------------------------------------- generic


def quantize(w: torch.Tensor, scheme: str, group_size: int = 128, clip: bool = False,
             importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One tensor -> {"qweight", "scale"[, "zero"]} in the dgplug layout (importance: int4 only)."""
    if scheme == "int4":
        q, s, z = quantize_int4(w, group_size, "asym", clip, importance)
        return {"qweight": q, "scale": s, "zero": z}
    if scheme == "int8":
        q, s = quantize_int8(w)
        return {"qweight": q, "scale": s}
    if scheme == "fp8":
        q, s = quantize_fp8(w)
        return {"qweight": q, "scale": s}
    raise InputError(f"unknown quantization scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")


def scheme_of(parts: dict) -> str:
    """The scheme of a {"qweight", "scale"[, "zero"]} group, from its dtypes."""
    dt = parts["qweight"].dtype
    if dt == torch.uint8 and "zero" in parts:
        return "int4"
    if dt == torch.int8:
        return "int8"
    if dt == torch.float8_e4m3fn:
        return "fp8"
    raise FormatError(f"qweight dtype {dt} is not a dgplug scheme")


def dequantize(parts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """{"qweight", "scale"[, "zero"]} (or an object with those attributes) -> dense tensor."""
    if not isinstance(parts, dict):
        parts = {k: getattr(parts, k) for k in ("qweight", "scale", "zero", "group_size")
                 if getattr(parts, k, None) is not None}
    s = scheme_of(parts)
    if s == "int4":
        return dequantize_int4(parts["qweight"], parts["scale"], parts["zero"], parts.get("group_size"), dtype)
    if s == "int8":
        return dequantize_int8(parts["qweight"], parts["scale"], dtype)
    return dequantize_fp8(parts["qweight"], parts["scale"], dtype)


# --------------------------------------------------------------------------- safetensors writing

@dataclass
class _Out:
    """One output tensor of the plan."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Job:
    """One input tensor and what becomes of it."""

    src: str  # name in the source checkpoint
    file: str  # source shard file name
    dtype: torch.dtype
    shape: tuple[int, ...]
    action: str  # "copy", or a scheme ("int4", "int8", "fp8")
    outs: list[_Out] = field(default_factory=list)

    @property
    def in_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_all(f, data: bytes | memoryview, where: str) -> None:
    try:
        f.write(data)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DGPlugError(f"{where}: no space left on device ({e.strerror or e})") from None
        raise DGPlugError(f"{where}: write failed ({e})") from None


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16):
        t = t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _header(outs: list[_Out]) -> bytes:
    hdr: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for o in outs:
        hdr[o.name] = {"dtype": dtype_name(o.dtype), "shape": list(o.shape), "data_offsets": [off, off + o.nbytes]}
        off += o.nbytes
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# --------------------------------------------------------------------------- checkpoint


_WEIGHT_EXT = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def gguf_source(path, allow_requantize: bool = False):
    """(config.json dict, GGUFTensors) of a DiffusionGemma GGUF as the converter's source; a GGUF
    whose weights are already of a block type is refused without allow_requantize (llama-quantize's
    --allow-requantize: a second quantization is worse than one of the original weights)."""
    from dgplug.config import TINY_VISION

    from .gguf_import import GGUFTensors, hf_config_files, open_gguf

    raw, _ = hf_config_files(open_gguf(path))  # gguf-py's reader: only while the config is read
    handle = GGUFTensors(path, raw)
    if handle.block_typed and not allow_requantize:
        (name, qtype), n = handle.block_typed[0], len(handle.block_typed)
        raise InputError(f"{path}: tensor {name} is {qtype}{f' (and {n - 1} more)' if n > 1 else ''}: the GGUF is "
                         f"already quantized; quantizing it again is worse than quantizing the original weights: pass "
                         f"--allow-requantize (allow_requantize=True) to go on")
    raw.setdefault("vision_config", dict(TINY_VISION))  # none in a GGUF: transformers' loader's placeholder
    return raw, handle


def read_source(src, allow_requantize: bool = False):
    """(config.json dict, where it was read, {name: StoredTensor}, GGUFTensors or None) of a checkpoint
    directory or of a GGUF file (gguf_source)."""
    from .gguf_requant import is_gguf

    if is_gguf(src):
        raw, handle = gguf_source(src, allow_requantize)
        return raw, f"{src} (GGUF metadata)", handle.stored, handle
    raw, cfg_path = read_config_json(src)
    refuse_quantized(raw, cfg_path)
    return raw, str(cfg_path), read_index(src), None


def plan_conversion(src_dir, scheme: str, group_size: int = 128, quantize_embedding: bool = False,
                    allow_requantize: bool = False, source=None):
    """Validate the inputs and decide, tensor by tensor, what is written. Reads headers only.
    `src_dir`: a checkpoint directory, or a GGUF file; `source`: its read_source, when read already.

    Returns (raw config dict, list of jobs). Raises before anything is written.
    """
    from dgplug.config import from_dict
    from dgplug.names import text_tensors

    src = Path(src_dir)
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    if scheme == "int4" and (not isinstance(group_size, int) or group_size <= 0 or group_size % 2):
        raise InputError(f"group size {group_size!r} must be a positive even integer")
    raw, cfg_path, stored, _ = source or read_source(src, allow_requantize)
    cfg = from_dict(raw, cfg_path)
    specs = {s.hf: s for s in text_tensors(cfg.text)}
    jobs: list[_Job] = []
    for t in sorted(stored.values(), key=lambda t: (t.file, t.name)):  # shard by shard, as they are read
        if t.dtype not in DTYPES:
            raise CheckpointError(f"{t.file}: tensor {t.name} has unsupported dtype {t.dtype}")
        name, fname, dt, shape = t.name, Path(t.file).name, torch_dtype(t.dtype), t.shape
        spec = specs.get(name)
        if spec is not None and tuple(spec.shape) != shape:
            raise CheckpointError(f"{t.file}: tensor {name} has shape {list(shape)}, expected {list(spec.shape)}")
        kind = spec.kind if spec is not None else None
        action = "copy"
        if kind in ("linear", "experts"):
            action = scheme
        elif kind == "embed" and quantize_embedding:
            action = "int8"
        job = _Job(name, fname, dt, shape, action)
        if action == "copy":
            job.outs = [_Out(name, dt, shape)]
        else:
            *lead, N, K = shape
            lead = tuple(lead)
            if action == "int4":
                if K % 2:
                    raise InputError(f"int4 needs an even input dim: tensor {name} has K={K} (shape {list(shape)})")
                ng = -(-K // group_size)  # a short last group when group_size does not divide K
                job.outs = [
                    _Out(name + ".qweight", torch.uint8, lead + (N, K // 2)),
                    _Out(name + ".scale", torch.float16, lead + (N, ng)),
                    _Out(name + ".zero", torch.uint8, lead + (N, ng)),
                ]
            else:
                qdt = torch.int8 if action == "int8" else torch.float8_e4m3fn
                job.outs = [_Out(name + ".qweight", qdt, shape), _Out(name + ".scale", torch.float32, lead + (N,))]
        jobs.append(job)
    missing = [n for n, s in specs.items() if n not in stored and s.kind != "scalar"]
    if missing:
        raise CheckpointError(f"{src}: tensor {missing[0]} is missing from the checkpoint ({len(missing)} missing)")
    return raw, jobs


def _modules_to_not_convert(jobs: list[_Job]) -> list[str]:
    skip = {"model.encoder.vision_tower", "model.encoder.embed_vision"}
    for j in jobs:
        if j.action == "copy" and j.src.endswith("embed_tokens.weight"):
            skip.add(j.src[: -len(".weight")])
        if j.src.endswith("router.proj.weight"):
            skip.add(j.src[: -len(".proj.weight")])
    return sorted(skip)


def _shards(jobs: list[_Job], max_shard_bytes: int) -> list[list[_Job]]:
    shards: list[list[_Job]] = [[]]
    size = 0
    for j in jobs:
        b = sum(o.nbytes for o in j.outs)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += b
    return shards


def _rows_per_chunk(job: _Job, budget: int = 256 << 20) -> int:
    row = math.prod(job.shape[1:]) * 4  # fp32 working copy per dim-0 index
    return max(1, budget // max(1, row))


def quantize_checkpoint(src_dir, out_dir, scheme: str, group_size: int = 128, quantize_embedding: bool = False,
                        progress: bool = True, clip: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        overwrite: bool = False, imatrix=None, *, revision: str | None = None,
                        token: str | bool | None = None, allow_requantize: bool = False) -> Path:
    """Convert a Hugging Face DiffusionGemma checkpoint (or a DiffusionGemma GGUF: its config,
    generation config and tokenizer written as a checkpoint's; see gguf_source for allow_requantize)
    into a dgplug-quantized safetensors directory.

    imatrix: an importance matrix (path to an imatrix GGUF, or converters.imatrix.Imatrix): int4
    groups then pick the scale/zero with the least importance-weighted error (see quantize_int4).

    Streams tensor by tensor (experts and large tensors in chunks of ~256 MB of fp32), writes into a
    temporary directory beside `out_dir` and renames it into place when complete. Deterministic bytes.
    Raises a DGPlugError subclass (naming the file/tensor/value) and leaves no `out_dir` on failure.
    `src_dir` may be a hub id "owner/name" (see dgplug.hub; `revision`, `token`).
    """
    from dgplug import hub

    from .gguf_requant import is_gguf

    src = Path(src_dir) if is_gguf(src_dir) else hub.resolve(src_dir, revision=revision, token=token)
    out = Path(out_dir)
    source = read_source(src, allow_requantize) if scheme in SCHEMES else None  # else plan_conversion's error
    raw, jobs = plan_conversion(src, scheme, group_size, quantize_embedding, source=source)
    gguf = source[3]
    importance = _importance_by_tensor(raw, jobs, imatrix) if imatrix is not None else {}
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: exists and is not empty (pass overwrite to replace it)")
    if out.resolve() == src.resolve():
        raise InputError(f"{out}: output directory is the source directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.dgplug-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shards = _shards(jobs, max_shard_bytes)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total_in = sum(j.in_bytes for j in jobs)
    try:
        tmp.mkdir()
        # config.json with quantization_config
        cfg = dict(raw)
        cfg["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "scheme": scheme,
            "group_size": group_size if scheme == "int4" else None,
            "modules_to_not_convert": _modules_to_not_convert(jobs),
            "embedding_scheme": "int8" if quantize_embedding else None,
            "clip": bool(clip) if scheme == "int4" else False,
            "imatrix": bool(importance),
            "format_version": FORMAT_VERSION,
        }
        _write_text(tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if gguf is not None:  # what a checkpoint has beside its weights, from the GGUF's metadata
            from .gguf_import import hf_config_files, open_gguf, tokenizer_from_gguf

            reader = open_gguf(src)
            gen = hf_config_files(reader)[1]
            _write_text(tmp / "generation_config.json", json.dumps(gen, indent=2, sort_keys=True) + "\n")
            tokenizer_from_gguf(reader).save_pretrained(str(tmp))
            del reader
        else:
            for p in sorted(src.iterdir()):
                if p.is_file() and not p.name.startswith(".") and p.name not in ("config.json", INDEX) \
                        and not p.name.endswith(_WEIGHT_EXT):
                    _copy_file(p, tmp / p.name)
        weight_map: dict[str, str] = {}
        total_size = 0
        handles: dict[str, object] = {}
        with conversion_progress(progress, tensor_column=True) as bar:
            task = bar.add_task(f"{scheme}", total=total_in, tensor="")
            for shard, fname in zip(shards, names):
                outs = [o for j in shard for o in j.outs]
                for o in outs:
                    weight_map[o.name] = fname
                    total_size += o.nbytes
                where = str(out / fname)
                with open(tmp / fname, "wb") as f:
                    _write_all(f, _header(outs), where)
                    for job in shard:
                        bar.update(task, tensor=job.src)
                        if job.file not in handles:
                            handles.clear()  # one source shard open at a time
                            handles[job.file] = gguf or open_safetensors(src / job.file)
                        _convert_job(handles[job.file], job, f, group_size, clip, f"{where} (tensor {job.src})",
                                     lambda b: bar.advance(task, b), importance.get(job.src))
                    try:
                        f.flush()
                        os.fsync(f.fileno())
                    except OSError as e:
                        raise DGPlugError(f"{where}: write failed ({e})") from None
            handles.clear()
        index = {"metadata": {"total_size": total_size, "format": "dgplug-" + scheme},
                 "weight_map": dict(sorted(weight_map.items()))}
        _write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_text(path: Path, text: str) -> None:
    with open(path, "wb") as f:
        _write_all(f, text.encode(), str(path))


def _copy_file(a: Path, b: Path) -> None:
    with open(a, "rb") as fi, open(b, "wb") as fo:
        while True:
            buf = fi.read(16 << 20)
            if not buf:
                break
            _write_all(fo, buf, str(b))


def _importance_by_tensor(raw: dict, jobs: list[_Job], imatrix) -> dict[str, torch.Tensor]:
    """Per int4 job: the imatrix's importance shaped [matrices, 1, K] (experts) or [K] (linears)
    (Imatrix.for_tensors: missing entries said once, mismatches one error naming the tensor)."""
    from dgplug.config import from_dict
    from dgplug.converters.imatrix import Imatrix
    from dgplug.names import text_tensors

    im = imatrix if isinstance(imatrix, Imatrix) else Imatrix.load(imatrix)
    gguf_of = {s.hf: s.gguf for s in text_tensors(from_dict(raw).text)}
    jobs = [j for j in jobs if j.action == "int4" and j.src in gguf_of]
    found = im.for_tensors((gguf_of[j.src], j.src, j.shape) for j in jobs)
    out = {}
    for job in jobs:
        imp = found.get(gguf_of[job.src])
        if imp is not None:
            imp = torch.from_numpy(imp)
            out[job.src] = imp[:, None, :] if len(job.shape) == 3 else imp[0]
    return out


def _convert_job(handle, job: _Job, f, group_size: int, clip: bool, where: str, advance,
                 importance: torch.Tensor | None = None) -> None:
    if job.action == "copy":
        t = handle.get_tensor(job.src)
        _write_all(f, _tensor_bytes(t), where)
        advance(job.in_bytes)
        return
    d0 = job.shape[0]
    step = _rows_per_chunk(job)
    rest: dict[str, list[torch.Tensor]] = {}
    sl = handle.get_slice(job.src)
    for a in range(0, d0, step):
        b = min(d0, a + step)
        w = sl[a:b]
        if tuple(w.shape) != (b - a,) + job.shape[1:]:
            raise CheckpointError(f"{where}: slice has shape {list(w.shape)}")
        if not torch.isfinite(w).all():
            raise CheckpointError(f"{where}: contains NaN or inf")
        imp = importance[a:b] if importance is not None and importance.dim() == 3 else importance
        parts = quantize(w, job.action, group_size, clip and job.action == "int4", imp)
        _write_all(f, _tensor_bytes(parts.pop("qweight")), where)
        for k, v in parts.items():
            rest.setdefault(k, []).append(v)
        advance((b - a) * math.prod(job.shape[1:]) * job.dtype.itemsize)
    for k in ("scale", "zero"):
        if k in rest:
            _write_all(f, _tensor_bytes(torch.cat(rest[k])), where)


# --------------------------------------------------------------------------- reading


def read_quantization_config(path) -> dict | None:
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    try:
        return json.loads(f.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable config ({e})") from None


def group_quantized(tensors: dict[str, torch.Tensor], make=None) -> dict:
    """Group `X.qweight` / `X.scale` / `X.zero` into one entry `X`; other tensors pass through.

    `make(parts_dict)` builds the grouped value (default: the plain dict {"qweight", "scale"[, "zero"]}).
    """
    out: dict = {}
    groups: dict[str, dict] = {}
    for k, v in tensors.items():
        base, _, suf = k.rpartition(".")
        if suf in ("qweight", "scale", "zero") and base:
            groups.setdefault(base, {})[suf] = v
        else:
            out[k] = v
    for base, parts in groups.items():
        if "qweight" not in parts:  # e.g. router.scale: a plain tensor whose name ends in .scale
            for suf, v in parts.items():
                out[f"{base}.{suf}"] = v
            continue
        if "scale" not in parts:
            raise FormatError(f"{base}.qweight has no {base}.scale")
        out[base] = make(parts) if make else parts
    return out


def load_quantized_tensors(path, device: str | torch.device = "cpu", as_quantized_weight: bool = True) -> dict:
    """All tensors of a dgplug-quantized directory: name -> tensor, or for a quantized tensor `X`
    (stored as X.qweight / X.scale [/ X.zero]) name X -> `kernels.quantized_weight.QuantizedWeight` when that class
    exists (and as_quantized_weight), else a dict {"qweight", "scale"[, "zero"], "scheme", "group_size"}.
    """
    p = Path(path)
    qc = read_quantization_config(p)
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{p / 'config.json'}: no dgplug quantization_config")
    if int(qc.get("format_version", 0)) > FORMAT_VERSION:
        raise FormatError(f"{p}: format_version {qc.get('format_version')} is newer than this dgplug ({FORMAT_VERSION})")
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted({t.file for t in read_index(p).values()}):
        with open_safetensors(fname, str(device)) as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)

    qw_cls = None
    if as_quantized_weight:
        try:
            from dgplug.kernels.quantized_weight import QuantizedWeight as qw_cls  # type: ignore
        except Exception:  # noqa: BLE001 - the kernels module may not exist yet
            qw_cls = None

    cfg_gs = qc.get("group_size")

    def make(parts):
        s = scheme_of(parts)
        gs = int(cfg_gs) if s == "int4" else None
        if qw_cls is not None:
            return _make_qw(qw_cls, parts, s, gs)
        return dict(parts, scheme=s, group_size=gs)

    return group_quantized(tensors, make)


def _make_qw(cls, parts, scheme, group_size):
    """Build kernels.quantized_weight.QuantizedWeight with whatever of these fields it declares."""
    import dataclasses
    import inspect

    avail = dict(parts, scheme=scheme, group_size=group_size)
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        names = list(inspect.signature(cls).parameters)
    return cls(**{k: avail[k] for k in names if avail.get(k) is not None})


# --------------------------------------------------------------------------- measurement


def _measure(seed: int = 0) -> None:  # pragma: no cover - documentation numbers
    torch.manual_seed(seed)
    cases = {}
    cases["gaussian [2048, 2048]"] = torch.randn(2048, 2048) * 0.02
    w = torch.randn(2048, 2048) * 0.02
    m = torch.rand(w.shape) < 1e-3
    cases["gaussian + 0.1% outliers x10"] = torch.where(m, w * 10, w)
    cases["student-t (df=4) [2048, 2048]"] = torch.distributions.StudentT(4.0).sample((2048, 2048)) * 0.02
    from dgplug.testing import build_hf_model, tiny_text_config

    model = build_hf_model(tiny_text_config(hidden_size=128, intermediate_size=128, moe_intermediate_size=128),
                           qk_norm_scale=0.25)
    ws = [p.detach().reshape(-1, 128) for n, p in model.named_parameters()
          if p.dim() >= 2 and "vision" not in n and "embed" not in n and "router" not in n]
    cases["tiny model, all linears"] = torch.cat(ws)

    def rel(w, deq):
        return float((w - deq).square().sum() / w.square().sum())

    print("| weights | sym /7 | sym /-8 | asym | asym + clip | int8 | fp8 |")
    print("|---|---|---|---|---|---|---|")
    for name, w in cases.items():
        row = []
        for mode, clip in (("sym", False), ("sym8", False), ("asym", False), ("asym", True)):
            q, s, z = quantize_int4(w, 128, mode, clip)
            row.append(f"{rel(w, dequantize_int4(q, s, z)):.3e}")
        row.append(f"{rel(w, dequantize_int8(*quantize_int8(w))):.3e}")
        row.append(f"{rel(w, dequantize_fp8(*quantize_fp8(w))):.3e}")
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--measure" in sys.argv:
        _measure()
