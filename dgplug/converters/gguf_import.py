"""Reading DiffusionGemma GGUF files (ours or the published ones) back into Hugging Face terms.

Entry points (what `dgplug.load("x.gguf")` and `dgplug inspect FILE.gguf` call):

    open_gguf(path) -> gguf_reader.GGUFFile
        Validates the file first (`validate_gguf`), then maps it (gguf-py's reader's names, read fast).
    validate_gguf(path) -> dict
        Walks the header, every metadata value and every tensor record with bounds checks
        against the file size BEFORE anything is allocated: wrong magic/version, truncation,
        absurd counts or lengths, unknown value or tensor types, bad dimensions, tensor data past
        the end of the file and a non-"diffusion-gemma" architecture raise FormatError naming
        the problem. Returns a small summary (version, counts, alignment, data offset).
    gguf_to_config(reader_or_path) -> dict
        A config.json-style dict that `dgplug.config.from_dict` accepts (model_type
        "diffusion_gemma", text_config with global_head_dim / num_global_key_value_heads /
        layer_types / rope_parameters, canvas_length), plus "generation_config": the sampler
        defaults stored under diffusion.* (released defaults for absent keys).
    iter_hf_tensors(path, dtype=None, packed=False) -> iterator of (hf_name, torch.Tensor | GGMLWeight)
        Tensor by tensor, dequantised with gguf.quants.dequantize: F32 -> fp32 (bit exact),
        BF16 -> bf16 (bit exact), everything else -> fp32 (or `dtype` if given); with packed=True
        the weights of the block types in kernels.ggml.PACKED_TYPES stay as their blocks
        (kernels.ggml.GGMLWeight, a view of the file's memory map). GGUF names are
        mapped back through dgplug.names, ggml's reversed dims undone (the fused expert
        gate_up stays fused, [E, 2I, H]); the encoder layer scalars are included; rope_freqs
        (computed, not a checkpoint tensor) is skipped.
    check_contract(path) -> list[str]  (contract_report(path): the problems and notes)
        Problems of the file against ../shared/spec/gguf.md: missing keys, keys of another type or
        value, missing / unknown tensors, wrong shapes, 1-D tensors or the router not in F32; notes
        on what llama.cpp loads all the same (a mix other than llama-quantize's default).
    inspect_table(path) -> {"metadata": {key: value}, "tensors": [(name, type, shape, bytes)]}
        `shape` in ggml order (innermost first, as llama.cpp prints it); long arrays summarised.
    tokenizer_from_gguf(path) -> transformers.PreTrainedTokenizerFast
        Rebuilds the tokenizer from the embedded vocabulary (BPE with merges, or WordLevel when
        the file has no merges).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFValueType as VT, TokenType

from dgplug.errors import FormatError
from dgplug.names import GEMMA4_VISIBLE_TOKENS, ROPE_FREQS_GGUF, TOKENS_SPACED, text_tensors

from .gguf_reader import GGUFFile

ARCH = "diffusion-gemma"
GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4
_SCALAR_SIZE = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4, VT.FLOAT32: 4,
                VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}
_SCALAR_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
               VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}

# The contract's metadata (../shared/spec/gguf.md), one row per key: the value types llama.cpp's
# loader accepts ((type, array element type or None), ...), whether the key is required, and the
# value the contract fixes (None: any). llama.cpp refuses a key of another type ("wrong type").
_U32, _F32, _BOOL, _STR = ((VT.UINT32, None),), ((VT.FLOAT32, None),), ((VT.BOOL, None),), ((VT.STRING, None),)
_STRS = ((VT.ARRAY, VT.STRING),)
METADATA: dict[str, tuple[tuple, bool, object]] = {
    "general.architecture": (_STR, True, ARCH),
    "general.type": (_STR, True, "model"),
    "general.name": (_STR, True, None),
    "general.file_type": (_U32, True, None),
    "general.quantization_version": (_U32, True, 2),
    **{f"{ARCH}.{k}": (_U32, True, None) for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length", "expert_feed_forward_length",
        "expert_count", "expert_used_count", "attention.head_count", "attention.key_length",
        "attention.value_length", "attention.key_length_swa", "attention.value_length_swa",
        "attention.sliding_window", "rope.dimension_count", "rope.dimension_count_swa")},
    f"{ARCH}.attention.head_count_kv": (((VT.ARRAY, VT.INT32), (VT.ARRAY, VT.UINT32), (VT.UINT32, None)), True, None),
    f"{ARCH}.attention.sliding_window_pattern": (((VT.ARRAY, VT.BOOL),), True, None),
    f"{ARCH}.attention.causal": (_BOOL, True, False),
    f"{ARCH}.attention.shared_kv_layers": (_U32, False, 0),
    f"{ARCH}.embedding_length_per_layer_input": (_U32, False, 0),
    **{f"{ARCH}.{k}": (_F32, True, None) for k in (
        "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa", "final_logit_softcapping")},
    "diffusion.canvas_length": (_U32, True, None),
    "diffusion.eb_max_steps": (_U32, False, None),
    "diffusion.eb_stability_threshold": (_U32, False, None),
    **{f"diffusion.eb_{k}": (_F32, False, None) for k in ("t_min", "t_max", "entropy_bound", "confidence_threshold")},
    "tokenizer.ggml.model": (_STR, True, "gemma4"),
    "tokenizer.ggml.tokens": (_STRS, True, None),
    "tokenizer.ggml.token_type": (((VT.ARRAY, VT.INT32),), True, None),
    "tokenizer.ggml.scores": (((VT.ARRAY, VT.FLOAT32),), False, None),
    "tokenizer.ggml.merges": (_STRS, False, None),
    **{f"tokenizer.ggml.{k}_token_id": (_U32, k in ("mask", "bos", "eos"), None)
       for k in ("mask", "bos", "eos", "unknown", "padding", "seperator", "cls", "eot", "eom")},
    **{f"tokenizer.ggml.add_{k}": (_BOOL, False, None) for k in ("bos_token", "eos_token", "space_prefix")},
    "tokenizer.chat_template": (_STR, False, None),
}
REQUIRED_KEYS = [k for k, (_, required, _) in METADATA.items() if required]
GEN_KEYS = {  # diffusion.* key -> generation_config key (released defaults in dgplug.config)
    "diffusion.eb_max_steps": "max_denoising_steps",
    "diffusion.eb_t_min": "t_min",
    "diffusion.eb_t_max": "t_max",
    "diffusion.eb_entropy_bound": "entropy_bound",
    "diffusion.eb_stability_threshold": "stability_threshold",
    "diffusion.eb_confidence_threshold": "confidence_threshold",
}


# ---------------------------------------------------------------------------------------------
# Validation: a bounds-checked walk of the file before gguf-py (which trusts the counts) runs
# ---------------------------------------------------------------------------------------------
class _Cursor:
    def __init__(self, f, size: int, path: str):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated GGUF ({what} needs {n} bytes at offset {self.pos}, "
                              f"file has {self.size})")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.f.read(n)
        if len(b) != n:
            raise FormatError(f"{self.path}: truncated GGUF while reading {what}")
        self.pos += n
        return b

    def skip(self, n: int, what: str):
        self.need(n, what)
        self.f.seek(n, 1)
        self.pos += n

    def u32(self, what):
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what):
        return struct.unpack("<Q", self.read(8, what))[0]

    def string(self, what, keep=True):
        n = self.u64(f"{what} length")
        if n > self.size - self.pos:
            raise FormatError(f"{self.path}: {what} claims {n} bytes, more than the rest of the file")
        if keep:
            return self.read(n, what).decode("utf-8", errors="replace")
        self.skip(n, what)
        return None


def _value_type(c: _Cursor, raw: int, key: str) -> VT:
    try:
        return VT(raw)
    except ValueError:
        raise FormatError(f"{c.path}: metadata key {key!r} has unknown value type {raw}") from None


def _check_architecture(path: str, meta: dict) -> None:
    arch = meta.get("general.architecture")
    if arch == ARCH:
        return
    if meta.get("general.type") == "imatrix":
        raise FormatError(f"{path} is an importance matrix (general.type 'imatrix'), not a model: "
                          f"it goes to `dgplug convert --imatrix`")
    if arch is None and meta.get("split.no", 0) != 0:  # a later shard: the metadata is in the first
        shard_paths(path, meta)
    if arch is None:
        raise FormatError(f"{path}: no general.architecture, so not a model GGUF")
    raise FormatError(f"{path}: architecture {arch!r} is not {ARCH!r} (dgplug runs DiffusionGemma only)")


def validate_gguf(path, any_model: bool = False) -> dict:
    """Checks the header, metadata and tensor table against the file's size before gguf-py maps it;
    the architecture must be diffusion-gemma unless any_model (inspect reads any GGUF)."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    with open(path, "rb") as f:
        c = _Cursor(f, size, path)
        magic = c.read(4, "magic") if size >= 4 else b""
        if magic != GGUF_MAGIC:
            raise FormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = c.u32("version")
        if version not in (2, 3):
            if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
                raise FormatError(f"{path}: a big-endian GGUF (its header is byte-swapped); dgplug and llama.cpp on "
                                  "this machine read little-endian ones (gguf-py's gguf-convert-endian FILE little)")
            raise FormatError(f"{path}: unsupported GGUF version {version}")
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # every tensor record takes >= 8+0+4+8+4+8 bytes and every key/value >= 8+0+4+1
        if n_tensors * 32 > size or n_kv * 13 > size or n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise FormatError(f"{path}: header announces {n_tensors} tensors and {n_kv} metadata entries, "
                              f"impossible in a file of {size} bytes")
        meta: dict = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            vt = _value_type(c, c.u32(f"type of {key!r}"), key)
            if vt == VT.ARRAY:
                st = _value_type(c, c.u32(f"array type of {key!r}"), key)
                n = c.u64(f"array length of {key!r}")
                if st == VT.STRING:
                    if n * 8 > size - c.pos:
                        raise FormatError(f"{path}: array {key!r} claims {n} strings, more than the file holds")
                    keep = n <= 16
                    vals = [c.string(f"{key!r}[{i}]", keep) for i in range(n)]
                    meta[key] = vals if keep else n
                elif st == VT.ARRAY:
                    raise FormatError(f"{path}: nested arrays in {key!r} are not supported")
                else:
                    isz = _SCALAR_SIZE[st]
                    if n * isz > size - c.pos:
                        raise FormatError(f"{path}: array {key!r} claims {n} items, more than the file holds")
                    if n <= 4096:
                        raw = c.read(n * isz, key)
                        meta[key] = list(struct.unpack(f"<{n}{_SCALAR_FMT[st][1]}", raw))
                    else:
                        c.skip(n * isz, key)
                        meta[key] = n
            elif vt == VT.STRING:
                meta[key] = c.string(f"value of {key!r}")
            else:
                meta[key] = struct.unpack(_SCALAR_FMT[vt], c.read(_SCALAR_SIZE[vt], key))[0]
        if not any_model:
            _check_architecture(path, meta)
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise FormatError(f"{path}: bad general.alignment {align!r}")
        infos = []
        names = set()
        for _ in range(n_tensors):
            name = c.string("tensor name")
            if name in names:
                raise FormatError(f"{path}: duplicated tensor {name!r}")
            names.add(name)
            nd = c.u32(f"dims of {name}")
            if nd == 0 or nd > MAX_DIMS:
                raise FormatError(f"{path}: tensor {name!r} has {nd} dimensions")
            dims = [c.u64(f"dim of {name}") for _ in range(nd)]
            if any(d == 0 or d > 1 << 40 for d in dims):
                raise FormatError(f"{path}: tensor {name!r} has absurd dimensions {dims}")
            raw_t = c.u32(f"type of {name}")
            try:
                qt = T(raw_t)
                bs, ts = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise FormatError(f"{path}: tensor {name!r} has unknown ggml type {raw_t}") from None
            if dims[0] % bs:
                raise FormatError(f"{path}: tensor {name!r} row of {dims[0]} is not a multiple of {qt.name}'s block {bs}")
            off = c.u64(f"offset of {name}")
            n = 1
            for d in dims:
                n *= d
            if n > 1 << 42:
                raise FormatError(f"{path}: tensor {name!r} has {n} elements")
            infos.append((name, dims, qt, off, n // bs * ts))
        data_start = c.pos + (-c.pos) % align
        for name, dims, qt, off, nb in infos:
            if off % align:
                raise FormatError(f"{path}: tensor {name!r} data offset {off} is not aligned to {align}")
            if data_start + off + nb > size:
                raise FormatError(f"{path}: tensor {name!r} data ({nb} bytes at {data_start + off}) runs past the "
                                  f"end of the file ({size} bytes)")
    return dict(version=version, n_tensors=n_tensors, n_kv=n_kv, alignment=align, data_offset=data_start,
                metadata=meta, tensors=infos)


def open_gguf(path, mode: str = "r", any_model: bool = False) -> GGUFFile:
    """Validated, then memory-mapped by gguf_reader.GGUFFile (gguf-py's reader's names, at the speed of
    the bytes; "c": copy-on-write, so tensors can view it). The
    first shard of a split GGUF (llama.cpp's gguf-split) opens the whole model: its reader lists
    the tensors of every shard."""
    meta = validate_gguf(path, any_model)["metadata"]
    reader = _gguf_reader(path, mode)
    if meta.get("split.count", 1) != 1 or meta.get("split.no", 0) != 0:
        _join_shards(path, reader, meta, mode)
    return reader


def _gguf_reader(path, mode: str) -> GGUFFile:
    try:
        return GGUFFile(str(path), mode)
    except (ValueError, KeyError, IndexError, struct.error) as e:
        raise FormatError(f"{path}: malformed GGUF ({e})") from None


SPLIT_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # llama.cpp's shard names


def shard_paths(path, meta: dict) -> list[Path]:
    """Every shard of the split GGUF whose first shard is `path` (metadata split.no 0, split.count n),
    named as llama.cpp's gguf-split names them, PREFIX-00001-of-0000n.gguf ... (a file that is not
    split: [path])."""
    path = Path(path)
    no, count = meta.get("split.no", 0), meta.get("split.count", 1)
    m = SPLIT_NAME.match(path.name)
    if no != 0:
        first = f" ({m['prefix']}-00001-of-{int(m['count']):05d}.gguf)" if m else ""
        raise FormatError(f"{path}: shard {no + 1} of {count} of a split GGUF: give the first shard{first}")
    if count == 1:
        return [path]
    if m is None or int(m["count"]) != count:
        raise FormatError(f"{path}: the first shard of a split GGUF of {count} (split.count), named otherwise than "
                          f"PREFIX-00001-of-{count:05d}.gguf: the other shards cannot be found")
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _join_shards(path, reader: GGUFFile, meta: dict, mode: str) -> None:
    """The other shards' tensors appended to the first shard's reader (each checked as a file first)."""
    paths = shard_paths(path, meta)
    names = {t.name for t in reader.tensors}
    for i, p in enumerate(paths[1:], start=1):
        if not p.exists():
            raise FormatError(f"{path}: shard {i + 1} of {len(paths)} of this split GGUF is missing ({p} not found)")
        m = validate_gguf(p, any_model=True)["metadata"]
        if m.get("split.no") != i or m.get("split.count") != len(paths):
            raise FormatError(f"{p}: split.no {m.get('split.no')} and split.count {m.get('split.count')}, "
                              f"expected {i} and {len(paths)} (shard {i + 1} of {path})")
        for t in (shard := _gguf_reader(p, mode)).tensors:
            if t.name in names:
                raise FormatError(f"{p}: tensor {t.name!r} is also in an earlier shard")
            names.add(t.name)
        reader.tensors.extend(shard.tensors)
    if meta.get("split.tensors.count", len(names)) != len(names):
        raise FormatError(f"{path}: the {len(paths)} shards hold {len(names)} tensors, split.tensors.count "
                          f"says {meta['split.tensors.count']}")


def model_file(files: list[Path]) -> Path | None:
    """The model among a directory's .gguf files: the only one, or the first shard when they are
    exactly the shards of one split GGUF; else None (several models: the user names one)."""
    if len(files) == 1:
        return files[0]
    ms = [SPLIT_NAME.match(f.name) for f in files]
    if not files or not all(ms) or len({(m["prefix"], m["count"]) for m in ms}) != 1:
        return None
    if sorted(int(m["no"]) for m in ms) != list(range(1, int(ms[0]["count"]) + 1)):
        return None
    return next(f for f, m in zip(files, ms) if int(m["no"]) == 1)


def _reader(r) -> GGUFFile:
    return r if isinstance(r, (GGUFFile, GGUFReader)) else open_gguf(r)


def _f32(v) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(f"{float(v):.7g}")


def _field(reader: GGUFFile, key: str, default=None):
    f = reader.get_field(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed value reads as absent
        return default


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def gguf_to_config(reader) -> dict:
    reader = _reader(reader)
    a, path = ARCH, getattr(reader.data, "filename", "GGUF")

    def need(key):
        v = _field(reader, key)
        if v is None:
            raise FormatError(f"{path}: no metadata key {key!r}")
        return v

    n_layers = int(need(f"{a}.block_count"))
    swa = need(f"{a}.attention.sliding_window_pattern")
    kvh = need(f"{a}.attention.head_count_kv")
    if isinstance(kvh, int):
        kvh = [kvh] * n_layers
    for key, v in (("attention.sliding_window_pattern", swa), ("attention.head_count_kv", kvh)):
        if not isinstance(v, list) or len(v) != n_layers:
            raise FormatError(f"{path}: {a}.block_count is {n_layers}, but {a}.{key} lists "
                              f"{len(v) if isinstance(v, list) else 'no'} layers")
    layer_types = ["sliding_attention" if s else "full_attention" for s in swa]
    slide_kv = next((int(k) for k, s in zip(kvh, swa) if s), int(kvh[0]))
    full_kv = next((int(k) for k, s in zip(kvh, swa) if not s), slide_kv)
    ghd = int(need(f"{a}.attention.key_length"))
    hd = int(_field(reader, f"{a}.attention.key_length_swa", ghd))
    # partial rotation of full layers: the 1.0 entries of rope_freqs
    prf = 0.25
    for t in reader.tensors:
        if t.name == ROPE_FREQS_GGUF:
            f = np.asarray(t.data, dtype=np.float32).reshape(-1)
            prf = float((f < 1e29).sum()) * 2 / ghd
            break
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = None
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            vocab = int(t.shape[1])
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else 0

    def tid(key, default):
        v = _field(reader, f"tokenizer.ggml.{key}")
        return int(v) if v is not None else default

    tc = {
        "model_type": "diffusion_gemma_text",
        "vocab_size": vocab,
        "hidden_size": int(need(f"{a}.embedding_length")),
        "intermediate_size": int(need(f"{a}.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(need(f"{a}.attention.head_count")),
        "num_key_value_heads": slide_kv,
        "head_dim": hd,
        "global_head_dim": ghd,
        "num_global_key_value_heads": full_kv,
        "num_experts": int(need(f"{a}.expert_count")),
        "top_k_experts": int(need(f"{a}.expert_used_count")),
        "moe_intermediate_size": int(need(f"{a}.expert_feed_forward_length")),
        "sliding_window": int(need(f"{a}.attention.sliding_window")),
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_theta": _f32(_field(reader, f"{a}.rope.freq_base", 1e6)),
                               "partial_rotary_factor": prf, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": _f32(_field(reader, f"{a}.rope.freq_base_swa", 1e4)),
                                  "rope_type": "default"},
        },
        "rms_norm_eps": _f32(need(f"{a}.attention.layer_norm_rms_epsilon")),
        "final_logit_softcapping": _f32(_field(reader, f"{a}.final_logit_softcapping", 30.0)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 131072)),
        "pad_token_id": tid("padding_token_id", 0),
        "bos_token_id": tid("bos_token_id", 2),
        "eos_token_id": tid("eos_token_id", 1),
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    }
    from dgplug.config import GENERATION_DEFAULTS
    gen = dict(GENERATION_DEFAULTS)
    for k, g in GEN_KEYS.items():
        v = _field(reader, k)
        if v is not None:
            gen[g] = int(v) if isinstance(GENERATION_DEFAULTS[g], int) else _f32(v)
    gen["max_new_tokens"] = int(_field(reader, "diffusion.canvas_length", 256))
    # a GGUF has no generation config: its tokenizer's EOS / padding ids stand in (llama.cpp stops on them too)
    for g, key in (("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        if _field(reader, f"tokenizer.ggml.{key}") is not None:
            gen[g] = tid(key, None)
    # end of turn / end of message: llama.cpp stops on them too (dgplug writes generation_config's further EOS ids there)
    more = [tid(k, None) for k in ("eot_token_id", "eom_token_id") if _field(reader, f"tokenizer.ggml.{k}") is not None]
    if more and gen.get("eos_token_id") is not None:
        gen["eos_token_id"] = list(dict.fromkeys([gen["eos_token_id"], *more]))
    return {
        "model_type": "diffusion_gemma",
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": int(_field(reader, "diffusion.canvas_length", 256)),
        "tie_word_embeddings": True,
        "text_config": tc,
        "generation_config": gen,
        "mask_token_id": tid("mask_token_id", None) if _field(reader, "tokenizer.ggml.mask_token_id") is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
def _name_map(cfg_dict: dict) -> dict:
    from dgplug.config import from_dict
    tc = from_dict(cfg_dict, "GGUF metadata").text
    return {s.gguf: s for s in text_tensors(tc)}


def hf_config_files(reader) -> tuple[dict, dict]:
    """config.json and generation_config.json of the model a GGUF holds, as a Hugging Face checkpoint
    spells them (the entropy bound under sampler_config; dgplug's mask id only where the GGUF names one)."""
    raw = gguf_to_config(reader)
    gen = raw.pop("generation_config")
    if raw.get("mask_token_id") is None:
        raw.pop("mask_token_id", None)
    bound = gen.pop("entropy_bound", None)
    if bound is not None:
        gen["sampler_config"] = {"entropy_bound": bound, "_cls_name": "EntropyBoundSamplerConfig"}
    return raw, gen


def dequantize_tensor(t, dtype=None):
    """One ReaderTensor -> torch tensor in numpy (= HF) dim order."""
    import torch
    from gguf import quants

    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    qt = T(int(t.tensor_type))
    if qt == T.F32:
        out = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    elif qt == T.BF16:
        u16 = np.array(t.data).view(np.uint16).reshape(shape)
        out = torch.from_numpy(u16.view(np.int16)).view(torch.bfloat16)
    else:
        arr = quants.dequantize(np.asarray(t.data), qt)
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
    if dtype is not None:
        out = out.to(dtype)
    return out


def stored_tensors(path) -> dict:
    """GGUF name -> dgplug.checkpoint.StoredTensor (shard file, ggml type name, numpy shape, absolute
    offset, bytes) for every tensor of the (possibly split) GGUF at `path`, from each shard's checked
    header (validate_gguf: no gguf-py reader, whose objects for a 262k-token vocabulary take hundreds of MB)."""
    from dgplug.checkpoint import StoredTensor

    out = {}
    for p in shard_paths(path, validate_gguf(path)["metadata"]):
        v = validate_gguf(p, any_model=True)
        for name, dims, qt, off, nb in v["tensors"]:
            out[name] = StoredTensor(name, str(p), qt.name, tuple(reversed(dims)), v["data_offset"] + off, nb)
    return out


class GGUFTensors:
    """A GGUF's weights by Hugging Face name, read as safe_open's handle is read by the int4/int8/fp8
    converter (`get_tensor(name)`, `get_slice(name)[a:b]`): rows of the first dimension read from the
    file (positional reads) and dequantised by gguf-py. `stored`: hf name -> StoredTensor whose dtype
    is the safetensors name of what comes out (F32, F16 and BF16 as they are; a block type as BF16, the
    release's dtype, so its 1.5 GB embedding stays that size); `block_typed`: (GGUF name, type) of the
    tensors of a block type (already quantized)."""

    _OWN = ("F32", "F16", "BF16")

    def __init__(self, path, cfg_dict: dict):
        from dataclasses import replace

        specs = _name_map(cfg_dict)
        self.path, self.ggml, self.stored, self.block_typed = str(path), {}, {}, []
        for name, st in stored_tensors(path).items():
            if name == ROPE_FREQS_GGUF:
                continue
            s = specs.get(name)
            if s is None:
                raise FormatError(f"{self.path}: unknown tensor {name!r}")
            if st.shape != tuple(s.shape):
                raise FormatError(f"{st.file}: tensor {name!r} has shape {list(st.shape)}, expected {list(s.shape)}")
            if st.dtype not in self._OWN:
                self.block_typed.append((name, st.dtype))
            self.ggml[s.hf] = st
            self.stored[s.hf] = replace(st, name=s.hf, dtype=st.dtype if st.dtype in self._OWN else "BF16")

    def get_tensor(self, name: str):
        return self.get_slice(name)[:]

    def get_slice(self, name: str):
        import torch

        from dgplug.checkpoint import torch_dtype

        from .gguf_export import _read_rows

        st, dtype = self.ggml[name], torch_dtype(self.stored[name].dtype)
        per, cols = int(np.prod(st.shape[1:-1], dtype=np.int64)), st.shape[-1]

        class Rows:
            def __getitem__(self, sl: slice):
                a, b, _ = sl.indices(st.shape[0] if len(st.shape) > 1 else 1)
                raw = _read_rows(st, a * per, b * per, cols) if len(st.shape) > 1 else _read_rows(st, 0, 1, cols)
                shape = (b - a,) + st.shape[1:] if len(st.shape) > 1 else st.shape
                if st.dtype == "BF16":
                    return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
                if st.dtype in ("F32", "F16"):
                    return torch.from_numpy(raw).reshape(shape)
                from gguf import quants

                return torch.from_numpy(quants.dequantize(raw, T[st.dtype])).reshape(shape).to(dtype)

        return Rows()


def packed_tensor(t, dtype=None):
    """One ReaderTensor of a block type kept packed: a GGMLWeight viewing the file's memory map
    (numpy = HF dim order; rows of blocks), serving rows in `dtype` (default fp32)."""
    import torch

    from dgplug.kernels.ggml import GGMLWeight

    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    raw = np.asarray(t.data).reshape(-1)
    blocks = torch.from_numpy(raw.reshape(*shape[:-1], raw.size // int(np.prod(shape[:-1]))))
    return GGMLWeight(T(int(t.tensor_type)), blocks, shape, dtype or torch.float32)


def iter_hf_tensors(path, dtype=None, packed: bool = False) -> Iterator[tuple[str, "object"]]:
    """packed: weights of a block type dgplug runs packed (kernels.ggml.PACKED_TYPES, 2-D / 3-D)
    come as GGMLWeight views of the file instead of dequantised tensors."""
    from dgplug.kernels.ggml import PACKED_TYPES

    reader = path if isinstance(path, (GGUFFile, GGUFReader)) else open_gguf(path, "c" if packed else "r")
    path = getattr(reader.data, "filename", path)  # the file, for messages
    specs = _name_map(gguf_to_config(reader))
    for t in reader.tensors:
        if t.name == ROPE_FREQS_GGUF:
            continue
        s = specs.get(t.name)
        if s is None:
            raise FormatError(f"{path}: unknown tensor {t.name!r}")
        if packed and len(s.shape) >= 2 and T(int(t.tensor_type)) in PACKED_TYPES:
            out = packed_tensor(t, dtype)
        else:
            out = dequantize_tensor(t, dtype)
        if tuple(out.shape) != tuple(s.shape):
            raise FormatError(f"{path}: tensor {t.name!r} has shape {list(out.shape)}, expected {list(s.shape)}")
        yield s.hf, out


# ---------------------------------------------------------------------------------------------
# Contract check and inspection
# ---------------------------------------------------------------------------------------------
def check_contract(path) -> list[str]:
    return contract_report(path)[0]


def contract_report(path) -> tuple[list[str], list[str]]:
    """(problems against the contract, notes): a note is what llama.cpp loads all the same (a tensor
    mix other than llama-quantize's default for the file type, e.g. made with --tensor-type)."""
    problems: list[str] = []
    try:
        reader = open_gguf(path)
    except FormatError as e:
        return [str(e)], []
    problems += _metadata_problems(reader)
    present = {t.name: t for t in reader.tensors}
    try:
        cfg = gguf_to_config(reader)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return problems + [f"cannot derive the model config: {e}"], []
    tc = cfg["text_config"]
    values = _value_problems(reader, tc, present)
    problems += values
    try:
        specs = _name_map(cfg)
    except Exception as e:  # noqa: BLE001 - reported once: a value named above (experts used) is the cause
        if not (values and "top_k_experts" in str(e)):
            problems.append(f"cannot derive the model config: {e}")
        return problems, []
    notes = _mix_notes(reader, tc, present)
    shapes = []
    for name, s in specs.items():
        t = present.get(name)
        if t is None:
            problems.append(f"missing tensor {name}")
            continue
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        if shape != tuple(s.shape):
            shapes.append(f"tensor {name}: shape {list(shape)} (numpy order), expected {list(s.shape)}")
        if (len(s.shape) == 1 or ".ffn_gate_inp." in name) and T(int(t.tensor_type)) != T.F32:
            problems.append(f"tensor {name}: type {T(int(t.tensor_type)).name}, expected F32")
    if len(shapes) > 8:  # one wrong size in the metadata: every tensor it sizes disagrees
        shapes = shapes[:3] + [f"... and {len(shapes) - 3} more tensors whose shapes disagree with the metadata's "
                               f"sizes (embedding_length, feed_forward_length, head counts and lengths, expert_count)"]
    problems += shapes
    rf = present.get(ROPE_FREQS_GGUF)
    if rf is None:
        problems.append(f"missing tensor {ROPE_FREQS_GGUF}")
    elif int(rf.n_elements) != tc["global_head_dim"] // 2:
        problems.append(f"tensor {ROPE_FREQS_GGUF}: {int(rf.n_elements)} values, expected {tc['global_head_dim'] // 2}")
    for name in present:
        if name not in specs and name != ROPE_FREQS_GGUF:
            problems.append(f"unknown tensor {name}")
    tok = reader.get_field("tokenizer.ggml.tokens")
    if tok is not None and len(tok.data) != tc["vocab_size"]:
        problems.append(f"tokenizer has {len(tok.data)} tokens but token_embd has {tc['vocab_size']} rows")
    tokens, types = _field(reader, "tokenizer.ggml.tokens") or [], _field(reader, "tokenizer.ggml.token_type") or []
    for t, ty in zip(tokens, types):  # llama.cpp's chat parser reads these: they must be rendered
        if t in GEMMA4_VISIBLE_TOKENS and int(ty) != int(TokenType.USER_DEFINED):
            problems.append(f"token {t!r} has type {TokenType(int(ty)).name}, expected USER_DEFINED")
    return problems, notes


_VT_NAMES = {VT.UINT8: "u8", VT.INT8: "i8", VT.UINT16: "u16", VT.INT16: "i16", VT.UINT32: "u32", VT.INT32: "i32",
             VT.UINT64: "u64", VT.INT64: "i64", VT.FLOAT32: "f32", VT.FLOAT64: "f64", VT.BOOL: "bool",
             VT.STRING: "string"}


def _type_name(t: tuple) -> str:
    return f"{_VT_NAMES[t[1]]} array" if t[0] == VT.ARRAY else _VT_NAMES[t[0]]


def _metadata_problems(reader) -> list[str]:
    """Each key of METADATA: present where required, of a type llama.cpp reads, the contract's value."""
    problems = []
    for key, (types, required, fixed) in METADATA.items():
        f = reader.get_field(key)
        if f is None:
            if required:
                problems.append(f"missing metadata key {key}")
            continue
        got = (VT(f.types[0]), VT(f.types[-1]) if f.types[0] == VT.ARRAY else None)
        if got not in types:
            problems.append(f"metadata key {key} is {_type_name(got)}, expected {' or '.join(map(_type_name, types))}")
        elif fixed is not None and _field(reader, key) != fixed:
            problems.append(f"metadata key {key} is {_field(reader, key)!r}, expected {fixed!r}")
    return problems


def _value_problems(reader, tc: dict, present: dict) -> list[str]:
    """Values that must agree with each other or with the tensors: experts used <= experts, token
    ids inside the vocabulary, embedding_length = token_embd's width."""
    a, problems = ARCH, []
    if not 1 <= tc["top_k_experts"] <= tc["num_experts"]:
        problems.append(f"metadata key {a}.expert_used_count is {tc['top_k_experts']}: a model of "
                        f"{tc['num_experts']} experts ({a}.expert_count) uses 1 to {tc['num_experts']}")
    n_tokens = len(reader.get_field("tokenizer.ggml.tokens").data) if reader.get_field("tokenizer.ggml.tokens") else None
    for key in (k for k in METADATA if k.endswith("_token_id")):
        v = _field(reader, key)
        if n_tokens is not None and isinstance(v, int) and not 0 <= v < n_tokens:
            problems.append(f"metadata key {key} is {v}, outside the vocabulary of {n_tokens} tokens")
    embd = present.get("token_embd.weight")
    if embd is not None and int(embd.shape[0]) != tc["hidden_size"]:
        problems.append(f"metadata key {a}.embedding_length is {tc['hidden_size']}, but token_embd.weight rows are "
                        f"{int(embd.shape[0])} wide")
    return problems


def _mix_notes(reader, tc: dict, present: dict) -> list[str]:
    """general.file_type against the experts' type in llama-quantize's default mix for it."""
    notes = []
    ft, gate_up = _field(reader, "general.file_type"), present.get("blk.0.ffn_gate_up_exps.weight")
    if isinstance(ft, int) and gate_up is not None:
        from .gguf_export import RECIPES, tensor_type

        quant = next((q for q, r in RECIPES.items() if int(r["ftype"]) == ft), None)
        shape = tuple(int(d) for d in reversed([int(x) for x in gate_up.shape]))
        if quant is not None:
            want = tensor_type(quant, gate_up.name, shape, n_layers=tc["num_hidden_layers"],
                               n_experts=tc["num_experts"], layer=0)
            got = T(int(gate_up.tensor_type))
            if got != want:
                notes.append(f"general.file_type is {ft} ({quant}), but {gate_up.name} is {got.name} "
                                f"(llama-quantize's {quant} mix stores it as {want.name})")
    return notes


def _summarise(v):
    if isinstance(v, list) and len(v) > 16:
        head = ", ".join(repr(x) for x in v[:4])
        return f"[{head}, ... ({len(v)} items)]"
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + f"... ({len(v)} chars)"
    return v


def inspect_table(path) -> dict:
    """Metadata and tensor table of any GGUF (another architecture, an imatrix): check_contract says
    whether it is a DiffusionGemma model."""
    reader = open_gguf(path, any_model=True)
    meta = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = f.contents()
            if f.types == [VT.FLOAT32]:  # 1e-06 as written, not 9.999999974752427e-07
                v = float(str(np.float32(v)))
            meta[k] = _summarise(v)
        except Exception:  # noqa: BLE001
            meta[k] = "<unreadable>"
    rows = [(t.name, T(int(t.tensor_type)).name, [int(d) for d in t.shape], int(t.n_bytes)) for t in reader.tensors]
    return {"metadata": meta, "tensors": rows}


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def tokenizer_from_gguf(path):
    """A PreTrainedTokenizerFast rebuilt from tokenizer.ggml.* (BPE if merges, else WordLevel; either
    decodes by joining the pieces, as llama.cpp does; a text starts with BOS where add_bos_token says so)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = _field(reader, "tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}

    def tok(key):
        v = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(v)] if v is not None and 0 <= int(v) < len(tokens) else None

    unk = tok("unknown_token_id")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        model = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, byte_fallback=True, fuse_unk=True)
        tk = Tokenizer(model)
        try:
            from tokenizers import normalizers
            tk.normalizer = normalizers.Replace(" ", "▁")
        except Exception:  # noqa: BLE001
            pass
    else:
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk or tokens[0]))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # decoding as llama.cpp renders a gemma4 vocabulary, merges or not: the pieces joined, "▁" as a space,
    # <0xNN> tokens as bytes; unless dgplug wrote that the source tokenizer had no decoder (a WordLevel
    # vocabulary that decodes with a space between tokens, as the tokenizers library does without one)
    if merges or not _field(reader, TOKENS_SPACED):
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # CONTROL tokens are special; USER_DEFINED ones are added tokens that stay whole and are rendered
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if int(ty) == 3]
    if specials:
        tk.add_special_tokens(specials)
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if int(ty) == 4]
    if user:
        tk.add_tokens(user)
    bos = tok("bos_token_id")
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token"):  # as llama.cpp tokenizes a prompt
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, int(_field(reader, "tokenizer.ggml.bos_token_id")))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=tok("eos_token_id"), unk_token=unk,
        pad_token=tok("padding_token_id"), mask_token=tok("mask_token_id"),
    )
    tmpl = _field(reader, "tokenizer.chat_template")
    if tmpl:
        fast.chat_template = tmpl
    return fast
