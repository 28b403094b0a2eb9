"""A GGUF file's metadata and tensor table, read at the speed of its bytes.

gguf-py's `GGUFReader` builds a few numpy views per metadata item: for the release's 262,144-token
vocabulary (tokens, scores, token types) that is over half a million small arrays, 35-50 s on this
machine and ~650 MB, paid by every load of a DiffusionGemma GGUF before a weight is read. `GGUFFile`
reads the same file into what dgplug uses of gguf-py's reader, with the same names so the callers
need not know which one they hold:

    GGUFFile(path, mode="r")      mode as numpy's memmap: "r" read-only, "c" copy-on-write
      .fields                     key -> Field, in the file's order, "GGUF.version" / "GGUF.tensor_count" /
                                  "GGUF.kv_count" first (as gguf-py)
      .get_field(key)             Field or None
      .tensors                    Tensor(name, tensor_type, shape (ggml order), n_elements, n_bytes,
                                  data_offset (absolute), data (a view of the map: F16/F32/F64/I* as their
                                  numpy type in numpy order, other types as uint8 rows of blocks, as gguf-py))
      .data                       the np.memmap (its .filename names the file in messages)
    Field.types                   [value type] or [ARRAY, element type]
    Field.contents()              python values as gguf-py's (strings decoded as UTF-8, arrays as lists)
    Field.raw                     strings as their bytes (lists of bytes for string arrays), numbers as numpy
    len(Field.data)               the number of items (gguf-py's indices into its parts)

Numeric arrays are one np.frombuffer each and strings are sliced from one bytes object, so the
vocabulary above takes well under a second. The file must have been checked by
`gguf_import.validate_gguf` first (bounds, types, counts): this reader trusts them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as VT

_NUMPY = {VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16, VT.UINT32: np.uint32,
          VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_, VT.UINT64: np.uint64, VT.INT64: np.int64,
          VT.FLOAT64: np.float64}
_OWN_DTYPE = {T.F16: np.float16, T.F32: np.float32, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
              T.I32: np.int32, T.I64: np.int64}  # gguf-py's views; every other type is uint8 rows of blocks


class Field:
    """One metadata item (see the module docstring)."""

    def __init__(self, name: str, types: list, raw):
        self.name, self.types, self.raw = name, types, raw
        self.data = range(len(raw)) if types[0] == VT.ARRAY else [0]
        self._value = None

    def contents(self):
        if self._value is None:
            if self.types[0] == VT.STRING:
                self._value = self.raw.decode("utf-8")
            elif self.types[0] == VT.ARRAY:
                self._value = ([b.decode("utf-8") for b in self.raw] if self.types[-1] == VT.STRING
                               else self.raw.tolist())
            else:
                self._value = self.raw.item() if isinstance(self.raw, np.generic) else self.raw
        return self._value


class Tensor(NamedTuple):
    name: str
    tensor_type: T
    shape: np.ndarray  # ggml order (innermost first), as gguf-py
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    def __init__(self, path, mode: str = "r"):
        self.data = np.memmap(path, mode=mode)
        buf = memoryview(self.data)
        pos = 4
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, pos)
        pos += 20
        self.fields: dict[str, Field] = {
            "GGUF.version": Field("GGUF.version", [VT.UINT32], np.uint32(version)),
            "GGUF.tensor_count": Field("GGUF.tensor_count", [VT.UINT64], np.uint64(n_tensors)),
            "GGUF.kv_count": Field("GGUF.kv_count", [VT.UINT64], np.uint64(n_kv))}

        def string(p: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", buf, p)
            return bytes(buf[p + 8:p + 8 + n]), p + 8 + n

        def scalar(vt: VT, p: int):
            dt = np.dtype(_NUMPY[vt])
            return np.frombuffer(buf, dt, 1, p)[0], p + dt.itemsize

        for _ in range(n_kv):
            key, pos = string(pos)
            key = key.decode("utf-8")
            (vt,) = struct.unpack_from("<I", buf, pos)
            vt, pos = VT(vt), pos + 4
            if vt == VT.STRING:
                raw, pos = string(pos)
                types = [vt]
            elif vt == VT.ARRAY:
                st, n = struct.unpack_from("<IQ", buf, pos)
                st, pos, types = VT(st), pos + 12, [vt, VT(st)]
                if st == VT.STRING:
                    raw = []
                    for _ in range(n):
                        s, pos = string(pos)
                        raw.append(s)
                else:
                    dt = np.dtype(_NUMPY[st])
                    raw = np.frombuffer(buf, dt, n, pos).copy()
                    pos += n * dt.itemsize
            else:
                raw, pos = scalar(vt, pos)
                types = [vt]
            self.fields[key] = Field(key, types, raw)
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", buf, pos)
            dims = np.frombuffer(buf, np.uint64, nd, pos + 4).copy()
            qt, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            infos.append((name.decode("utf-8"), dims, T(qt), off))
        align = self.fields["general.alignment"].contents() if "general.alignment" in self.fields else 32
        start = pos + (-pos) % align
        self.tensors: list[Tensor] = []
        for name, dims, qt, off in infos:
            n = int(np.prod(dims, dtype=np.int64))
            bs, ts = GGML_QUANT_SIZES[qt]
            nbytes, shape = n // bs * ts, tuple(int(d) for d in reversed(dims.tolist()))
            raw = self.data[start + off:start + off + nbytes]
            if qt in _OWN_DTYPE:
                view = raw.view(_OWN_DTYPE[qt]).reshape(shape)
            else:
                view = raw.reshape(*shape[:-1], shape[-1] // bs * ts)
            self.tensors.append(Tensor(name, qt, dims, n, nbytes, start + off, view))

    def get_field(self, key: str) -> Field | None:
        return self.fields.get(key)
