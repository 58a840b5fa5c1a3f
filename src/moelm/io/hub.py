"""Turn a local path or a Hugging Face hub id into a local model directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .weights import CheckpointNotFoundError

DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]

_PART = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"({_PART})/({_PART})(?:@([A-Za-z0-9._/-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelNotFoundError(CheckpointNotFoundError):
    """A model is neither a local directory nor available from the Hugging Face hub."""


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _parse_hub_id(s: str) -> tuple[str, str | None] | None:
    m = _HUB_ID.fullmatch(s)
    if m is None or ".." in s:
        return None
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path, subfolder: str = "") -> Path | None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / (revision or "main")
    if revision and _COMMIT.fullmatch(revision):
        snap = snapshots / revision
    elif ref.is_file():
        commit = ref.read_text().strip()
        snap = snapshots / commit if commit and Path(commit).name == commit else None
    elif revision is None and snapshots.is_dir():
        snaps = [p for p in snapshots.iterdir() if p.is_dir()]
        if len(snaps) != 1:
            snaps = sorted((p for p in snaps if (p / subfolder / "config.json").is_file()),
                           key=lambda p: p.stat().st_mtime)
        snap = snaps[-1] if snaps else None
    else:
        snap = None
    return snap / subfolder if snap is not None and (snap / subfolder / "config.json").is_file() else None


def with_revision(name_or_path: str | os.PathLike, revision: str | None) -> str | os.PathLike:
    """A hub id at `revision` (from_pretrained's revision=), for resolve_model_dir; a local path takes none."""
    if revision is None:
        return name_or_path
    if Path(os.fspath(name_or_path)).expanduser().exists():
        raise ValueError(f"revision={revision!r} applies to hub ids; {name_or_path} is a local directory")
    return f"{os.fspath(name_or_path)}@{revision}"


def resolve_model_dir(name_or_path: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local model directory for a path, a path to its config.json, or a hub id (`owner/name[@revision]`);
    with subfolder (from_pretrained's subfolder=), that folder of the directory or of the hub repository."""
    s = os.fspath(name_or_path)
    path = Path(s).expanduser()
    if subfolder:
        if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
            raise ValueError(f"subfolder={subfolder!r} must be a relative path inside the model")
        if path.is_dir():
            if not (path / subfolder).is_dir():
                raise ModelNotFoundError(f"model directory {s!r} has no subfolder {subfolder!r}")
            return (path / subfolder).resolve()
        if path.is_file():
            raise ModelNotFoundError(f"subfolder={subfolder!r} needs a model directory or a hub id, not the file {s!r}")
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        if path.name == "config.json":
            return path.parent.resolve()
        raise ModelNotFoundError(f"model path {s!r} is a file; expected a model directory (or its config.json)")

    parsed = _parse_hub_id(s)
    if parsed is None:
        raise ModelNotFoundError(f"model path {s!r} does not exist")
    repo_id, revision = parsed
    cache = hf_cache_dir()
    subfolder = subfolder or ""
    snap = _cached_snapshot(repo_id, revision, cache, subfolder)
    if snap is not None:
        return snap

    reason = None
    if _offline():
        reason = "offline mode is set (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE), so no download was tried"
    else:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            reason = "huggingface_hub is not installed, so no download was tried"
        else:
            try:
                patterns = [f"{subfolder}/{p}" for p in DOWNLOAD_PATTERNS] if subfolder else DOWNLOAD_PATTERNS
                return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                              allow_patterns=patterns)) / subfolder
            except Exception as e:
                lines = str(e).strip().splitlines()
                reason = f"download failed: {type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    cmd = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "") + \
        (f" --include '{subfolder}/*'" if subfolder else "")
    raise ModelNotFoundError(
        f"model {s!r} is not a local directory and is not in the Hugging Face cache ({cache}); "
        f"{reason}; download it with `{cmd}` or pass a local path")


def resolve_gguf(name_or_path: str | os.PathLike | None, gguf_file: str | os.PathLike) -> Path:
    """from_pretrained(path, gguf_file=...)'s file, as transformers finds it: gguf_file itself when it is a file,
    else that name in the model directory, in the cached hub snapshot or (online) downloaded alone."""
    own = Path(os.fspath(gguf_file)).expanduser()
    if own.is_file():
        return own.resolve()
    s = os.fspath(name_or_path) if name_or_path is not None else ""
    base = Path(s).expanduser()
    if s and base.is_dir() and (base / own).is_file():
        return (base / own).resolve()
    parsed = _parse_hub_id(s) if s and not base.exists() else None
    reason = ""
    if parsed is not None:
        repo_id, revision = parsed
        repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
        cached = sorted(repo.glob(f"*/{own}")) if repo.is_dir() and revision is None else []
        if cached:
            return cached[-1]
        if not _offline():
            try:
                from huggingface_hub import hf_hub_download

                return Path(hf_hub_download(repo_id, os.fspath(gguf_file), revision=revision,
                                            cache_dir=str(hf_cache_dir())))
            except Exception as e:  # noqa: BLE001 - any failure: reported as not found, with its reason
                reason = f" (download: {type(e).__name__})"
    where = f" nor in {s!r}" if s else ""
    raise ModelNotFoundError(f"GGUF file {os.fspath(gguf_file)!r} not found: not a file{where}{reason}")
