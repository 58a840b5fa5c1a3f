"""Safetensors checkpoints: validated reading and atomic sharded writing. Pickle is never used."""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import fsync_dir, fsync_file, locked, make_dir, parse_size, temp_folder

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")]:
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


_MAX_HEADER = 100_000_000  # same limit as the safetensors library


class CheckpointError(ValueError):
    """A checkpoint file is missing, unsupported, truncated or corrupt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A model directory, hub id or config.json does not exist (both a CheckpointError and a FileNotFoundError)."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header without touching tensor data.

    Returns {name: (dtype, shape, byte offset of the data in the file)} plus "__metadata__" if present.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: corrupt header: file is only {size} bytes")
            (n,) = struct.unpack("<Q", raw_len)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt header: header length {n} does not fit in a {size}-byte file "
                    "(truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt header: not valid UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header: expected a JSON object")

    data_size = size - 8 - n
    out: dict = {}
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{path}: corrupt header: __metadata__ must map strings to strings")
        out["__metadata__"] = meta

    def offsets(item):
        info = item[1]
        off = info.get("data_offsets") if isinstance(info, dict) else None
        return off[0] if isinstance(off, list) and off and isinstance(off[0], int) else -1

    # Check in file order so a truncated file reports the first tensor that is cut short.
    last, end = None, 0
    for name, info in sorted(header.items(), key=offsets):
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: corrupt header: entry is not an object")
        dtype, shape, off = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPES:
            raise CheckpointError(f"{where}: unsupported or corrupt dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: corrupt header: bad shape {shape!r}")
        if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off)
                and 0 <= off[0] <= off[1]):
            raise CheckpointError(f"{where}: corrupt header: bad data_offsets {off!r}")
        itemsize = _DTYPES[dtype].itemsize
        if off[1] - off[0] != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{where}: corrupt header: data_offsets {off} hold {off[1] - off[0]} bytes, "
                f"but {dtype}{shape} needs {math.prod(shape) * itemsize}")
        if off[1] > data_size:
            raise CheckpointError(
                f"{where}: file is truncated: tensor data ends at byte {8 + n + off[1]} "
                f"but the file has {size} bytes")
        if off[0] < end and off[1] > off[0]:
            raise CheckpointError(f"{where}: corrupt header: data_offsets {off} overlap those of tensor {last!r}")
        if off[1] > off[0]:
            last, end = name, off[1]
        out[name] = (_DTYPES[dtype], tuple(shape), 8 + n + off[0])
    return out


class SafetensorsCheckpoint:
    """Read-only view of a directory of safetensors files (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        d = self.directory
        if not d.is_dir():
            raise CheckpointError(f"{d}: checkpoint directory does not exist")
        index_path = d / INDEX_NAME
        weight_map: dict[str, str] | None = None
        if (d / SINGLE_NAME).is_file():  # before an index, as transformers
            self.files = [d / SINGLE_NAME]
        elif index_path.is_file():
            weight_map = self._read_index(index_path)
            self.files = [d / f for f in sorted(set(weight_map.values()))]
            for f in self.files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: shard is missing (referenced by {index_path})")
        else:
            self.files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
            if any(_is_ours(f.name) for f in self.files):  # as transformers: shards are read through their index
                raise CheckpointError(f"{d}: shards {self.files[0].name}... without {INDEX_NAME} (an interrupted "
                                      "save?); save the checkpoint again")
        if not self.files:
            pickled = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickled:
                raise CheckpointError(
                    f"{d}: no *.safetensors files, only {', '.join(pickled)}; only safetensors "
                    "checkpoints are supported (pickle-based weights are never loaded). Convert them, "
                    "e.g. load with torch.load(..., weights_only=True) in a trusted environment and "
                    "save with safetensors.torch.save_file, or use a safetensors revision of the model")
            raise CheckpointError(f"{d}: no safetensors checkpoint found ({SINGLE_NAME}, {INDEX_NAME})")

        self._headers = {f: read_header(f) for f in self.files}
        # every tensor of the files (an index's weight_map picks the files, and the file of a tensor in two)
        self._where: dict[str, Path] = {}
        for f, header in self._headers.items():
            for name in header:
                if name == "__metadata__":
                    continue
                if name in self._where and name not in (weight_map or {}):
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {self._where[name]}")
                self._where[name] = f
        for name, fname in (weight_map or {}).items():
            f = d / fname
            if name not in self._headers[f]:
                raise CheckpointError(f"{f}: tensor {name!r} is listed in {index_path} but not in this file")
            self._where[name] = f
        self._keys = sorted(self._where)
        self._handles: dict[Path, object] = {}
        self._slicers: dict[Path, object] = {}  # safetensors' safe_open, for read_slice_into

    @staticmethod
    def _read_index(path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt index: {e}") from e
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{path}: corrupt index: 'weight_map' must map tensor names to file names")
        if not wm:
            raise CheckpointError(f"{path}: corrupt index: 'weight_map' lists no tensors")
        for v in set(wm.values()):
            if Path(v).name != v:
                raise CheckpointError(f"{path}: corrupt index: shard name {v!r} is not a plain file name")
        return wm

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._keys)

    def file_of(self, name: str) -> Path:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.directory}")
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._headers[self.file_of(name)][name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._headers[self.file_of(name)][name][0]

    def metadata(self, file: str | os.PathLike) -> dict[str, str]:
        f = Path(file)
        if f not in self._headers:
            f = self.directory / f.name
        if f not in self._headers:
            raise KeyError(f"{file} is not one of this checkpoint's files")
        return dict(self._headers[f].get("__metadata__", {}))

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, _ = self._headers[self.file_of(name)][name]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out)
        return out

    def mapped(self, name: str, like: torch.Tensor | None = None, least: int = 1 << 20) -> torch.Tensor | None:
        """Tensor `name` as a copy-on-write map of its bytes in the file, or None where it is not mapped: smaller
        than `least` bytes, not aligned to its dtype in the file, or unlike `like` (a CPU tensor of the stored dtype
        and shape that it would replace). The OS reads the pages as they are first touched, counts them in RSS only
        then and shares them with its page cache; writing to the tensor changes this process's copy of a page,
        never the file (MAP_PRIVATE), and a file replaced on disk (save_pretrained writes new files) stays mapped
        as it was."""
        f = self.file_of(name)
        dtype, shape, start = self._headers[f][name]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < max(least, 1) or start % dtype.itemsize or (like is not None and (
                like.device.type != "cpu" or like.dtype != dtype or tuple(like.shape) != shape)):
            return None
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(f, "rb") as handle:
                view = mmap.mmap(handle.fileno(), start - base + nbytes, offset=base, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot map tensor {name!r}: {e}") from e
        # the tensor holds the map; it is unmapped when the tensor (and every view of it) is freed
        return torch.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize, offset=start - base).view(shape)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor `name` into `out` (same shape; any dtype and device).

        The bytes are read with plain file reads, straight into `out` when it is a contiguous CPU tensor of the
        stored dtype: no memory map stays resident and no second copy of the model is ever held."""
        f = self.file_of(name)
        dtype, shape, start = self._headers[f][name]
        if tuple(out.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {list(shape)}, the target {list(out.shape)}")
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=dtype)
        view = memoryview(buf.detach().reshape(-1).view(torch.uint8).numpy())
        try:
            handle = self._handles.get(f)
            if handle is None:
                handle = self._handles[f] = open(f, "rb", buffering=0)
            handle.seek(start)
            done = 0
            while done < len(view):
                n = handle.readinto(view[done:])
                if not n:
                    raise EOFError(f"file ends after {start + done} bytes")
                done += n
        except (OSError, EOFError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {name!r}: {e}") from e
        if not direct:
            with torch.no_grad():
                out.copy_(buf)

    def read_slice_into(self, name: str, index: tuple[slice, ...], out: torch.Tensor) -> None:
        """Copy tensor `name`[index] into `out`, reading only that slice (safetensors' slicing of the mapped file)."""
        from safetensors import safe_open

        f = self.file_of(name)
        try:
            handle = self._slicers.get(f)
            if handle is None:  # opened once per file: its header is parsed once, not once per tensor
                handle = self._slicers[f] = safe_open(f, framework="pt")
            part = handle.get_slice(name)[index]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: cannot read a slice of tensor {name!r}: {e}") from e
        if tuple(part.shape) != tuple(out.shape):
            raise ValueError(f"tensor {name!r}{list(index)} has shape {list(part.shape)}, the target "
                             f"{list(out.shape)}")
        with torch.no_grad():
            out.copy_(part)

    def close(self) -> None:
        handles, self._handles, self._slicers = self._handles, {}, {}  # the slicers close when released
        for h in handles.values():
            h.close()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({str(self.directory)!r}, files={len(self.files)}, tensors={len(self._keys)})"


def _cpu_contiguous(name: str, t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """A CPU tensor that owns its whole storage and shares it with no other tensor in the shard."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    if t.is_meta:
        raise ValueError(f"tensor {name!r} is on the meta device and has no data")
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    storage = t.untyped_storage()
    if (t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() != 0
            or storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen):
        t = t.to("cpu", copy=True, memory_format=torch.contiguous_format)
    if t.data_ptr():
        seen.add(t.data_ptr())
    return t


def _is_ours(name: str) -> bool:
    return name in (SINGLE_NAME, INDEX_NAME) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) is not None


def save_sharded(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None,
) -> list[Path]:
    """Write tensors as model.safetensors or numbered shards plus an index, atomically.

    `extra_files` (name -> text or bytes, e.g. config.json) are written in the same swap, after the weights.

    Only one shard's worth of tensors is held in memory at a time. With `layout` — every tensor's (name, dtype,
    shape), in the order `tensors` yields them, known beforehand — each shard's header is written first and each
    tensor is written as it comes: only one tensor is held. Returns the written file paths.
    """
    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"metadata must map strings to strings, got {metadata!r}")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    directory = make_dir(directory)
    try:
        with temp_folder(directory, ".tmp-save-") as tmp:
            if layout is None:
                shards, total = _write_shards(items, tmp, limit, meta)
            else:
                shards, total = _stream_shards(items, layout, tmp, limit, meta)
            n = len(shards)
            final = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for i, fname in enumerate(final):
                os.replace(tmp / f"part-{i}", tmp / fname)
                os.chmod(tmp / fname, 0o644)  # safetensors creates files 0600; make them readable like config.json
                fsync_file(tmp / fname)
            if n > 1:
                weight_map = {name: fname for fname, shard_names in zip(final, shards) for name in shard_names}
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                fsync_file(tmp / INDEX_NAME)
                final.append(INDEX_NAME)  # moved last, so readers never see an index before its shards
            for fname, content in (extra_files or {}).items():
                if isinstance(content, bytes):
                    (tmp / fname).write_bytes(content)
                else:
                    (tmp / fname).write_text(content, encoding="utf-8")
                os.chmod(tmp / fname, 0o644)
                fsync_file(tmp / fname)
                final.append(fname)
            fsync_dir(tmp)
            with locked(directory):  # one writer at a time swaps its files in
                _move_in(tmp, directory, final)
    except BaseException as e:
        # safetensors' own SafetensorError (disk full while it writes) and OSErrors naming no file or a temporary
        # one: say where
        if type(e).__name__ == "SafetensorError" or isinstance(e, OSError) and (
                e.filename is None or Path(e.filename).parent == directory):
            found = re.search(r"\(os error (\d+)\)", str(e))
            errno = int(found.group(1)) if found else getattr(e, "errno", None)
            text = f"cannot save the checkpoint in {directory}: {os.strerror(errno) if errno else e}"
            raise (OSError(errno, text) if errno else OSError(text)) from e
        raise
    return [directory / f for f in final]


def _move_in(tmp: Path, directory: Path, final: list[str]) -> None:
    """tmp/`final` into `directory` in an order where a reader (moelm or transformers) finds the whole old weights,
    the whole new ones, or no config.json / shards without an index (an error), never a mixture; then an earlier
    save's files go."""
    index, config = directory / INDEX_NAME, directory / "config.json"
    # decided (files read) before anything goes: a failure here (no file descriptors left) leaves the old whole
    drop_index = INDEX_NAME in final and index.exists() and any((directory / f).exists() for f in final
                                                                  if f != INDEX_NAME)
    drop_config = "config.json" in final and config.exists() and \
        config.read_bytes() != (tmp / "config.json").read_bytes()
    if drop_index:
        index.unlink()  # the old index would point at new shards beside old ones
    if drop_config:
        config.unlink()  # nor another config stand beside the new weights
    fsync_dir(directory)
    for fname in final:
        os.replace(tmp / fname, directory / fname)
        if fname == INDEX_NAME:  # the new weights are whole: an old model.safetensors would be read before them
            (directory / SINGLE_NAME).unlink(missing_ok=True)
    fsync_dir(directory)
    # the old index goes first so it never points at deleted shards
    stale = sorted((p for p in directory.iterdir() if _is_ours(p.name) and p.name not in final),
                   key=lambda p: p.name != INDEX_NAME)
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        fsync_dir(directory)


def _write_shards(items, tmp: Path, limit: int, meta: dict) -> tuple[list[list[str]], int]:
    """Shards tmp/part-N, each gathered in memory and written by safetensors; (names per shard, total bytes)."""
    shards: list[list[str]] = []
    names: set[str] = set()
    total = 0
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    seen: set[int] = set()

    def flush() -> None:
        save_file(shard, str(tmp / f"part-{len(shards)}"), metadata=meta)
        shards.append(list(shard))

    for name, t in items:
        if not isinstance(name, str):
            raise ValueError(f"tensor names must be strings, got {name!r}")
        if name in names:
            raise ValueError(f"duplicate tensor name {name!r}")
        names.add(name)
        nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        if shard and shard_bytes + nbytes > limit:
            flush()
            shard, shard_bytes, seen = {}, 0, set()
        shard[name] = _cpu_contiguous(name, t, seen)
        shard_bytes += nbytes
        total += nbytes
    if shard or not shards:
        flush()
    return shards, total


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _stream_shards(items, layout, tmp: Path, limit: int, meta: dict) -> tuple[list[list[str]], int]:
    """Shards tmp/part-N planned from `layout`, each tensor written as `items` yields it (in layout's order)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len({name for name, _, _ in layout}) != len(layout):
        raise ValueError("duplicate tensor names in the layout")
    items = iter(items)
    total = 0
    for i, shard in enumerate(shards):
        header, offset = {"__metadata__": meta}, 0
        for name, dtype, shape in shard:
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(tmp / f"part-{i}", "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape in shard:
                got, t = next(items, (None, None))
                if got != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    what = "nothing" if got is None else f"{got!r} {t.dtype}{list(t.shape)}"
                    raise ValueError(f"tensor {name!r} {dtype}{list(shape)} of the layout came as {what}")
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        total += offset
    if next(items, None) is not None:
        raise ValueError("more tensors than the layout lists")
    return [[name for name, _, _ in shard] for shard in shards], total
