"""GGUF files (llama.cpp's format), read with the gguf package: metadata and tensor table, tensor data on demand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def require_gguf():
    """The gguf package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading or writing GGUF files needs the gguf package: pip install gguf") from None
    return gguf


class GGUFFile:
    """A GGUF's metadata and tensor table (gguf.GGUFReader); tensor data read on demand, one tensor or one slice
    of its first axis (an expert) at a time."""

    def __init__(self, path: str | Path):
        gguf = require_gguf()
        self.path = Path(path)
        reader = gguf.GGUFReader(self.path)
        self.meta = {k: f.contents() for k, f in reader.fields.items() if k not in ARRAYS}
        self.tensors = {t.name: t for t in reader.tensors}
        self.shapes = {n: [int(d) for d in reversed(t.shape)] for n, t in self.tensors.items()}  # numpy order

    def qtype(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def raw(self, name: str, index: int | None = None) -> np.ndarray:
        """The stored bytes, shaped [..., bytes per row] (of row block `index` of the first axis if given)."""
        import gguf

        t = self.tensors[name]
        shape = list(gguf.quant_shape_to_byte_shape(self.shapes[name], t.tensor_type))
        offset = int(t.data_offset)
        if index is not None:
            shape = shape[1:]
            offset += index * int(np.prod(shape))
        return np.fromfile(self.path, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)

    def floats(self, name: str, index: int | None = None) -> np.ndarray:
        """float32 data, dequantized with gguf's reference code (gguf.quants.dequantize)."""
        from gguf.quants import dequantize

        try:
            return dequantize(self.raw(name, index), self.tensors[name].tensor_type)
        except NotImplementedError:
            raise ValueError(f"{self.path.name}: tensor {name} is stored as {self.qtype(name)}, which gguf "
                             "cannot dequantize and moelm does not read") from None

    def float_dtype(self) -> torch.dtype:
        """dtype="auto" as transformers resolves it: BF16 or F16 if the file holds them, else float32."""
        types = {self.qtype(n) for n in self.tensors}
        return torch.bfloat16 if "BF16" in types else torch.float16 if "F16" in types else torch.float32
