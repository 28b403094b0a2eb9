"""Streaming export of a Hugging Face DiffusionGemma checkpoint to GGUF (the layout of
../shared/spec/gguf.md, i.e. what llama.cpp's diffusion-gemma branch reads).

Entry point (what `dgplug convert SRC OUT.gguf --quant X` calls):

    export_gguf(src_dir, out_path, quant="Q4_K_M", progress=True, workers=None, imatrix=None) -> Path

* `quant` is one of FILE_TYPES: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q5_K_M, Q5_K_S,
  Q4_K_M, Q4_K_S, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K, Q2_K_S, IQ4_XS, IQ4_NL, or one of llama-quantize's
  aliases (ALIASES: Q5_K = Q5_K_M, Q4_K = Q4_K_M, Q3_K = Q3_K_M), in any case. The tensor types of each
  file type come from ONE table, `RECIPES`, applied by `tensor_type()` (llama.cpp's
  `llama_tensor_get_type` rules for this architecture, including its `use_more_bits` layer rule and
  its fallbacks for rows that are not a multiple of 256: Q2_K and Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K
  -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, the tied token embedding -> Q8_0; 32-block types whose
  rows are not a multiple of 32 -> F16). Q2_K_S is refused without an imatrix, as llama-quantize
  refuses it (and Q2_K, Q3_K_S, Q3_K_M, IQ4_XS are not: llama.cpp makes them without one, with its
  reference quantizers; its IQ4_XS and IQ4_NL mixes then give the first eighth of the ffn_down
  layers Q5_K, with an imatrix their base type).
* The source may also be a DiffusionGemma GGUF (llama-quantize's requantization; gguf_requant.py).
* Streaming: tensors are read row range by row range straight from the safetensors shards
  (plain positional reads, no mmap, no torch), in the canonical order of `dgplug.names`, and
  written sequentially. The header, metadata and tensor table are written first (shapes and
  types are known up front), then the data. Peak memory is a few row chunks (~8 MB of fp32
  each) per process, whatever the model size.
* Quantised types use a pool of `workers` processes (default: min(2, cpu count)) over row
  chunks; results are written in submission order, so the output is byte-for-byte
  deterministic and independent of the worker count.
* `imatrix` (a llama.cpp imatrix GGUF, or converters.imatrix.Imatrix), for every quantized file type
  but Q8_0 (IMATRIX_FILE_TYPES): every Q2_K..Q6_K, IQ4_XS, IQ4_NL, Q4_0, Q4_1, Q5_0 and Q5_1 tensor
  (the last four also as the fallbacks of Q2_K/Q3_K, Q4_K and Q5_K for rows that are not a multiple of
  256, e.g. the 704- and 2112-wide down projections) is encoded as llama-quantize does with that
  imatrix (its entry by GGUF name; experts: one row per expert), byte for byte (see
  dgplug/converters/kquants.py); Q8_0 tensors encode as without (llama.cpp's Q8_0 has no imatrix
  path). With an imatrix the Q4_0 and Q5_0 mixes give the first eighth of the ffn_down layers Q4_1 /
  Q5_1, as llama-quantize does.
  The file records it as llama-quantize does: quantize.imatrix.file / .dataset (the first) /
  .entries_count / .chunks_count.
* Output goes to a hidden temporary file beside OUT, renamed on success; any error or Ctrl-C
  removes it (no OUT left behind).
* Metadata as llama.cpp's converter writes it: general.* from gguf-py's Metadata heuristics over
  the model directory (name, basename, finetune, size label, license, ...); token types by the
  rule of gguf-py's LlamaHfVocab (what the converter's Gemma 4 vocabulary uses) with Gemma 4's
  channel/tool tokens USER_DEFINED.
* Tokenizer: tokenizer.json (+ tokenizer_config.json, chat_template.jinja) -> tokenizer.ggml.*
  with model "gemma4". Mask token: the tokenizer's mask_token if it declares one, else a token
  spelled "<mask>" if the vocabulary has one, else the pad id (documented fallback: the
  released model is uniform-state diffusion and never feeds a mask token; llama.cpp's
  diffusion CLI only insists that the key exists).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, LlamaFileType, TokenType
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from dgplug import hub
from dgplug.checkpoint import StoredTensor, read_index
from dgplug.config import Config, load_config, load_generation_defaults, refuse_quantized
from dgplug.errors import CheckpointError, FormatError, InputError
from dgplug.names import GEMMA4_VISIBLE_TOKENS, ROPE_FREQS_GGUF, TOKENS_SPACED, is_vision, text_tensors

from . import kquants
from .output import publish_file
from .progress import conversion_progress

ARCH = "diffusion-gemma"
QK_K = 256
CHUNK_ELEMS = 1 << 21  # elements per job (8 MB of fp32)

# ---------------------------------------------------------------------------------------------
# The recipe table: one row per file type (llama.cpp's llama_tensor_get_type, for this
# architecture: not Falcon, tied embeddings, no fused QKV, n_gqa = heads / kv heads of layer 0).
#   ftype     general.file_type
#   base      llama.cpp's default type of the file type: every quantisable 2-D/3-D weight
#             unless a rule below says otherwise
#   embd      tied token embedding (llama.cpp quantises it as the output head): Q6_K unless the
#             base is Q8_0 or not a block type
#   v         attn_v: a rule (i = index among the attn_v tensors, n = their count)
#   v_gqa4    attn_v when n_gqa >= 4 (instead of `v`)
#   down      ffn_down and ffn_down_exps: a rule (i = layer, n = layers; IQ4_XS's and IQ4_NL's depend
#             on whether an imatrix is given)
#   out       attn_output unless the model has exactly 8 experts (llama.cpp: n_expert == 8)
#   out8      attn_output when the model has exactly 8 experts
#   kv8       attn_k and attn_v when the model has exactly 8 experts (over every rule above)
#   imatrix   llama-quantize refuses the file type without an importance matrix (and a missing
#             entry for one of its `base` tensors)
# A rule is None (the base type), a type, or (type, WHEN, other type or None = the base), WHEN one
# of "more_bits" (use_more_bits(i, n)), "i<2", "i<4", "i<n/8", "i<n/16", "i<n/8 without imatrix",
# "i<n/8 with imatrix".
# "Quantisable" = llama.cpp's rule: >= 2 dims, name ends in "weight", not a norm, not
# ffn_gate_inp (the router). Everything else (1-D tensors, the router) is F32.
# Rules llama.cpp has that never apply here: Falcon's; LLM_TYPE_70B's attn_v. Q5_K_S
# has no rule of its own (all Q5_K but the embedding and the 8-expert attn_k/attn_v); Q3_K_L's
# attn_output stays Q3_K with 8 experts (llama.cpp's n_expert == 8 list leaves it out).
# ---------------------------------------------------------------------------------------------
_NO = dict(embd=None, v=None, v_gqa4=None, down=None, out=None, out8=None, kv8=None, imatrix=False)
_MORE6 = (T.Q6_K, "more_bits", None)
_LEGACY = dict(_NO, embd=T.Q6_K, kv8=T.Q8_0)  # Q4_0 .. Q5_1: the embedding and the 8-expert K/V only
RECIPES: dict[str, dict] = {
    "F32":    dict(_NO, ftype=LlamaFileType.ALL_F32,       base=T.F32),
    "F16":    dict(_NO, ftype=LlamaFileType.MOSTLY_F16,    base=T.F16),
    "BF16":   dict(_NO, ftype=LlamaFileType.MOSTLY_BF16,   base=T.BF16),
    "Q8_0":   dict(_NO, ftype=LlamaFileType.MOSTLY_Q8_0,   base=T.Q8_0, kv8=T.Q8_0),
    "Q4_0":   dict(_LEGACY, ftype=LlamaFileType.MOSTLY_Q4_0, base=T.Q4_0, down=(T.Q4_1, "i<n/8 with imatrix", None)),
    "Q4_1":   dict(_LEGACY, ftype=LlamaFileType.MOSTLY_Q4_1, base=T.Q4_1),
    "Q5_0":   dict(_LEGACY, ftype=LlamaFileType.MOSTLY_Q5_0, base=T.Q5_0, down=(T.Q5_1, "i<n/8 with imatrix", None)),
    "Q5_1":   dict(_LEGACY, ftype=LlamaFileType.MOSTLY_Q5_1, base=T.Q5_1),
    "Q6_K":   dict(_NO, ftype=LlamaFileType.MOSTLY_Q6_K,   base=T.Q6_K, embd=T.Q6_K, kv8=T.Q8_0),
    "Q5_K_M": dict(_NO, ftype=LlamaFileType.MOSTLY_Q5_K_M, base=T.Q5_K, embd=T.Q6_K, kv8=T.Q8_0, v=_MORE6, down=_MORE6),
    "Q5_K_S": dict(_NO, ftype=LlamaFileType.MOSTLY_Q5_K_S, base=T.Q5_K, embd=T.Q6_K, kv8=T.Q8_0),
    "Q4_K_M": dict(_NO, ftype=LlamaFileType.MOSTLY_Q4_K_M, base=T.Q4_K, embd=T.Q6_K, kv8=T.Q8_0, v=_MORE6, down=_MORE6,
                   out8=T.Q5_K),
    "Q4_K_S": dict(_NO, ftype=LlamaFileType.MOSTLY_Q4_K_S, base=T.Q4_K, embd=T.Q6_K, kv8=T.Q8_0,
                   v=(T.Q5_K, "i<4", None), down=(T.Q5_K, "i<n/8", None), out8=T.Q5_K),
    "Q3_K_L": dict(_NO, ftype=LlamaFileType.MOSTLY_Q3_K_L, base=T.Q3_K, embd=T.Q6_K, kv8=T.Q8_0,
                   v=T.Q5_K, down=T.Q5_K, out=T.Q5_K),
    "Q3_K_M": dict(_NO, ftype=LlamaFileType.MOSTLY_Q3_K_M, base=T.Q3_K, embd=T.Q6_K, kv8=T.Q8_0,
                   v=(T.Q5_K, "i<2", T.Q4_K), down=(T.Q5_K, "i<n/16", T.Q4_K), out=T.Q4_K, out8=T.Q5_K),
    "Q3_K_S": dict(_NO, ftype=LlamaFileType.MOSTLY_Q3_K_S, base=T.Q3_K, embd=T.Q6_K, kv8=T.Q8_0, out8=T.Q5_K),
    "Q2_K":   dict(_NO, ftype=LlamaFileType.MOSTLY_Q2_K,   base=T.Q2_K, embd=T.Q6_K, kv8=T.Q8_0, v=T.Q3_K,
                   v_gqa4=T.Q4_K, down=T.Q3_K, out=T.Q3_K, out8=T.Q5_K),
    "Q2_K_S": dict(_NO, ftype=LlamaFileType.MOSTLY_Q2_K_S, base=T.Q2_K, embd=T.Q6_K, kv8=T.Q8_0, v_gqa4=T.Q4_K,
                   down=(T.Q4_K, "i<n/8", None), imatrix=True),
    "IQ4_XS": dict(_NO, ftype=LlamaFileType.MOSTLY_IQ4_XS, base=T.IQ4_XS, embd=T.Q6_K, kv8=T.Q8_0, v_gqa4=T.Q5_K,
                   down=(T.Q5_K, "i<n/8 without imatrix", None), out8=T.Q5_K),
    "IQ4_NL": dict(_NO, ftype=LlamaFileType.MOSTLY_IQ4_NL, base=T.IQ4_NL, embd=T.Q6_K, kv8=T.Q8_0, v_gqa4=T.Q5_K,
                   down=(T.Q5_K, "i<n/8 without imatrix", None), out8=T.Q5_K),
}
FILE_TYPES = tuple(RECIPES)
# llama-quantize's other names (tools/quantize/quantize.cpp, QUANT_OPTIONS): the same file type
ALIASES = {"Q5_K": "Q5_K_M", "Q4_K": "Q4_K_M", "Q3_K": "Q3_K_M"}
# the file types an imatrix changes (every quantized one but Q8_0: ggml's Q8_0 has no importance path)
IMATRIX_FILE_TYPES = ("Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
                      "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# llama.cpp's tensor_type_fallback for rows that are not a multiple of the block size (its 32-block
# types have none, llama-quantize stops; dgplug writes F16, as for a fallback that does not fit)
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL,
            T.Q4_0: T.F16, T.Q4_1: T.F16, T.Q8_0: T.F16, T.Q5_0: T.F16, T.Q5_1: T.F16, T.IQ4_NL: T.F16}


def file_type(quant: str) -> str:
    """The file type `quant` names (any case; an alias gives its target), as a key of RECIPES;
    an unknown name comes back upper-cased (the callers refuse it)."""
    q = quant.strip().upper()
    return ALIASES.get(q, q)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer rule for the '_M' mixes (first/last eighth and every third layer)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


_WHEN = {"more_bits": lambda i, n, im: use_more_bits(i, n), "i<2": lambda i, n, im: i < 2,
         "i<4": lambda i, n, im: i < 4, "i<n/8": lambda i, n, im: i < n // 8, "i<n/16": lambda i, n, im: i < n // 16,
         "i<n/8 without imatrix": lambda i, n, im: i < n // 8 and not im,
         "i<n/8 with imatrix": lambda i, n, im: i < n // 8 and im}


def _apply(rule, base: T, i: int | None, n: int, imatrix: bool = False) -> T:
    """A recipe rule (see the table) for tensor i of n (imatrix: whether one is given)."""
    if rule is None or isinstance(rule, T):
        return rule or base
    then, when, other = rule
    return then if i is not None and _WHEN[when](i, n, imatrix) else (other or base)


def quantisable(gguf_name: str, ndim: int) -> bool:
    return (ndim >= 2 and gguf_name.endswith("weight") and "_norm.weight" not in gguf_name
            and "ffn_gate_inp.weight" not in gguf_name)


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's per-tensor options, as its current `llama_tensor_get_type` applies them:
    `tensor_types` (--tensor-type PATTERN=TYPE: the first pattern found in a tensor's GGUF name gives
    its type, the mix's rules skipped), `pure` (--pure: no mix rules, the file type's base type),
    `token_embedding` (--token-embedding-type: token_embd.weight as given, no fallback) and `output`
    (--output-tensor-type: this model ties its head to token_embd, so the type of token_embd through
    the mix's output rule). Fallbacks for rows the type cannot hold apply to all but `token_embedding`."""
    tensor_types: tuple[tuple[str, T], ...] = ()
    pure: bool = False
    token_embedding: T | None = None
    output: T | None = None


WRITABLE = kquants.GGUF_TYPES + kquants.ENCODED_TYPES  # the ggml types dgplug encodes


def ggml_type(text: str, what: str) -> T:
    """A ggml type by name, any case (llama-quantize's parse_ggml_type), among those dgplug writes."""
    t = next((t for t in WRITABLE if t.name.lower() == text.strip().lower()), None)
    if t is None:
        raise InputError(f"{what}: {text.strip()!r} is not a ggml type dgplug writes "
                         f"({', '.join(t.name for t in WRITABLE)})")
    return t


def parse_overrides(tensor_type=(), pure: bool = False, token_embedding_type: str | None = None,
                    output_tensor_type: str | None = None) -> Overrides:
    """The options as llama-quantize spells them (`--tensor-type attn_v=q8_0`, repeatable) -> Overrides;
    a bad item is one InputError naming it."""
    pairs = []
    for item in tensor_type:
        pattern, eq, name = item.partition("=")
        if not eq or not pattern.strip():
            raise InputError(f"--tensor-type {item!r}: give PATTERN=TYPE, e.g. ffn_down_exps=q6_k")
        try:
            re.compile(pattern.strip())
        except re.error as e:
            raise InputError(f"--tensor-type {item!r}: bad pattern ({e})") from None
        pairs.append((pattern.strip(), ggml_type(name, f"--tensor-type {item!r}")))
    tok = ggml_type(token_embedding_type, "--token-embedding-type") if token_embedding_type else None
    out = ggml_type(output_tensor_type, "--output-tensor-type") if output_tensor_type else None
    return Overrides(tuple(pairs), pure, tok, out)


def tensor_type(quant: str, gguf_name: str, shape: tuple[int, ...], *, n_layers: int, n_experts: int,
                layer: int | None = None, attn_v_index: int = 0, n_attn_v: int = 0, n_gqa: int = 1,
                imatrix: bool = False, overrides: Overrides | None = None) -> T:
    """The ggml type of one tensor in a file of type `quant` (numpy `shape`, row = last dim); `imatrix`:
    whether the file is made with one (llama.cpp's qs.has_imatrix); `overrides`: llama-quantize's options."""
    r = RECIPES[file_type(quant)]
    ov = overrides or Overrides()
    if not quantisable(gguf_name, len(shape)):
        return T.F32
    ncols = shape[-1]
    if gguf_name == "token_embd.weight" and ov.token_embedding is not None:
        if ncols % GGML_QUANT_SIZES[ov.token_embedding][0]:
            raise InputError(f"--token-embedding-type {ov.token_embedding.name}: {gguf_name} has rows of {ncols}, "
                             f"not a multiple of {GGML_QUANT_SIZES[ov.token_embedding][0]}")
        return ov.token_embedding
    base = r["base"]
    if base in (T.F32, T.F16, T.BF16):
        return base
    t = next((t for pattern, t in ov.tensor_types if re.search(pattern, gguf_name)), None)
    if t is None and ov.pure:
        t = base
    elif t is None:
        t = base
        if gguf_name == "token_embd.weight":  # llama.cpp's output rule (the head is tied to it)
            t = ov.output or (T.Q8_0 if ncols % GGML_QUANT_SIZES[base][0] else r["embd"] or base)
        elif ".attn_v." in gguf_name:
            t = r["v_gqa4"] if n_gqa >= 4 and r["v_gqa4"] else _apply(r["v"], base, attn_v_index, n_attn_v)
            if n_experts == 8 and r["kv8"]:
                t = r["kv8"]
        elif ".attn_k." in gguf_name:
            if n_experts == 8 and r["kv8"]:
                t = r["kv8"]
        elif ".attn_output." in gguf_name:
            t = (r["out8"] if n_experts == 8 else r["out"]) or base
        elif ".ffn_down" in gguf_name:
            t = _apply(r["down"], base, layer, n_layers, imatrix)
    while ncols % GGML_QUANT_SIZES[t][0]:
        t = FALLBACK[t]
    return t


# ---------------------------------------------------------------------------------------------
# Reading rows of the source tensors (dgplug.checkpoint.read_index finds them) without torch or mmap
# ---------------------------------------------------------------------------------------------
_ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2), "F64": (np.float64, 8)}


def _read_rows(st: StoredTensor, r0: int, r1: int, cols: int, fd_cache: dict | None = None) -> np.ndarray:
    """Rows [r0, r1) of the tensor viewed as (rows, cols), in the file's dtype (bf16 as uint16); a GGUF
    source's block type (st.dtype a ggml type name, gguf_requant): the rows' blocks as uint8."""
    if st.dtype in _ST_DTYPES:
        npdt, isz = _ST_DTYPES[st.dtype]
        row = cols * isz
    else:
        bs, ts = GGML_QUANT_SIZES[T[st.dtype]]
        npdt, row = np.uint8, cols // bs * ts
    nbytes = (r1 - r0) * row
    buf = np.empty(nbytes, np.uint8)
    if fd_cache is not None and st.file in fd_cache:
        fd = fd_cache[st.file]
    else:
        fd = os.open(st.file, os.O_RDONLY)
        if fd_cache is not None:
            fd_cache[st.file] = fd
    try:
        mv = memoryview(buf)
        pos, off = 0, st.offset + r0 * row
        while pos < nbytes:
            k = os.preadv(fd, [mv[pos:]], off + pos)
            if k <= 0:
                raise CheckpointError(f"{st.file}: short read in tensor {st.name}")
            pos += k
    finally:
        if fd_cache is None:
            os.close(fd)
    return buf.view(npdt).reshape(r1 - r0, -1)


def _to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Jobs (run in-process or in the worker pool)
# ---------------------------------------------------------------------------------------------
_FDS: dict = {}


def _encode(st: StoredTensor | None, data: np.ndarray | None, r0: int, r1: int, cols: int, qtype: int,
            gname: str, imp: tuple | None = None) -> np.ndarray:
    """Encode rows [r0, r1) of a tensor (from the file, or from `data`) as ggml type qtype.

    imp: (rows per matrix, index of the matrix row r0 is in, the importance rows of the matrices
    rows r0..r1-1 are in): each matrix's rows are encoded with its own row (experts)."""
    qtype = T(qtype)
    if data is not None:
        raw, dt, shape = data.reshape(-1, cols)[r0:r1], "F32", data.shape
    else:
        raw, dt, shape = _read_rows(st, r0, r1, cols, _FDS), st.dtype, st.shape
    if dt not in _ST_DTYPES:  # a GGUF source's blocks: kept when the type stays, else decoded (gguf-py)
        if T[dt] == qtype:
            return raw.reshape(-1)
        raw, dt = gguf_quants.dequantize(raw, T[dt]).reshape(r1 - r0, cols), "F32"
    x = _to_f32(raw, dt) if dt == "BF16" else raw  # F32 and F16 are checked as they are (no copy)
    kquants.check_finite(x, gname, at=r0 * cols, shape=tuple(shape))  # the index in the whole tensor
    if (qtype, dt) in ((T.BF16, "BF16"), (T.F16, "F16")):
        return np.ascontiguousarray(raw).view(np.uint8).reshape(-1)  # bit copy
    x = _to_f32(x, "F32")
    if imp is None:
        out = kquants.quantize(x, qtype, name=gname)
    else:
        per, m0, rows = imp
        out = np.concatenate([kquants.quantize(x[max(r0, m * per) - r0:min(r1, (m + 1) * per) - r0], qtype, gname,
                                               importance=rows[m - m0]) for m in range(m0, m0 + len(rows))])
    return np.ascontiguousarray(out).view(np.uint8).reshape(-1)


def _write(fout, data: np.ndarray) -> None:
    """Through the file object (not ndarray.tofile): a full disk raises OSError(ENOSPC), not a byte count."""
    fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))


def _job(args):
    return _encode(*args)


def _worker_init():
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = "1"


# ---------------------------------------------------------------------------------------------
# Metadata and tokenizer
# ---------------------------------------------------------------------------------------------
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _tok_content(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


def _hf_specials(src: Path) -> tuple[set[int], set[str], int]:
    """transformers' all_special_ids / all_special_tokens and the size of the tokenizer model's own
    vocabulary (without added tokens): what llama.cpp's converter keys token types on."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - reported with the directory
        raise CheckpointError(f"{src}: transformers cannot load the tokenizer ({type(e).__name__}: {e})") from None
    return set(tok.all_special_ids), {str(t) for t in tok.all_special_tokens}, int(tok.vocab_size)


def read_tokenizer(src: Path, vocab_size: int, cfg_raw: dict) -> dict:
    """tokenizer.json (+ tokenizer_config.json, chat template) -> the tokenizer.ggml.* values."""
    tj = src / "tokenizer.json"
    if not tj.exists():
        raise CheckpointError(f"{src}: no tokenizer.json (needed for the GGUF vocabulary)")
    try:
        tok = json.loads(tj.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{tj}: invalid JSON ({e})") from None
    tcfg = {}
    if (src / "tokenizer_config.json").exists():
        tcfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    mtype = model.get("type")
    vocab: dict[str, int] = {}
    scores_by_id: dict[int, float] = {}
    if mtype in ("BPE", "WordLevel", "WordPiece"):
        vocab = dict(model.get("vocab") or {})
    elif mtype == "Unigram":
        for i, (piece, score) in enumerate(model.get("vocab") or []):
            vocab[piece] = i
            scores_by_id[i] = float(score)
    else:
        raise CheckpointError(f"{tj}: unsupported tokenizer model {mtype!r}")
    added = {}
    for a in tok.get("added_tokens") or []:
        added[int(a["id"])] = a
        vocab.setdefault(a["content"], int(a["id"]))
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise CheckpointError(f"{tj}: token ids go up to {n - 1} but the model's vocab_size is {vocab_size}")
    id2tok: list[str | None] = [None] * n
    for t, i in vocab.items():
        if id2tok[i] is None or i in added:
            id2tok[i] = t
    for i, a in added.items():
        id2tok[i] = a["content"]
    # the named special tokens (their ids are written below)
    named = {}
    for key in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        c = _tok_content(tcfg.get(f"{key}_token"))
        if c is not None and c in vocab:
            named[key] = vocab[c]
    special_ids, special_tokens, n_model = _hf_specials(src)
    tokens, scores, types = [], [], []
    # token types as llama.cpp's converter sets them for Gemma 4 (gguf-py's LlamaHfVocab, then
    # Gemma4Model.set_vocab): tokens of the tokenizer model's own vocabulary are BYTE, CONTROL
    # (transformers' all_special_ids) or NORMAL; added tokens past it are CONTROL when transformers
    # counts them special, else USER_DEFINED ("special": true in tokenizer.json alone does not
    # count); the Gemma 4 tokens the chat parser must see are always USER_DEFINED.
    for i, t in enumerate(id2tok):
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(t)
        scores.append(scores_by_id.get(i, -1000.0))
        if t in GEMMA4_VISIBLE_TOKENS:
            types.append(int(TokenType.USER_DEFINED))
        elif i >= n_model:
            types.append(int(TokenType.CONTROL if t in special_tokens else TokenType.USER_DEFINED))
        elif _BYTE_TOKEN.fullmatch(t):
            types.append(int(TokenType.BYTE))
        elif i in special_ids:
            types.append(int(TokenType.CONTROL))
        else:
            types.append(int(TokenType.NORMAL))
    merges = []
    if mtype == "BPE":
        for m in model.get("merges") or []:
            merges.append(m if isinstance(m, str) else " ".join(m))
    # ids: tokenizer_config first, then config.json
    tc = cfg_raw.get("text_config") or {}

    def cfg_id(key):
        v = cfg_raw.get(f"{key}_token_id", tc.get(f"{key}_token_id"))
        if isinstance(v, list):
            v = v[0] if v else None
        return v

    ids = {}
    for key in ("bos", "eos", "unk", "pad", "sep", "cls"):
        v = named.get(key, cfg_id(key))
        if v is not None:
            ids[key] = int(v)
    if "mask" in named:
        ids["mask"] = named["mask"]
    elif "<mask>" in vocab:
        ids["mask"] = vocab["<mask>"]
    else:
        ids["mask"] = ids.get("pad", 0)
    template = tcfg.get("chat_template")
    if (src / "chat_template.jinja").exists():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    elif (src / "chat_template.json").exists():
        template = json.loads((src / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        d = {t.get("name"): t.get("template") for t in template}
        template = d.get("default") or next(iter(d.values()), None)
    # a vocabulary without merges and without a decoder decodes with a space between tokens (the
    # tokenizers library's default); llama.cpp joins pieces: say so for dgplug's reader
    spaced = mtype in ("WordLevel", "WordPiece") and not tok.get("decoder")
    return dict(tokens=tokens, scores=scores, types=types, merges=merges, ids=ids, chat_template=template,
                spaced=spaced, add_bos=_adds_bos(tok, tcfg))


def _adds_bos(tok: dict, tcfg: dict) -> bool:
    """Whether the source tokenizer starts a text with BOS: tokenizer_config's add_bos_token when it
    says, else whether tokenizer.json's template holds the BOS token; true (Gemma's, and the GGUF
    contract's value) when neither tells."""
    if isinstance(tcfg.get("add_bos_token"), bool):
        return tcfg["add_bos_token"]
    post = tok.get("post_processor") or {}
    bos = _tok_content(tcfg.get("bos_token"))
    if post.get("type") == "TemplateProcessing" and bos is not None:
        return any((piece.get("SpecialToken") or {}).get("id") == bos for piece in post.get("single") or [])
    return True


def _add_general(w: GGUFWriter, src: Path, name: str | None, repo: str | None = None) -> None:
    """general.* as llama.cpp's converter writes them: gguf-py's Metadata heuristics over the model
    directory (name, basename, finetune, size label from the directory/repo name; license, tags,
    base models from the README model card; sampling defaults from generation_config.json), then
    the size label from the parameter count of the tensors already declared in `w`."""
    import gguf

    total, shared, expert, n_expert = w.get_total_parameter_count()
    try:
        if repo is None:
            meta = gguf.Metadata.load(None, src, name, total)
        else:  # a hub snapshot's directory is a commit hash: the heuristics read the repository's name
            with tempfile.TemporaryDirectory() as d:
                view = Path(d) / repo.rstrip("/").split("/")[-1]
                view.mkdir()
                for f in ("README.md", "config.json", "generation_config.json"):
                    if (src / f).is_file():
                        (view / f).symlink_to((src / f).resolve())
                meta = gguf.Metadata.load(None, view, name, total)
    except Exception as e:  # noqa: BLE001 - a malformed model card or config, named
        raise CheckpointError(f"{src}: cannot read the model metadata (README.md model card, config.json): "
                              f"{type(e).__name__}: {e}") from None
    if meta.name is None:
        meta.name = src.resolve().name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)


def _add_metadata(w: GGUFWriter, src: Path, cfg: Config, gen: dict, tokv: dict, quant: str,
                  name: str | None, repo: str | None = None, imatrix: tuple | None = None) -> None:
    """Every key-value of the file; the tensors must be declared in `w` first (size label)."""
    tc = cfg.text
    a = ARCH
    w.add_type("model")
    _add_general(w, src, name, repo)
    w.add_uint32(f"{a}.block_count", tc.num_hidden_layers)
    w.add_uint32(f"{a}.context_length", tc.max_position_embeddings)
    w.add_uint32(f"{a}.embedding_length", tc.hidden_size)
    w.add_uint32(f"{a}.feed_forward_length", tc.intermediate_size)
    w.add_uint32(f"{a}.expert_feed_forward_length", tc.moe_intermediate_size)
    w.add_uint32(f"{a}.expert_count", tc.num_experts)
    w.add_uint32(f"{a}.expert_used_count", tc.top_k_experts)
    w.add_uint32(f"{a}.attention.head_count", tc.num_attention_heads)
    w.add_array(f"{a}.attention.head_count_kv", [int(tc.layer_dims(i)[1]) for i in range(tc.num_hidden_layers)])
    w.add_uint32(f"{a}.attention.key_length", tc.global_head_dim)
    w.add_uint32(f"{a}.attention.value_length", tc.global_head_dim)
    w.add_uint32(f"{a}.attention.key_length_swa", tc.head_dim)
    w.add_uint32(f"{a}.attention.value_length_swa", tc.head_dim)
    w.add_uint32(f"{a}.attention.sliding_window", tc.sliding_window)
    w.add_array(f"{a}.attention.sliding_window_pattern", [t == "sliding_attention" for t in tc.layer_types])
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", tc.rms_norm_eps)
    w.add_bool(f"{a}.attention.causal", False)
    w.add_uint32(f"{a}.attention.shared_kv_layers", 0)
    w.add_uint32(f"{a}.embedding_length_per_layer_input", 0)
    w.add_float32(f"{a}.rope.freq_base", tc.rope_theta_full)
    w.add_float32(f"{a}.rope.freq_base_swa", tc.rope_theta_sliding)
    w.add_uint32(f"{a}.rope.dimension_count", tc.global_head_dim)
    w.add_uint32(f"{a}.rope.dimension_count_swa", tc.head_dim)
    w.add_float32(f"{a}.final_logit_softcapping", tc.final_logit_softcapping)
    w.add_uint32("general.file_type", int(RECIPES[quant]["ftype"]))
    w.add_uint32("general.quantization_version", 2)
    add_imatrix_keys(w, imatrix)
    # the diffusion CLI's keys (no arch prefix); nulls were already replaced by released defaults
    w.add_uint32("diffusion.canvas_length", cfg.canvas_length)
    w.add_uint32("diffusion.eb_max_steps", int(gen["max_denoising_steps"]))
    w.add_float32("diffusion.eb_t_min", float(gen["t_min"]))
    w.add_float32("diffusion.eb_t_max", float(gen["t_max"]))
    w.add_float32("diffusion.eb_entropy_bound", float(gen["entropy_bound"]))
    w.add_uint32("diffusion.eb_stability_threshold", int(gen["stability_threshold"]))
    w.add_float32("diffusion.eb_confidence_threshold", float(gen["confidence_threshold"]))
    # tokenizer
    w.add_string("tokenizer.ggml.model", "gemma4")
    w.add_array("tokenizer.ggml.tokens", tokv["tokens"])
    w.add_array("tokenizer.ggml.scores", [float(s) for s in tokv["scores"]])
    w.add_array("tokenizer.ggml.token_type", tokv["types"])
    if tokv["merges"]:
        w.add_array("tokenizer.ggml.merges", tokv["merges"])
    if tokv.get("spaced"):
        w.add_bool(TOKENS_SPACED, True)
    ids = tokv["ids"]
    for key, gk in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                    ("sep", "seperator_token_id"), ("pad", "padding_token_id"), ("cls", "cls_token_id"),
                    ("mask", "mask_token_id")):
        if key in ids:
            w.add_uint32(f"tokenizer.ggml.{gk}", ids[key])
    # generation_config's further EOS ids (the release's [1, 106, 50]) as llama.cpp's other end-of-generation
    # keys, end of turn and end of message: without them a GGUF stopped on <eos> alone
    listed = gen.get("eos_token_id") if isinstance(gen.get("eos_token_id"), list) else []
    extra = [int(i) for i in dict.fromkeys(listed) if int(i) != ids.get("eos")]
    for gk, i in zip(("eot_token_id", "eom_token_id"), extra):
        w.add_uint32(f"tokenizer.ggml.{gk}", i)
    w.add_bool("tokenizer.ggml.add_bos_token", tokv["add_bos"])  # as the source tokenizes (Gemma's: true)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    if tokv["chat_template"]:
        w.add_string("tokenizer.chat_template", tokv["chat_template"])


def add_imatrix_keys(w: GGUFWriter, imatrix: tuple | None) -> None:
    """llama-quantize's record of the imatrix (path or None, Imatrix); its integers are written as u32."""
    if imatrix is None:
        return
    path, im = imatrix
    if path is not None:
        w.add_string("quantize.imatrix.file", str(path))
    if im.datasets:
        w.add_string("quantize.imatrix.dataset", im.datasets[0])  # llama-quantize: the first only
    w.add_uint32("quantize.imatrix.entries_count", len(im.entries))
    if im.chunk_count > 0:
        w.add_uint32("quantize.imatrix.chunks_count", im.chunk_count)


def rope_freqs(tc) -> np.ndarray:
    """The rope_freqs tensor: 1.0 for the rotated pairs of a full layer, 1e30 (no rotation) after."""
    n = tc.global_head_dim // 2
    rot = int(tc.global_head_dim * tc.partial_rotary_factor_full) // 2
    f = np.full(n, 1e30, np.float32)
    f[:rot] = 1.0
    return f


# ---------------------------------------------------------------------------------------------
# The plan and the export
# ---------------------------------------------------------------------------------------------
@dataclass
class PlanItem:
    gguf: str
    shape: tuple[int, ...]  # numpy order
    qtype: T
    src: StoredTensor | None
    data: np.ndarray | None = None  # computed tensors (rope_freqs)

    @property
    def nbytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape, dtype=np.int64))
        return n // bs * ts


def tensor_types(tc, quant: str, imatrix: bool = False, overrides: Overrides | None = None) -> list[tuple]:
    """(tensor spec, ggml type) for every text tensor of a model with text config `tc`, in the
    canonical order: the file type's recipe from the shapes alone (also what sizes are projected from);
    `imatrix`: whether the file is made with one; `overrides`: llama-quantize's per-tensor options."""
    quant = file_type(quant)
    specs = text_tensors(tc)
    n_attn_v = sum(1 for s in specs if ".attn_v." in s.gguf)
    n_gqa = tc.num_attention_heads // tc.layer_dims(0)[1]  # llama.cpp's hparams.n_gqa(): layer 0
    out, v_i = [], 0
    for s in specs:
        out.append((s, tensor_type(quant, s.gguf, s.shape, n_layers=tc.num_hidden_layers, n_experts=tc.num_experts,
                                   layer=s.layer, attn_v_index=v_i, n_attn_v=n_attn_v, n_gqa=n_gqa,
                                   imatrix=imatrix, overrides=overrides)))
        v_i += ".attn_v." in s.gguf
    return out


def plan_export(src_dir, quant: str = "Q4_K_M", imatrix: bool = False,
                overrides: Overrides | None = None) -> tuple[Config, list[PlanItem], list[str]]:
    """Config, the ordered tensor plan (name, shape, type, source) and warnings, without writing
    (`imatrix`: whether the file is made with one; `overrides`: llama-quantize's per-tensor options)."""
    quant = file_type(quant)
    if quant not in RECIPES:
        raise CheckpointError(f"unknown file type {quant!r}; choose one of {', '.join(FILE_TYPES)} "
                              f"(or llama-quantize's aliases {', '.join(ALIASES)})")
    src = Path(src_dir)
    cfg = load_config(src)
    refuse_quantized(cfg.raw, src / "config.json")
    tc = cfg.text
    if (tc.rope_type_full, tc.rope_type_sliding, tc.rope_factor_full, tc.rope_factor_sliding) != (
            "proportional", "default", 1.0, 1.0):  # what the GGUF's rope keys and rope_freqs can say
        raise CheckpointError(f"{src / 'config.json'}: rope_parameters (full {tc.rope_type_full!r}, sliding "
                              f"{tc.rope_type_sliding!r}, factors {tc.rope_factor_full}, {tc.rope_factor_sliding}) "
                              f"have no GGUF form; the release's are proportional / default without factor")
    st = read_index(src)
    items = [PlanItem(ROPE_FREQS_GGUF, (tc.global_head_dim // 2,), T.F32, None, rope_freqs(tc))]
    missing = []
    types = tensor_types(tc, quant, imatrix, overrides)
    for s, qt in types:
        t = st.get(s.hf)
        if t is None:
            missing.append(s.hf)
            continue
        if t.shape != tuple(s.shape):
            raise CheckpointError(f"{t.file}: tensor {s.hf} has shape {list(t.shape)}, expected {list(s.shape)}")
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{t.file}: tensor {s.hf} has unsupported dtype {t.dtype}")
        items.append(PlanItem(s.gguf, tuple(s.shape), qt, t))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{src}: checkpoint lacks {', '.join(missing[:5])}{more}")
    known = {s.hf for s, _ in types}
    warnings = [f"ignoring tensor {n}" for n in sorted(st) if n not in known and not is_vision(n)]
    return cfg, items, warnings + unmatched_overrides(types, overrides)


def unmatched_overrides(types: list[tuple], overrides: Overrides | None) -> list[str]:
    """A warning for each --tensor-type pattern that matches no quantized tensor of `types` (tensor_types)."""
    return [f"--tensor-type {pattern}={t.name.lower()} matches no quantized tensor"
            for pattern, t in (overrides.tensor_types if overrides else ())
            if not any(re.search(pattern, s.gguf) for s, _ in types if quantisable(s.gguf, len(s.shape)))]


def plan_gguf(src_dir, quant: str, imatrix: bool = False, overrides: Overrides | None = None,
              allow_requantize: bool = False, *, revision: str | None = None, token: str | bool | None = None):
    """(source path, Config, tensor plan, warnings, the source's key-values or None) of a GGUF conversion
    from a checkpoint (directory or hub id: plan_export) or from a GGUF file (gguf_requant.plan_requant)."""
    from .gguf_requant import COPY, is_gguf, plan_requant

    if is_gguf(src_dir):
        src = Path(src_dir)
        return (src, *plan_requant(src, quant, imatrix, overrides, allow_requantize))
    if quant == COPY:
        raise InputError(f"--quant COPY (llama-quantize's) applies to a GGUF source, not to the checkpoint {src_dir}")
    src = hub.resolve(src_dir, revision=revision, token=token)
    return (src, *plan_export(src, quant, imatrix, overrides), None)


def _jobs_for(item: PlanItem):
    shape = item.shape
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if len(shape) == 1:
        cols = shape[0]
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield (r0, r1, cols, (r1 - r0) * (item.src.nbytes // rows if item.src else cols * 4))


def export_gguf(src_dir, out_path, quant: str = "Q4_K_M", progress: bool = True, workers: int | None = None,
                name: str | None = None, *, revision: str | None = None, token: str | bool | None = None,
                imatrix=None, overwrite: bool = True, overrides: Overrides | None = None,
                split_max_size: int = 0, split_max_tensors: int = 0, allow_requantize: bool = False,
                keep_split: bool = False) -> Path:
    """Convert the HF checkpoint in `src_dir` (a directory or a hub id "owner/name", see dgplug.hub), or
    the GGUF file `src_dir` (its first shard when split; as llama-quantize does, see gguf_requant;
    `allow_requantize`, `keep_split` and quant "COPY": its options), to a GGUF at `out_path`; returns out_path. `imatrix`:
    see the module docstring. overwrite=False: a file at out_path when the conversion ends is kept,
    and the result refused (converters.output).
    `overrides` (Overrides, parse_overrides): llama-quantize's --tensor-type, --pure,
    --token-embedding-type and --output-tensor-type. split_max_size (tensor bytes) / split_max_tensors:
    shards as llama.cpp's convert_hf_to_gguf writes them (gguf-py's writer: NAME-0000i-of-0000n.gguf
    beside out_path, split.* keys; one file named out_path when everything fits in one); returns
    the first shard's path then (what loaders take)."""
    quant = file_type(quant)
    if imatrix is not None and quant not in IMATRIX_FILE_TYPES:
        raise InputError(f"an imatrix applies to the quantized file types but Q8_0 ({', '.join(IMATRIX_FILE_TYPES)}), "
                         f"not {quant}")
    if imatrix is None and quant in RECIPES and RECIPES[quant]["imatrix"]:
        raise InputError(f"{quant} needs an importance matrix (llama-quantize refuses it without one): make one with "
                         "`dgplug imatrix SRC --calib TEXT -o imatrix.gguf` and pass it with --imatrix")
    from .gguf_requant import COPY, copy_metadata, source_file_type

    out = Path(out_path)
    if keep_split and (split_max_size or split_max_tensors):
        raise InputError("--keep-split writes the source's shards: give it or --split-max-size/--split-max-tensors")
    repo = str(src_dir) if hub.is_hub_id(src_dir) else None
    src, cfg, items, warnings, kv = plan_gguf(src_dir, quant, imatrix is not None, overrides, allow_requantize,
                                              revision=revision, token=token)
    if kv is not None:
        ftype = source_file_type(kv) if quant == COPY else int(RECIPES[quant]["ftype"])
    elif keep_split:
        raise InputError(f"--keep-split (llama-quantize's) applies to a GGUF source, not to the checkpoint {src_dir}")
    imps, im_meta = {}, None
    if imatrix is not None:
        from .imatrix import NEVER_COLLECTED, Imatrix

        im = imatrix if isinstance(imatrix, Imatrix) else Imatrix.load(imatrix)
        im_meta = (None if isinstance(imatrix, Imatrix) else imatrix, im)
        if RECIPES[quant]["imatrix"]:  # llama-quantize: no unweighted tensor of the base type in such a file
            base = RECIPES[quant]["base"]
            lack = [it.gguf for it in items if it.qtype == base and it.src is not None
                    and it.gguf not in NEVER_COLLECTED and it.gguf not in im.entries]
            if lack:
                more = f" (and {len(lack) - 1} more)" if len(lack) > 1 else ""
                raise InputError(f"imatrix has no entry for {lack[0]}{more}: {quant} needs one for every "
                                 f"{base.name} tensor (a very low-bit quantization)")
        imps = im.for_tensors((it.gguf, it.src.name, it.shape) for it in items
                              if it.src is not None and it.qtype in kquants.IMPORTANCE_TYPES)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    quantised = any(it.qtype not in (T.F32, T.F16, T.BF16) and it.src is not None for it in items)
    big = sum(int(np.prod(it.shape)) for it in items) > 4 * CHUNK_ELEMS
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmps, targets, done = [tmp], [out], []  # one file, or the shards (set once the writer has planned them)
    pool = None
    prog = None
    w = None
    try:
        if workers > 1 and quantised and big:
            import multiprocessing as mp
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init)
        if kv is None:  # after the fork: the workers need none of what reading the tokenizer imports and keeps
            gen, tokv = load_generation_defaults(src), read_tokenizer(src, cfg.text.vocab_size, cfg.raw)
        w = GGUFWriter(tmp, ARCH, split_max_tensors=split_max_tensors, split_max_size=split_max_size)
        shard = None  # keep_split: a new output shard where the source's shard changes (llama-quantize's rule)
        for it in items:
            if keep_split and it.src is not None and it.src.file != shard:
                if shard is not None:
                    w.tensors.append({})
                shard = it.src.file
            w.add_tensor_info(it.gguf, it.shape, np.dtype(np.float32), it.nbytes, raw_dtype=it.qtype)
        shard_of = {name: i for i, shard in enumerate(w.tensors) for name in shard}
        if len(w.tensors) == 1:  # all fits in one file: no split keys, and no "not splitting" warning from gguf-py
            w.split_max_size = w.split_max_tensors = 0
        else:
            tmps, targets = w.format_shard_names(tmp), w.format_shard_names(out)
            there = [t for t in targets if t.exists()] if not overwrite else []
            if there:
                raise InputError(f"{there[0]} exists: pass --overwrite to replace it")
        if kv is None:
            _add_metadata(w, src, cfg, gen, tokv, quant, name, repo, im_meta)
        else:
            copy_metadata(w, kv, ftype, lambda w: add_imatrix_keys(w, im_meta), name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total_in = sum(it.src.nbytes for it in items if it.src is not None)
        prog = conversion_progress() if progress else None
        task = None
        if prog is not None:
            prog.start()
            for msg in warnings:
                from rich.text import Text

                prog.console.print(Text(msg, style="yellow"))
            task = prog.add_task(f"{quant}", total=total_in)
        align = w.data_alignment
        for it in items:
            if prog is not None:
                prog.update(task, description=f"{it.gguf} {it.qtype.name}")
            fout = w.fout[shard_of[it.gguf]]
            pad = (-fout.tell()) % align
            if pad:
                fout.write(b"\0" * pad)
            start = fout.tell()
            jobs = list(_jobs_for(it))
            use_pool = pool is not None and it.qtype not in (T.F32, T.F16, T.BF16) and len(jobs) > 1
            pending: deque = deque()
            imp = imps.get(it.gguf)  # [matrices, cols]: a job carries only the rows of its matrices
            per = jobs[-1][1] // len(imp) if imp is not None else 0
            for r0, r1, cols, in_bytes in jobs:
                sl = None if imp is None else (per, r0 // per, imp[r0 // per:(r1 - 1) // per + 1])
                args = (it.src, it.data, r0, r1, cols, int(it.qtype), it.gguf, sl)
                if use_pool:
                    pending.append((pool.apply_async(_job, (args,)), in_bytes))
                    if len(pending) <= 2 * workers:
                        continue
                    res, nb = pending.popleft()
                    _write(fout, res.get())
                else:
                    _write(fout, _encode(*args))
                    nb = in_bytes
                if prog is not None and it.src is not None:
                    prog.advance(task, nb)
            while pending:
                res, nb = pending.popleft()
                _write(fout, res.get())
                if prog is not None and it.src is not None:
                    prog.advance(task, nb)
            written = fout.tell() - start
            if written != it.nbytes:
                raise FormatError(f"{it.gguf}: wrote {written} bytes, expected {it.nbytes}")
            # keep GGUFWriter's bookkeeping in step (its table is consumed in order)
            w.tensors[shard_of[it.gguf]].pop(it.gguf)
        for fout in w.fout:
            pad = (-fout.tell()) % align
            if pad:
                fout.write(b"\0" * pad)
        w.close()
        w = None
        done = []
        for t, target in zip(tmps, targets):
            publish_file(t, target, overwrite)
            done.append(target)
    except BaseException:
        for target in done:  # a later shard could not be put in place: none of this run stays
            target.unlink(missing_ok=True)
        if pool is not None:
            pool.terminate()
            pool = None
        if w is not None:
            try:
                w.close()
            except Exception:
                pass
        for t in tmps:
            t.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if prog is not None:
            prog.stop()
        while _FDS:
            os.close(_FDS.popitem()[1])
    return targets[0]
