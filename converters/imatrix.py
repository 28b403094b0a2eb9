"""Importance matrices: collected from dgplug's own forward, stored in llama.cpp's imatrix GGUF.

For every weight that multiplies activations (attention and MLP projections, the router, the
self-conditioning MLP, and each expert of the MoE separately) the collector sums, per input
column, x^2 over every row the weight saw, and counts those rows (experts: only the tokens
routed to them). It runs the real block-diffusion path: `model.generate` over calibration
prompts, so the encoder pass over each prompt and every denoise step over each canvas feed it.

The file is what `llama-imatrix` writes and `llama-quantize --imatrix` reads (tools/imatrix in
llama.cpp): general.type = "imatrix", imatrix.datasets / chunk_count / chunk_size, and per
weight (its GGUF name, dgplug/names.py) two F32 tensors: `<name>.in_sum2` [matrices, columns]
and `<name>.counts` [matrices, 1], plus `<name>.in_sum` (sums of x) as newer llama.cpp writes.
The importance of column j of matrix m is in_sum2[m, j] / counts[m] (a mean of squares).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dgplug import names
from dgplug.errors import FormatError, InputError

GENERAL_TYPE = "imatrix"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
SUFFIX_SUM2, SUFFIX_COUNTS, SUFFIX_SUM = ".in_sum2", ".counts", ".in_sum"


@dataclass
class Entry:
    sum2: np.ndarray  # [matrices, columns] float64: sum of x^2 per column
    counts: np.ndarray  # [matrices] int64: rows seen
    sum: np.ndarray | None = None  # [matrices, columns]: sum of x (optional)


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)  # GGUF weight name -> statistics
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray | None:
        """Mean of squares per column, [matrices, columns] float32; matrices never reached get
        ones (no weighting); None when the file has no entry for `name`. As llama-quantize reads
        the file: the F32 sums divided by the count in float32 (an in-memory Imatrix gives the
        values of its saved file)."""
        e = self.entries.get(name)
        if e is None:
            return None
        out = np.ones_like(e.sum2, dtype=np.float32)
        seen = e.counts > 0
        out[seen] = e.sum2[seen].astype(np.float32) / e.counts[seen, None].astype(np.float32)
        return out

    def for_tensors(self, tensors) -> dict[str, np.ndarray]:
        """Importance [matrices, columns] per weight, for the weights (GGUF name, name to report,
        numpy shape) a converter quantizes with it; 3-D weights are one matrix per expert.

        A weight the imatrix does not cover is left out (quantized unweighted), said once on
        stderr; an entry whose matrices or columns disagree with the weight, or that holds
        non-finite values, is one InputError naming both."""
        import sys

        out, missing = {}, []
        for name, label, shape in tensors:
            imp = self.importance(name)
            if imp is None:
                missing.append(name)
                continue
            matrices = shape[0] if len(shape) == 3 else 1
            if imp.shape != (matrices, shape[-1]):
                raise InputError(f"imatrix entry {name} has {imp.shape[0]} x {imp.shape[1]} values; tensor {label} "
                                 f"needs {matrices} x {shape[-1]} (an imatrix of another model?)")
            if not np.isfinite(imp).all():
                raise InputError(f"imatrix entry {name} (for tensor {label}) holds non-finite values")
            out[name] = imp
        if missing:
            print(f"imatrix: no entry for {len(missing)} tensor(s) (e.g. {missing[0]}): quantized unweighted",
                  file=sys.stderr)
        return out

    # -- llama.cpp's file ---------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the GGUF (under a temporary name, renamed when complete)."""
        import gguf

        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            w = gguf.GGUFWriter(tmp, GENERAL_TYPE)
            w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
            w.add_type(GENERAL_TYPE)
            w.add_array(KEY_DATASETS, list(self.datasets))
            w.add_uint32(KEY_CHUNK_COUNT, int(self.chunk_count))
            w.add_uint32(KEY_CHUNK_SIZE, int(self.chunk_size))
            for name in sorted(self.entries):  # llama.cpp's order
                e = self.entries[name]
                w.add_tensor(name + SUFFIX_SUM2, e.sum2.astype(np.float32))
                w.add_tensor(name + SUFFIX_COUNTS, e.counts.astype(np.float32).reshape(-1, 1))
                if e.sum is not None:
                    w.add_tensor(name + SUFFIX_SUM, e.sum.astype(np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path) -> "Imatrix":
        """Read a GGUF imatrix (dgplug's or llama-imatrix's); one clear error when it is not one."""
        import gguf

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such imatrix file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":  # e.g. llama.cpp's legacy .dat imatrix, or a text file
                raise FormatError(f"{path}: not a GGUF imatrix (it does not start with the GGUF magic; "
                                  f"make one with `dgplug imatrix` or a recent llama-imatrix)")
        try:
            r = gguf.GGUFReader(path)
        except Exception as ex:  # noqa: BLE001 - any parse failure is the same answer to the user
            raise FormatError(f"{path}: not a GGUF imatrix ({ex})") from None
        kind = _field(r, gguf.Keys.General.TYPE)
        if kind != GENERAL_TYPE:
            raise FormatError(f"{path}: general.type is {kind!r}, not 'imatrix' (an imatrix from llama-imatrix "
                              f"or `dgplug imatrix` is needed)")
        out = cls(datasets=list(_field(r, KEY_DATASETS) or []), chunk_count=int(_field(r, KEY_CHUNK_COUNT) or 0),
                  chunk_size=int(_field(r, KEY_CHUNK_SIZE) or 0))
        parts: dict[str, dict[str, np.ndarray]] = {}
        for t in r.tensors:
            for suffix in (SUFFIX_SUM2, SUFFIX_COUNTS, SUFFIX_SUM):
                if t.name.endswith(suffix):
                    if t.tensor_type != gguf.GGMLQuantizationType.F32:
                        raise FormatError(f"{path}: tensor {t.name} is {t.tensor_type.name}, imatrix sums are F32")
                    parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float64)
                    break
        for name, p in parts.items():
            if SUFFIX_SUM2 not in p or SUFFIX_COUNTS not in p:
                raise FormatError(f"{path}: {name} has {'no .counts' if SUFFIX_SUM2 in p else 'no .in_sum2'} tensor")
            counts = np.rint(p[SUFFIX_COUNTS].reshape(-1)).astype(np.int64)
            sum2 = p[SUFFIX_SUM2].reshape(len(counts), -1)
            s = p.get(SUFFIX_SUM)
            out.entries[name] = Entry(sum2, counts, None if s is None else s.reshape(sum2.shape))
        if not out.entries:
            raise FormatError(f"{path}: an imatrix with no entries")
        return out


def _field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


# -- collection ---------------------------------------------------------------------------------
class Collector:
    """Accumulates input statistics of a dgplug model's weights while it runs (see `collecting`)."""

    def __init__(self, model):
        self.model = model
        self.sum2: dict[str, torch.Tensor] = {}
        self.sum: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.by_id: dict[int, str] = {}  # id(weight) -> GGUF name
        self.routers: dict[int, str] = {}
        for spec in names.text_tensors(model.tc):
            if spec.kind not in ("linear", "experts", "router") or spec.hf.endswith(("scale", "per_expert_scale")):
                continue
            w = model  # walk the attribute path: packed weights are not parameters
            for part in spec.hf[len(names.HF_PREFIX):].split("."):
                w = getattr(w, part)
            (self.routers if spec.kind == "router" else self.by_id)[id(w)] = spec.gguf

    def _add(self, name: str, x: torch.Tensor, matrices: int = 1, which=None):
        """Rows x [n, cols] into matrix `which` (expert index, [n] long) or the only matrix."""
        x = x.reshape(-1, x.shape[-1]).double()
        if name not in self.sum2:
            self.sum2[name] = torch.zeros(matrices, x.shape[1], dtype=torch.float64, device=x.device)
            self.sum[name] = torch.zeros_like(self.sum2[name])
            self.counts[name] = torch.zeros(matrices, dtype=torch.int64, device=x.device)
        if which is None:
            self.sum2[name][0] += (x * x).sum(0)
            self.sum[name][0] += x.sum(0)
            self.counts[name][0] += x.shape[0]
        else:
            self.sum2[name].index_add_(0, which, x * x)
            self.sum[name].index_add_(0, which, x)
            self.counts[name] += torch.bincount(which, minlength=matrices)

    def linear(self, x, w):
        name = self.by_id.get(id(w))
        if name is not None:
            self._add(name, x)

    def route(self, r, proj_weight, scale, eps):
        from dgplug import ops

        name = self.routers.get(id(proj_weight))
        if name is not None:
            self._add(name, ops.rms_norm(r, None, eps) * scale * (r.shape[-1] ** -0.5))

    def moe(self, x, index, gate_up, down):
        """Expert inputs: x for the gate/up matrices, gelu(gate) * up for the down matrices."""
        from dgplug import ops
        from dgplug.kernels.quantized_weight import expert_weight

        E = gate_up.shape[0]
        tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        exp = index.reshape(-1)
        ok = (exp >= 0) & (exp < E)
        tok, exp = tok[ok], exp[ok]
        n_gu, n_down = self.by_id.get(id(gate_up)), self.by_id.get(id(down))
        if n_gu is not None:
            self._add(n_gu, x[tok], E, exp)
        if n_down is not None:
            for e in torch.unique(exp).tolist():
                rows = x[tok[exp == e]].float()
                gate, up = torch.nn.functional.linear(rows, expert_weight(gate_up, e, torch.float32)).chunk(2, -1)
                h = ops.gelu_tanh(gate) * up
                self._add(n_down, h, E, torch.full((h.shape[0],), e, dtype=torch.long, device=h.device))

    def result(self, datasets=(), chunk_count=0, chunk_size=0) -> Imatrix:
        out = Imatrix(datasets=list(datasets), chunk_count=chunk_count, chunk_size=chunk_size)
        for name in self.sum2:
            out.entries[name] = Entry(self.sum2[name].cpu().numpy(), self.counts[name].cpu().numpy(),
                                      self.sum[name].cpu().numpy())
        return out


@contextlib.contextmanager
def collecting(model):
    """Within the block, every weight use of `model` (encoder, decoder, self-conditioning) feeds a
    Collector, which the block receives. CUDA graphs are off meanwhile (hooks run in Python)."""
    from dgplug import model as model_mod
    from dgplug import ops

    col = Collector(model)
    linear, route, moe = model_mod.linear, ops.route, ops.moe
    graphs = os.environ.get("DGPLUG_CUDA_GRAPHS")

    def linear_hook(x, w):
        col.linear(x, w)
        return linear(x, w)

    def route_hook(r, proj_weight, scale, per_expert_scale, top_k, eps):
        col.route(r, proj_weight, scale, eps)
        return route(r, proj_weight, scale, per_expert_scale, top_k, eps)

    def moe_hook(x, index, weights, gate_up, down):
        col.moe(x, index, gate_up, down)
        return moe(x, index, weights, gate_up, down)

    model_mod.linear, ops.route, ops.moe = linear_hook, route_hook, moe_hook
    os.environ["DGPLUG_CUDA_GRAPHS"] = "0"
    try:
        yield col
    finally:
        model_mod.linear, ops.route, ops.moe = linear, route, moe
        if graphs is None:
            os.environ.pop("DGPLUG_CUDA_GRAPHS", None)
        else:
            os.environ["DGPLUG_CUDA_GRAPHS"] = graphs


def calibration_chunks(ids: list[int], chunk_size: int) -> list[list[int]]:
    """Calibration token ids cut into prompts of `chunk_size` (the last, shorter one is dropped
    unless it is the only one)."""
    if not ids:
        raise InputError("the calibration text tokenizes to no tokens")
    chunks = [ids[i:i + chunk_size] for i in range(0, len(ids), chunk_size)]
    if len(chunks) > 1 and len(chunks[-1]) < chunk_size:
        chunks.pop()
    return chunks


def collect(model, chunks: list[list[int]], *, batch: int = 1, steps: int | None = None, seed: int = 0,
            datasets=(), on_chunk=None) -> Imatrix:
    """Run `model.generate` (one canvas per prompt) over the calibration prompts with a Collector.

    Prompts of equal length are batched (`batch` at a time); `on_chunk(done, total)` reports
    progress. Returns the Imatrix (chunk_size = prompt length + canvas)."""
    C = model.cfg.canvas_length
    with collecting(model) as col:
        for i in range(0, len(chunks), batch):
            group = chunks[i:i + batch]
            L = max(len(c) for c in group)
            ids = torch.zeros(len(group), L, dtype=torch.long)
            mask = torch.zeros(len(group), L, dtype=torch.bool)
            for r, c in enumerate(group):  # left padding, as transformers
                ids[r, L - len(c):] = torch.tensor(c)
                mask[r, L - len(c):] = True
            model.generate(ids, mask if not bool(mask.all()) else None, max_new_tokens=C,
                           max_denoising_steps=steps, seed=seed + i)
            if on_chunk is not None:
                on_chunk(min(i + batch, len(chunks)), len(chunks))
    size = max(len(c) for c in chunks) + C
    return col.result(datasets, chunk_count=len(chunks), chunk_size=size)
