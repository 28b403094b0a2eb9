"""A DiffusionGemma GGUF as the source of a GGUF conversion: what llama-quantize does.

`export_gguf(SRC.gguf, OUT.gguf, quant=...)` (and `dgplug convert SRC.gguf OUT.gguf -q TYPE`) reads
its tensors from a GGUF instead of a Hugging Face checkpoint; this module plans that and copies the
metadata, as llama.cpp's llama-quantize (`llama_model_quantize_impl`) does:

* every key-value of the source is copied, in its order and with its types (strings as their bytes);
  general.file_type and general.quantization_version take the new file type's values in place; the
  split.* keys (the output is split by its own options) and the source's quantize.imatrix.* keys (they
  described the source) are dropped; an imatrix given now adds its own where a conversion of the
  checkpoint puts them (after general.quantization_version);
* tensors are written in the source's order, each with the type the file type's recipe gives its GGUF
  name (gguf_export.tensor_types, the same table as from a checkpoint); a tensor already of that type
  is copied byte for byte; F32, F16 and BF16 tensors are quantized; a tensor of another block type is
  requantized only with allow_requantize (llama-quantize's --allow-requantize: "requantizing from
  type X is disabled" otherwise), decoded by gguf-py first;
* rope_freqs and the tensors llama-quantize never quantizes (norms, the router, 1-D ones) keep their type;
* file type COPY (llama-quantize's) copies every tensor as it is and keeps the source's file type: with
  the split options it re-shards a GGUF, without them it joins a split one; keep_split (--keep-split)
  writes the output in the source's shards (a new shard where the source's changes; one file when the
  source is one; llama-quantize names that one OUT-00001-of-00001.gguf).

So a requantized F32 GGUF is byte for byte the file `export_gguf` makes from the checkpoint it came
from. The source is read row range by row range from its shards (plain positional reads), as a
checkpoint is: memory stays bounded by the converter's chunks whatever the model's size.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType as VT
from gguf import GGMLQuantizationType as T

from dgplug.config import from_dict
from dgplug.errors import FormatError, InputError
from dgplug.names import ROPE_FREQS_GGUF

from .gguf_import import gguf_to_config, open_gguf, stored_tensors

FLOAT_TYPES = ("F32", "F16", "BF16")  # what llama-quantize quantizes without --allow-requantize
COPY = "COPY"  # llama-quantize's file type that copies every tensor as it is (the source's file type kept)
_REPLACED = ("general.file_type", "general.quantization_version")  # set to the new file's values, in place


def is_gguf(path) -> bool:
    """`path` is a file that starts with the GGUF magic (a convert source read by this module)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def source_metadata(reader) -> list[tuple]:
    """The source's key-values (a gguf_reader.GGUFFile's) as (key, value type, array element type or
    None, value): strings as their bytes, arrays as lists."""
    path = getattr(reader.data, "filename", "GGUF")
    out = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own counts
        vtype = f.types[0]
        if vtype == VT.ARRAY:
            if not f.data:
                raise FormatError(f"{path}: metadata {key!r} is an empty array, which gguf-py's writer cannot copy")
            out.append((key, vtype, f.types[-1], f.raw if f.types[-1] == VT.STRING else f.contents()))
        else:
            out.append((key, vtype, None, f.raw if vtype == VT.STRING else f.contents()))
    return out


def plan_requant(path, quant: str, imatrix: bool = False, overrides=None, allow_requantize: bool = False):
    """(Config, the ordered tensor plan, warnings, the source's key-values) for requantizing the GGUF at
    `path` to file type `quant`; every refusal (an unknown or misshaped tensor, a missing one, a
    quantized tensor to requantize without allow_requantize) is one error naming the tensor."""
    from .gguf_export import PlanItem, quantisable, rope_freqs, tensor_types, unmatched_overrides

    path = Path(path)
    reader = open_gguf(path)  # validated; a split GGUF's shards checked and joined
    cfg = from_dict(gguf_to_config(reader), f"{path} (GGUF metadata)")
    stored = stored_tensors(path)
    if quant == COPY and (imatrix or overrides):
        raise InputError("--quant COPY copies every tensor as it is: --imatrix and the per-tensor options do not apply")
    types = {s.gguf: (s, t) for s, t in tensor_types(cfg.text, "F32" if quant == COPY else quant, imatrix, overrides)}
    items, refused = [], []
    for name, st in stored.items():
        if name == ROPE_FREQS_GGUF:
            items.append(PlanItem(name, st.shape, T[st.dtype], st))
            continue
        if name not in types:
            raise FormatError(f"{path}: unknown tensor {name!r} (not a DiffusionGemma text tensor)")
        spec, qt = types[name]
        if st.shape != tuple(spec.shape):
            raise FormatError(f"{st.file}: tensor {name!r} has shape {list(st.shape)}, expected {list(spec.shape)}")
        if quant == COPY or not quantisable(name, len(st.shape)):  # llama-quantize keeps these as they are
            qt = T[st.dtype]
        if st.dtype != qt.name and st.dtype not in FLOAT_TYPES and not allow_requantize:
            refused.append((name, st.dtype, qt.name))
        items.append(PlanItem(name, st.shape, qt, st))
    missing = [n for n in types if n not in stored]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FormatError(f"{path}: lacks tensor {', '.join(missing[:5])}{more}")
    if refused:
        name, src, dst = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise InputError(f"{path}: requantizing is disabled, as in llama-quantize: tensor {name} is {src}, {quant} "
                         f"makes it {dst}{more}; pass --allow-requantize (the result is worse than a quantization "
                         f"of the original weights)")
    if ROPE_FREQS_GGUF not in stored:  # llama.cpp reads it for the full layers' partial rotation
        items.insert(0, PlanItem(ROPE_FREQS_GGUF, (cfg.text.global_head_dim // 2,), T.F32, None, rope_freqs(cfg.text)))
    return cfg, items, unmatched_overrides(list(types.values()), overrides), source_metadata(reader)


def source_file_type(kv: list[tuple]) -> int:
    """The source's general.file_type (what --quant COPY keeps); 0 (all F32) where it has none."""
    return next((int(v) for key, _, _, v in kv if key == "general.file_type"), 0)


def copy_metadata(w, kv: list[tuple], ftype: int, imatrix_keys, name: str | None = None) -> None:
    """The source's key-values (source_metadata) into writer `w` (module docstring); `imatrix_keys(w)`
    adds the new imatrix's keys after general.quantization_version (where a conversion of the
    checkpoint writes them); `name`: a new general.name."""
    seen = set()
    for key, vtype, sub, value in kv:
        if key.startswith(("split.", "quantize.imatrix.")) or key == "general.architecture":
            continue  # the writer's architecture key has the same value
        if key in _REPLACED:
            w.add_uint32(key, ftype if key == "general.file_type" else 2)
            seen.add(key)
            if key == "general.quantization_version":
                imatrix_keys(w)
        elif key == "general.name" and name is not None:
            w.add_string(key, name)
        else:
            w.add_key_value(key, value, vtype, sub_type=sub)
    for key in _REPLACED:
        if key not in seen:
            w.add_uint32(key, ftype if key == "general.file_type" else 2)
    if "general.quantization_version" not in seen:
        imatrix_keys(w)

