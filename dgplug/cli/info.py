"""`dgplug info` (every format `dgplug.load` reads) and `dgplug inspect` (one GGUF file).

Parameter counts come from the architecture (`dgplug.names.text_tensors`), so they are the same
for a checkpoint in any format; only the storage lines differ. Nothing large is read: headers,
config and metadata only.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.table import Table
from rich.text import Text

from .common import out

def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}P{unit}"


def architecture(cfg) -> dict:
    """What every format shares: shapes, layer pattern and parameter counts of the text model."""
    from dgplug.names import text_tensors

    tc = cfg.text
    specs = text_tensors(tc)
    total = sum(_numel(s.shape) for s in specs if s.kind != "scalar")
    experts = sum(_numel(s.shape) for s in specs if s.kind == "experts")
    embed = sum(_numel(s.shape) for s in specs if s.kind == "embed")
    return dict(
        layers=tc.num_hidden_layers, hidden=tc.hidden_size, vocab=tc.vocab_size, canvas=cfg.canvas_length,
        context=tc.max_position_embeddings,
        layer_pattern="".join("S" if t == "sliding_attention" else "F" for t in tc.layer_types),
        sliding_window=tc.sliding_window, heads=tc.num_attention_heads,
        sliding_kv=f"{tc.num_key_value_heads} x {tc.head_dim}",
        full_kv=f"{tc.num_global_key_value_heads} x {tc.global_head_dim}",
        experts=tc.num_experts, top_k=tc.top_k_experts, expert_size=tc.moe_intermediate_size,
        dense_mlp=tc.intermediate_size, params_total=total,
        params_active=total - experts + experts * tc.top_k_experts // tc.num_experts,
        params_experts=experts, params_embedding=embed,
    )


def describe(path) -> dict:
    """info's facts for a checkpoint directory (plain or dgplug-quantized), a GGUF file, a
    directory holding one, or a hub id (handed to the library as it is)."""
    from dgplug.loader import gguf_file_of

    p = Path(path)
    g = gguf_file_of(p) if p.exists() else None
    if g is not None:
        return _describe_gguf(g)
    from dgplug.config import load_config
    from dgplug.hub import is_hub_id, resolve

    if not p.exists() and is_hub_id(path):  # the architecture from config.json alone (no weights fetched)
        return dict(path=str(path), **architecture(load_config(resolve(path, files=["config.json"]))),
                    format="hub id (config.json only: the weights are not fetched for info)", bytes_on_disk=None)
    cfg = load_config(path)
    d = dict(path=str(path), **architecture(cfg))
    qc = cfg.raw.get("quantization_config")
    if qc:
        d.update(_storage_quantized(p, qc))
    else:
        d.update(_storage_safetensors(p, cfg))
    return d


def _by_file(tensors: dict) -> list:
    """[(shard file, {name: StoredTensor})] of `dgplug.checkpoint.read_index`'s tensors."""
    by_file: dict[str, dict] = {}
    for t in tensors.values():
        by_file.setdefault(t.file, {})[t.name] = t
    return [(Path(f), by_file[f]) for f in sorted(by_file)]


def _storage_safetensors(p: Path, cfg) -> dict:
    from dgplug.checkpoint import DTYPES, SafetensorsCheckpoint, validate
    from dgplug.names import is_vision

    ck = SafetensorsCheckpoint(p)
    validate(ck, cfg)  # names and shapes against the config
    dtypes: Counter = Counter()
    vision = 0
    size = 0
    for f, hdr in _by_file(ck.tensors):
        size += f.stat().st_size
        for k, v in hdr.items():
            if is_vision(k):
                vision += 1
            else:
                dtypes[DTYPES[v.dtype][0] if v.dtype in DTYPES else v.dtype] += 1
    return dict(format="safetensors", dtypes=dict(dtypes), vision_tensors=vision, bytes_on_disk=size)


def _storage_quantized(p: Path, qc: dict) -> dict:
    from dgplug.checkpoint import read_index

    packed = kept = size = 0
    for f, hdr in _by_file(read_index(p)):  # a shard missing or cut short is named
        size += f.stat().st_size
        for k, v in hdr.items():
            n = v.nbytes
            if k.endswith((".qweight", ".scale", ".zero")):
                packed += n
            else:
                kept += n
    return dict(format=f"{qc.get('scheme')} (dgplug)", group_size=qc.get("group_size"),
                not_converted=list(qc.get("modules_to_not_convert") or []), packed_bytes=packed, kept_bytes=kept,
                bytes_on_disk=size)


def config_of(path):
    """The model's Config from its config.json or GGUF metadata alone (no weights read); None for a
    hub id, which only the library resolves."""
    from dgplug.config import from_dict, load_config
    from dgplug.loader import gguf_file_of

    p = Path(path)
    if not p.exists():
        return None
    g = gguf_file_of(p)
    if g is None:
        return load_config(p)
    from dgplug.converters.gguf_import import gguf_to_config

    raw = gguf_to_config(g)
    raw.pop("generation_config", None)
    raw.pop("mask_token_id", None)
    return from_dict(raw, str(g))


def _describe_gguf(path: Path) -> dict:
    from gguf import LlamaFileType

    from dgplug.converters.gguf_import import inspect_table, shard_paths

    cfg = config_of(path)
    table = inspect_table(path)
    ft = table["metadata"].get("general.file_type")
    try:
        ft = LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        ft = str(ft)
    types = Counter(typ for _, typ, _, _ in table["tensors"])
    return dict(path=str(path), **architecture(cfg), format=f"GGUF {ft}", tensor_types=dict(types),
                bytes_on_disk=sum(p.stat().st_size for p in shard_paths(path, table["metadata"])))


def _per_layer(names: list[str]) -> list[str]:
    """Module names with the layer index folded: model.decoder.layers.*.router (30 layers)."""
    import re

    folded: Counter = Counter(re.sub(r"\.layers\.\d+\.", ".layers.*.", n) for n in names)
    return [f"{n} ({k} layers)" if ".layers.*." in n else n for n, k in folded.items()]


def show_info(d: dict) -> None:
    """A table on a terminal; piped, one line a fact, its name first (grep finds it), nothing wrapped."""
    t = Table(show_header=False, box=None)
    t.add_row("architecture", f"DiffusionGemma ({d['layers']} layers, hidden {d['hidden']}, vocab {d['vocab']}, "
                              f"canvas {d['canvas']}, context {d['context']})")
    t.add_row("layer pattern", f"{d['layer_pattern']}  (S sliding window {d['sliding_window']}, F full)")
    t.add_row("attention", f"{d['heads']} heads; sliding {d['sliding_kv']} kv; full {d['full_kv']} kv (K = V)")
    t.add_row("experts", f"{d['experts']} x {d['expert_size']}, top-{d['top_k']}; dense MLP {d['dense_mlp']}")
    t.add_row("parameters", f"{human(d['params_total'])} total, {human(d['params_active'])} active per token "
                            f"({human(d['params_experts'])} in experts, {human(d['params_embedding'])} embedding)")
    t.add_row("format", d["format"])
    if "dtypes" in d:
        t.add_row("dtype", ", ".join(f"{k} ({v} tensors)" for k, v in d["dtypes"].items()))
        t.add_row("vision tensors", f"{d['vision_tensors']} (skipped: dgplug runs the text model)")
    if "tensor_types" in d:
        t.add_row("tensor types", ", ".join(f"{k} x {v}" for k, v in sorted(d["tensor_types"].items())))
    if "packed_bytes" in d:
        groups = f"group size {d['group_size']}" if d["group_size"] else "one scale per output channel"
        t.add_row("quantization", f"{groups}, not converted: {', '.join(_per_layer(d['not_converted'])) or '-'}")
        t.add_row("weight bytes", f"{human(d['packed_bytes'], 'B')} packed + {human(d['kept_bytes'], 'B')} kept "
                                  f"(norms, router, embedding, vision)")
    if d["bytes_on_disk"] is not None:
        t.add_row("size", f"{human(d['bytes_on_disk'], 'B')} on disk")
    if out.is_terminal:
        out.print(t)
        return
    keys, values = (c.cells for c in t.columns)
    for k, v in zip(keys, values):
        out.print(f"{k:<16}{v}", soft_wrap=True)


def inspect(path: Path, as_json: bool) -> int:
    """Print the metadata, the tensor table and the contract check; returns the exit code."""
    from dgplug.converters.gguf_import import contract_report, inspect_table

    table = inspect_table(path)
    meta, rows = table["metadata"], table["tensors"]
    imatrix = meta.get("general.type") == "imatrix"  # no model to check: its table is the answer
    problems, notes = ([], []) if imatrix else contract_report(path)
    if as_json:
        out.print(json.dumps({"path": str(path), "metadata": meta,
                              "tensors": [dict(name=n, type=ty, shape=list(s), bytes=b) for n, ty, s, b in rows],
                              "contract_problems": problems, "notes": notes}, default=str))
        return 1 if problems else 0
    t = Table(title=Text(str(path)))
    t.add_column("key", no_wrap=True)  # whole keys, also piped at 80 columns (grep finds them)
    t.add_column("value", overflow="fold")
    for k, v in meta.items():
        if k == "general.file_type" and isinstance(v, int):
            from gguf import LlamaFileType

            v = f"{v} ({LlamaFileType(v).name.removeprefix('MOSTLY_')})" if v in LlamaFileType._value2member_map_ else v
        t.add_row(Text(k), Text(str(v)[:100]))
    out.print(t)
    t = Table()
    t.add_column("tensor", no_wrap=True)
    for col in ("type", "shape (ggml order)", "bytes"):
        t.add_column(col, overflow="fold")
    for name, typ, shape, nbytes in rows:
        t.add_row(Text(name), typ, Text(str(list(shape))), human(nbytes, "B"))
    out.print(t)
    for p in problems:
        out.print(Text("contract: ", style="red") + Text(p))
    for n in notes:
        out.print(Text("note: ", style="yellow") + Text(n))
    if imatrix:
        out.print(Text("an importance matrix (general.type imatrix), not a model: it goes to "
                       "`dgplug convert --imatrix`"))
    elif not problems:
        out.print(Text("matches the diffusion-gemma GGUF contract", style="green"))
    return 1 if problems else 0
