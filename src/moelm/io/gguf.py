"""GGUF files (llama.cpp's format), read with the gguf package: metadata and tensor table, tensor data on demand."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .weights import CheckpointError

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
        Q = self.gguf.GGMLQuantizationType
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"{self.path} is not a GGUF file")
                r = _Reader(f, size, self.path)
                version = r.scalar(4)
                if version not in (2, 3):
                    raise ValueError(f"{self.path}: GGUF version {version} is not read (2 and 3 are, little-endian)")
                n_tensors, n_kv = r.count(r.scalar(10), 12), r.count(r.scalar(10), 12)
                self.meta = {}
                for _ in range(n_kv):
                    key = r.string()
                    self.meta[key] = r.value(r.scalar(4))
                infos = []
                for _ in range(n_tensors):
                    name, ndim = r.string(), r.scalar(4)
                    if not 1 <= ndim <= 4:
                        raise CheckpointError(f"{self.path}: tensor {name!r}: corrupt header: {ndim} dimensions")
                    ne = [r.scalar(10) for _ in range(ndim)]
                    kind, offset = r.scalar(4), r.scalar(10)
                    try:
                        kind = Q(kind)
                    except ValueError:
                        raise CheckpointError(f"{self.path}: tensor {name!r}: unknown GGML type {kind}") from None
                    infos.append((name, ne[::-1], kind, offset))  # numpy order: ne reversed
                align = self.meta.get("general.alignment", 32)
                if type(align) is not int or align <= 0 or align % 8:
                    raise CheckpointError(f"{self.path}: corrupt header: general.alignment {align!r}")
                start = (f.tell() + align - 1) // align * align
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e}") from e
        self.shapes = {name: shape for name, shape, _, _ in infos}
        self.types = {name: kind for name, _, kind, _ in infos}
        self.offsets = {name: start + offset for name, _, _, offset in infos}
        for name, shape, kind, offset in sorted(infos, key=lambda info: info[3]):
            block, nbytes = self.gguf.GGML_QUANT_SIZES[kind]
            if shape[-1] % block:
                raise CheckpointError(f"{self.path}: tensor {name!r}: {shape[-1]} columns are not whole "
                                      f"{kind.name} blocks of {block}")
            end = start + offset + math.prod(shape) // block * nbytes
            if offset % align:
                raise CheckpointError(f"{self.path}: tensor {name!r}: data offset {offset} is not a multiple of "
                                      f"the alignment {align}")
            if end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r}: file is truncated: its data ends at byte {end} "
                                      f"but the file has {size} bytes")

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


class _Reader:
    """The header's scalars, strings and arrays, each checked to fit in the file."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def take(self, n: int) -> bytes:
        at = self.f.tell()
        if n > self.size - at:
            raise CheckpointError(f"{self.path}: truncated or corrupt header: {n} bytes needed at byte {at}, the file "
                                  f"has {self.size}")
        return self.f.read(n)

    def count(self, n: int, least: int) -> int:
        """n items of at least `least` bytes each, which must fit in the rest of the file."""
        if n * least > self.size - self.f.tell():
            raise CheckpointError(f"{self.path}: corrupt header: {n} entries at byte {self.f.tell()} cannot fit in "
                                  f"a {self.size}-byte file")
        return n

    def scalar(self, kind: int):
        if kind not in SCALARS:
            raise CheckpointError(f"{self.path}: corrupt header: unknown value type {kind} at byte {self.f.tell()}")
        dtype = np.dtype(SCALARS[kind])
        return np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()

    def string(self) -> str:
        return self.take(self.scalar(10)).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            return self.scalar(kind)
        item, n = self.scalar(4), self.scalar(10)
        if item in (STRING, ARRAY):
            return [self.value(item) for _ in range(self.count(n, 8))]
        if item not in SCALARS:
            raise CheckpointError(f"{self.path}: corrupt header: unknown array type {item} at byte {self.f.tell()}")
        dtype = np.dtype(SCALARS[item])
        return np.frombuffer(self.take(self.count(n, dtype.itemsize) * dtype.itemsize), dtype).tolist()
