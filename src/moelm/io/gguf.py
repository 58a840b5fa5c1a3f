"""GGUF files (llama.cpp's format), read with the gguf package: metadata and tensor table, tensor data on demand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# GGUF value types: numpy dtypes of the scalars; 8 is a string (u64 length + UTF-8), 9 an array (type, u64 count)
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
           12: "<f8"}
STRING, ARRAY = 8, 9


def require_gguf():
    """The gguf package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading or writing GGUF files needs the gguf package: pip install gguf") from None
    return gguf


class GGUFFile:
    """A GGUF's metadata (key -> value) and tensor table, read from its header; tensor data read on demand, one
    tensor or one slice of its first axis (an expert) at a time. (gguf.GGUFReader takes ~10 s for a 100k-token
    vocabulary here, one numpy view per string; this reads the header with plain file reads.)"""

    def __init__(self, path: str | Path):
        self.gguf = require_gguf()
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{self.path} is not a GGUF file")
            version, n_tensors, n_kv = _read(f, 4), _read(f, 10), _read(f, 10)
            if version not in (2, 3):
                raise ValueError(f"{self.path}: GGUF version {version} is not read (2 and 3 are, little-endian)")
            self.meta = {}
            for _ in range(n_kv):
                key = _string(f)
                self.meta[key] = _value(f, _read(f, 4))
            infos = []
            for _ in range(n_tensors):
                name, ndim = _string(f), _read(f, 4)
                ne = [_read(f, 10) for _ in range(ndim)]
                infos.append((name, ne[::-1], _read(f, 4), _read(f, 10)))  # numpy order: ne reversed
            align = int(self.meta.get("general.alignment", 32))
            start = (f.tell() + align - 1) // align * align
        Q = self.gguf.GGMLQuantizationType
        self.shapes = {name: shape for name, shape, _, _ in infos}
        self.types = {name: Q(kind) for name, _, kind, _ in infos}
        self.offsets = {name: start + offset for name, _, _, offset in infos}

    def qtype(self, name: str) -> str:
        return self.types[name].name

    def raw(self, name: str, index: int | None = None) -> np.ndarray:
        """The stored bytes, shaped [..., bytes per row] (of row block `index` of the first axis if given)."""
        shape = list(self.gguf.quant_shape_to_byte_shape(self.shapes[name], self.types[name]))
        offset = self.offsets[name]
        if index is not None:
            shape = shape[1:]
            offset += index * int(np.prod(shape))
        return np.fromfile(self.path, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)

    def floats(self, name: str, index: int | None = None) -> np.ndarray:
        """float32 data, dequantized with gguf's reference code (gguf.quants.dequantize)."""
        from gguf.quants import dequantize

        try:
            return dequantize(self.raw(name, index), self.types[name])
        except NotImplementedError:
            raise ValueError(f"{self.path.name}: tensor {name} is stored as {self.qtype(name)}, which gguf "
                             "cannot dequantize and moelm does not read") from None

    def float_dtype(self) -> torch.dtype:
        """dtype="auto" as transformers resolves it: BF16 or F16 if the file holds them, else float32."""
        types = {t.name for t in self.types.values()}
        return torch.bfloat16 if "BF16" in types else torch.float16 if "F16" in types else torch.float32


def _read(f, kind: int):
    dtype = np.dtype(SCALARS[kind])
    return np.frombuffer(f.read(dtype.itemsize), dtype)[0].item()


def _string(f) -> str:
    return f.read(_read(f, 10)).decode("utf-8", errors="replace")


def _value(f, kind: int):
    if kind == STRING:
        return _string(f)
    if kind != ARRAY:
        return _read(f, kind)
    item, n = _read(f, 4), _read(f, 10)
    if item in (STRING, ARRAY):
        return [_value(f, item) for _ in range(n)]
    dtype = np.dtype(SCALARS[item])
    return np.frombuffer(f.read(n * dtype.itemsize), dtype).tolist()
