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

llama.cpp's legacy imatrix (`llama-imatrix --output-format dat`, the only one ik_llama.cpp uses;
IMatrixCollector::save_imatrix_legacy in tools/imatrix, read by common_imatrix_load_legacy /
quantize's load_legacy_imatrix) is read and written too, recognised by its content. Little-endian:
int32 entry count; per entry int32 name length, the name, int32 ncall, int32 nval, nval float32;
then int32 chunk count, int32 length and the dataset name. ncall = ceil(largest count / chunk size);
each value is (in_sum2 / count) * ncall in float32 (1 * ncall for a matrix no row reached), the
matrices one after another (experts: expert e's columns at e * cols); entries no row reached are
left out. llama-quantize's importance is value / ncall in float32 (the values as they are for
ncall 0), split into matrices by the weight's shape: the file does not say how many it holds.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dgplug import names
from dgplug.errors import FormatError, InputError

from .output import publish_file

GENERAL_TYPE = "imatrix"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
SUFFIX_SUM2, SUFFIX_COUNTS, SUFFIX_SUM = ".in_sum2", ".counts", ".in_sum"
FORMATS = ("gguf", "dat")
# weights no imatrix has an entry for: the embedding is a lookup, not a product with activations
# (llama-imatrix records only blk.* weights, and output.weight with --process-output)
NEVER_COLLECTED = ("token_embd.weight",)
LEGACY_MAX_NAME = 1024  # bytes: tensor names are far shorter (GGUF's limit is 64)
LEGACY_MIN_ENTRY = 4 + 1 + 4 + 4 + 4  # name length, a 1-byte name, ncall, nval, one value


@dataclass
class Entry:
    sum2: np.ndarray  # [matrices, columns] float64: sum of x^2 per column
    counts: np.ndarray  # [matrices] int64: rows seen
    sum: np.ndarray | None = None  # [matrices, columns]: sum of x (optional)
    flat: bool = False  # a legacy .dat entry: sum2 [1, matrices x columns], counts [ncall]


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)  # GGUF weight name -> statistics
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str, matrices: int = 1) -> np.ndarray | None:
        """Mean of squares per column, [matrices, columns] float32; matrices never reached get
        ones (no weighting); None when the file has no entry for `name`. As llama-quantize reads
        the file: the F32 sums divided by the count in float32 (an in-memory Imatrix gives the
        values of its saved file). A legacy entry's one row is split into `matrices` rows when
        they divide it (its file does not say how many matrices it holds)."""
        e = self.entries.get(name)
        if e is None:
            return None
        out = np.ones_like(e.sum2, dtype=np.float32)
        seen = e.counts > 0
        out[seen] = e.sum2[seen].astype(np.float32) / e.counts[seen, None].astype(np.float32)
        if e.flat and out.size % matrices == 0:
            out = out.reshape(matrices, -1)
        return out

    def for_tensors(self, tensors) -> dict[str, np.ndarray]:
        """Importance [matrices, columns] per weight, for the weights (GGUF name, name to report,
        numpy shape) a converter quantizes with it; 3-D weights are one matrix per expert.

        A weight the imatrix does not cover is left out (quantized unweighted), said once on
        stderr, naming the weights that matter (not NEVER_COLLECTED's); an entry whose matrices or
        columns disagree with the weight, or that holds non-finite or negative values, is one
        InputError naming both."""
        import sys

        out, missing = {}, []
        for name, label, shape in tensors:
            matrices = shape[0] if len(shape) == 3 else 1
            imp = self.importance(name, matrices)
            if imp is None:
                missing.append(name)
                continue
            if imp.shape != (matrices, shape[-1]):
                has = f"{imp.size}" if self.entries[name].flat else f"{imp.shape[0]} x {imp.shape[1]}"
                raise InputError(f"imatrix entry {name} has {has} values; tensor {label} "
                                 f"needs {matrices} x {shape[-1]} (an imatrix of another model?)")
            if not np.isfinite(imp).all() or (imp < 0).any():
                raise InputError(f"imatrix entry {name} (for tensor {label}) holds "
                                 f"{'non-finite' if not np.isfinite(imp).all() else 'negative'} values")
            out[name] = imp
        line = missing_note(missing)
        if line:
            print(line, file=sys.stderr)
        return out

    # -- llama.cpp's files ----------------------------------------------------------------------
    def save(self, path, fmt: str = "gguf", overwrite: bool = True) -> Path:
        """Write the GGUF, or with fmt "dat" llama.cpp's legacy layout (under a temporary name,
        renamed when complete; overwrite=False: never over a file another process put there)."""
        if fmt not in FORMATS:
            raise InputError(f"imatrix format {fmt!r}: one of {', '.join(FORMATS)}")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if fmt == "dat":
                with open(tmp, "wb") as f:
                    self._write_dat(f)
            else:
                self._write_gguf(tmp)
            publish_file(tmp, path, overwrite)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def _write_gguf(self, tmp: Path) -> None:
        import gguf

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

    def _write_dat(self, f) -> None:
        """The legacy layout (module docstring): entries no row reached are left out, as
        llama-imatrix leaves them out; the dataset recorded is the first (one fits)."""
        chunk = max(int(self.chunk_size), 1)
        names = sorted(n for n, e in self.entries.items() if (e.counts > 0).any())
        f.write(struct.pack("<i", len(names)))
        for name in names:
            raw, (ncall, values) = name.encode(), _legacy_values(self.entries[name], chunk)
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
            f.write(values.astype("<f4").tobytes())
        dataset = self.datasets[0].encode() if self.datasets else b""
        f.write(struct.pack("<ii", int(self.chunk_count), len(dataset)) + dataset)

    @classmethod
    def load(cls, path) -> "Imatrix":
        """Read a GGUF imatrix (dgplug's or llama-imatrix's) or a legacy .dat one (by content);
        one clear error when it is neither."""
        import gguf

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such imatrix file")
        with open(path, "rb") as f:
            head = f.read(LEGACY_MAX_NAME + 8)
        if head[:4] != b"GGUF":
            if _looks_legacy(head):
                return _load_legacy(path, path.read_bytes())
            raise FormatError(f"{path}: not an imatrix (neither the GGUF magic nor llama.cpp's legacy .dat "
                              f"layout; make one with `dgplug imatrix` or llama-imatrix)")
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


def missing_note(missing: list[str]) -> str | None:
    """The line saying which weights have no entry (quantized unweighted), as llama-quantize names
    each: experts, then attention, then the other weights, by layer; NEVER_COLLECTED's are not named
    (no imatrix has them)."""
    told = sorted((n for n in missing if n not in NEVER_COLLECTED), key=_weight_rank)
    if not told:
        return None
    shown = ", ".join(told[:6]) + (f" (and {len(told) - 6} more)" if len(told) > 6 else "")
    return f"imatrix: no entry for {len(told)} tensor(s): {shown}: quantized unweighted"


def _weight_rank(name: str) -> tuple:
    kind = 0 if "_exps." in name else 1 if ".attn_" in name else 2
    parts = name.split(".")
    top = parts[0] != "blk" or len(parts) < 2 or not parts[1].isdigit()  # top-level weights after the layers
    layer = 1 << 30 if top else int(parts[1])
    return kind, layer, name


def _legacy_values(e: Entry, chunk: int) -> tuple[int, np.ndarray]:
    """(ncall, values) of one entry in the legacy layout, in float32 as llama-imatrix computes
    them: ncall = ceil(largest count / chunk size), value = (sum2 / count) * ncall, 1 * ncall for
    a matrix no row reached."""
    counts = e.counts.astype(np.int64)
    ncall = -(-int(counts.max()) // chunk)
    c = counts.astype(np.float32)[:, None]
    mean = np.where(c > 0, e.sum2.astype(np.float32) / np.where(c > 0, c, 1), np.float32(1))
    return ncall, (mean.astype(np.float32) * np.float32(ncall)).reshape(-1)


def _looks_legacy(head: bytes) -> bool:
    """The start of a legacy imatrix: a plausible entry count, then the first name (printable)."""
    if len(head) < 9:
        return False
    n, length = struct.unpack_from("<ii", head)
    name = head[8:8 + min(length, 64)]
    return 0 < n <= 1 << 24 and 0 < length <= LEGACY_MAX_NAME and bool(name) and all(32 < b < 127 for b in name)


class _Cursor:
    """Reads a legacy imatrix's fields in order; running out is one error naming what was read."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise FormatError(f"{self.path}: truncated legacy imatrix: {what} needs {n} bytes at offset "
                              f"{self.pos}, the file has {self.left} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _load_legacy(path: Path, data: bytes) -> Imatrix:
    """llama.cpp's legacy .dat imatrix (module docstring) as an Imatrix of flat entries."""
    cur = _Cursor(path, data)
    n = cur.i32("the entry count")
    if n < 1 or n * LEGACY_MIN_ENTRY > cur.left:
        raise FormatError(f"{path}: legacy imatrix of {n} entries in {len(data)} bytes (at least "
                          f"{LEGACY_MIN_ENTRY} each): not an imatrix, or truncated")
    out = Imatrix()
    for i in range(n):
        name, e = _legacy_entry(cur, i + 1, n)
        if name in out.entries:
            raise FormatError(f"{path}: legacy imatrix entry {i + 1} ({name}) appears twice")
        out.entries[name] = e
    if cur.left:  # the chunk count and the dataset name (older files end before them)
        out.chunk_count = cur.i32("the chunk count after the entries")
        dataset = cur.take(max(cur.i32("the dataset name's length"), 0), "the dataset name")
        if out.chunk_count < 0 or cur.left:
            raise FormatError(f"{path}: legacy imatrix ends in {cur.left + len(dataset) + 8} bytes that are not "
                              f"a chunk count and a dataset name (chunk count {out.chunk_count})")
        out.datasets = [dataset.decode("utf-8", "replace")] if dataset else []
    return out


def _legacy_entry(cur: _Cursor, i: int, n: int) -> tuple[str, Entry]:
    path, where = cur.path, f"entry {i} of {n}"
    length = cur.i32(f"the name length of {where}")
    if not 0 < length <= LEGACY_MAX_NAME:
        raise FormatError(f"{path}: legacy imatrix {where} has a name of {length} bytes (1 to {LEGACY_MAX_NAME})")
    try:
        name = cur.take(length, f"the name of {where}").decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: legacy imatrix {where} has a name that is not UTF-8") from None
    where = f"entry {i} ({name})"
    ncall, nval = cur.i32(f"ncall of {where}"), cur.i32(f"the value count of {where}")
    if ncall < 0 or nval < 1:
        raise FormatError(f"{path}: legacy imatrix {where} has ncall {ncall} and {nval} values "
                          f"(ncall >= 0 and at least 1 value)")
    values = np.frombuffer(cur.take(4 * nval, f"the {nval} values of {where}"), "<f4")
    # llama-quantize divides by ncall, and takes the values as they are for ncall 0
    return name, Entry(values.astype(np.float64)[None, :], np.array([max(ncall, 1)], np.int64), flat=True)


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
