"""Lazy reading of a Hugging Face DiffusionGemma checkpoint: config.json plus (sharded) safetensors.

Tensors are read one at a time through `safe_open` (memory-mapped); nothing is copied whole.
Every problem becomes one `CheckpointError` naming the file or tensor at fault.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from . import names
from .config import Config, load_config
from .errors import CheckpointError


def open_safetensors(path: str | Path, device: str = "cpu"):
    """safe_open, with a missing, truncated or corrupt file as one CheckpointError naming it (safetensors
    raises its own error types, whose messages name no file)."""
    try:
        return safe_open(str(path), framework="pt", device=device)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint lists it)") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


# safetensors' dtype names -> (torch's name, bytes): the one table (converters, loader and `dgplug info`
# read it; torch itself is imported only where a tensor is made, so the GGUF converter's workers stay light)
DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
          "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}


def torch_dtype(name: str):
    """The torch dtype of safetensors' dtype `name` ("BF16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, DTYPES[name][0])


def dtype_name(dtype) -> str:
    """safetensors' name of a torch dtype (torch.bfloat16 -> "BF16")."""
    return _NAME_OF[str(dtype).removeprefix("torch.")]


_NAME_OF = {t: n for n, (t, _) in DTYPES.items()}
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors file holds it: where its bytes are, read from the header alone."""
    name: str
    file: str
    dtype: str  # safetensors' name ("BF16")
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, from its header, checked against the file: a header
    that does not parse or fit, or a tensor whose bytes run past the end or disagree with its shape
    and dtype, is one CheckpointError naming the file (and the tensor)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors header ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes; truncated?)")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: safetensors header length {n} is over the format's limit ({_MAX_HEADER})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry ({e})") from None
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        if dtype in DTYPES and end - start != math.prod(shape) * DTYPES[dtype][1]:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape {list(shape)} {dtype}")
        out[name] = StoredTensor(name, str(path), dtype, shape, 8 + n + start, end - start)
    return out


def read_index(directory: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint directory, as transformers finds them: the shards that
    model.safetensors.index.json lists (the index is authoritative), else model.safetensors."""
    d = Path(directory)
    idx = d / INDEX
    if idx.exists():
        try:
            weight_map = dict(json.loads(idx.read_text())["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{idx}: not a safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not (d / s).exists():
                raise CheckpointError(f"{idx}: shard {s} is listed but missing from {d}")
        held = {s: read_header(d / s) for s in shards}
        for name, s in weight_map.items():
            if name not in held[s]:
                raise CheckpointError(f"{d / s}: tensor {name} listed in the index is not in the shard")
        return {name: held[s][name] for name, s in sorted(weight_map.items())}
    single = d / "model.safetensors"
    if not single.exists():
        others = sorted(p.name for p in d.glob("*.safetensors"))
        hint = (f" ({len(others)} .safetensors file{'s' * (len(others) > 1)}, {others[0]}{', ...' * (len(others) > 1)}, "
                f"without an index: transformers reads none of them)" if others else "")
        raise CheckpointError(f"{d}: no model.safetensors or {INDEX}{hint}")
    return dict(sorted(read_header(single).items()))


class SafetensorsCheckpoint:
    """Name -> shard map over one directory (`read_index`); `get(name)` reads a single tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors = read_index(self.path)
        self.weight_map = {k: Path(t.file).name for k, t in self.tensors.items()}
        self._maps: dict[str, mmap.mmap] = {}

    def keys(self):
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str):
        """One tensor as a zero-copy view of the memory-mapped shard (copy-on-write).

        Like transformers, so the weights sit at the same addresses modulo the page: CPU BLAS
        results depend on operand alignment, and this keeps fp32 parity bit for bit."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name} not found")
        if t.dtype not in DTYPES:
            raise CheckpointError(f"{t.file}: tensor {name} has unsupported dtype {t.dtype}")
        import torch

        dtype = torch_dtype(t.dtype)
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=dtype)
        if t.file not in self._maps:
            with open(t.file, "rb") as fh:
                self._maps[t.file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(self._maps[t.file], dtype=dtype, count=t.nbytes // dtype.itemsize,
                                offset=t.offset).view(t.shape)


def validate(ckpt: SafetensorsCheckpoint, cfg: Config) -> list[names.TensorSpec]:
    """Check names and shapes against the config: missing, extra and misshaped tensors."""
    specs = names.text_tensors(cfg.text)
    expected = {s.hf: s for s in specs}
    present = set(ckpt.keys())
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(n for n in present if n not in expected and not names.is_vision(n) and n != "lm_head.weight")
    if extra:
        raise CheckpointError(f"{ckpt.path}: unexpected tensor {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    for s in specs:
        shape = ckpt.shape(s.hf)
        if shape != s.shape:
            raise CheckpointError(f"{ckpt.path / ckpt.weight_map[s.hf]}: tensor {s.hf} has shape {list(shape)}, expected {list(s.shape)}")
    return specs


def open_checkpoint(path: str | Path) -> tuple[Config, SafetensorsCheckpoint]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    cfg = load_config(path)
    return cfg, SafetensorsCheckpoint(path)
