"""Lazy reading of a Hugging Face DiffusionGemma checkpoint: config.json plus (sharded) safetensors.

Tensors are read one at a time through `safe_open` (memory-mapped); nothing is copied whole.
Every problem becomes one `CheckpointError` naming the file or tensor at fault.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
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


class SafetensorsCheckpoint:
    """Name -> shard map over one directory; `get(name)` reads a single tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if not (self.path / s).exists():
                    raise CheckpointError(f"{index}: shard {s} is listed but missing from {self.path}")
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = None
        self._handles = {}
        self._maps = {}
        in_shard = {s: set(self._open(s).keys()) for s in shards}
        if weight_map is not None:
            for k, s in weight_map.items():
                if k not in in_shard[s]:
                    raise CheckpointError(f"{self.path / s}: tensor {k} listed in the index is not in the shard")
            self.weight_map = dict(weight_map)
        else:
            self.weight_map = {k: s for s in shards for k in sorted(in_shard[s])}

    def _open(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = open_safetensors(self.path / shard)
        return self._handles[shard]

    def keys(self):
        return self.weight_map.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """One tensor as a zero-copy view of the memory-mapped shard (copy-on-write).

        Like transformers, so the weights sit at the same addresses modulo the page: CPU BLAS
        results depend on operand alignment, and this keeps fp32 parity bit for bit."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name} not found")
        mm, header, base = self._mapped(shard)
        info = header.get(name)
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path / shard}: tensor {name} has unsupported dtype {info['dtype']}")
        if base + end > len(mm):
            raise CheckpointError(f"{self.path / shard}: tensor {name} runs past the end of the file (truncated?)")
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start).view(info["shape"])

    def _mapped(self, shard: str):
        if shard not in self._maps:
            f = self.path / shard
            with open(f, "rb") as fh:
                try:
                    n = struct.unpack("<Q", fh.read(8))[0]
                    header = json.loads(fh.read(n))
                except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{f}: unreadable safetensors header ({e})") from None
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[shard] = (mm, header, 8 + n)
        return self._maps[shard]


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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
