"""Turn a local path or a Hugging Face hub id into a local model directory."""

from __future__ import annotations

import contextlib
import contextvars
import functools
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


HUB = contextvars.ContextVar("moelm_hub_options", default={})  # the hub arguments of the from_pretrained running


def takes_hub_options(fn):
    """fn also takes transformers' hub arguments, in effect for the model resolutions and downloads inside it:
    cache_dir (the Hugging Face cache to use), local_files_only (no download), token and force_download (passed to
    huggingface_hub's downloads; force_download skips the cache)."""
    @functools.wraps(fn)
    def wrapper(*args, cache_dir=None, local_files_only=False, token=None, force_download=False, **kwargs):
        for name, value in (("local_files_only", local_files_only), ("force_download", force_download)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")
        if token is not None and not isinstance(token, (str, bool)):
            raise TypeError(f"token must be a string or a bool, got {type(token).__name__}")
        outer = HUB.get()
        options = {**outer, **{k: v for k, v in (("cache_dir", cache_dir), ("local_files_only", local_files_only),
                                                 ("token", token), ("force_download", force_download)) if v}}
        with _hub(options):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _hub(options: dict):
    reset = HUB.set(options)
    try:
        yield
    finally:
        HUB.reset(reset)


def _no_download() -> str | None:
    """Why no download is tried (local_files_only, offline mode), or None."""
    if HUB.get().get("local_files_only"):
        return "local_files_only=True, so no download was tried"
    if _offline():
        return "offline mode is set (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE), so no download was tried"
    return None


def hf_cache_dir() -> Path:
    if HUB.get().get("cache_dir"):
        return Path(os.fspath(HUB.get()["cache_dir"])).expanduser()
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
    if name_or_path is None:
        raise ValueError(f"revision={revision!r} applies to hub ids; no model path or hub id was given")
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
    reason = _no_download()
    snap = _cached_snapshot(repo_id, revision, cache, subfolder)
    if snap is not None and (reason or not HUB.get().get("force_download")):
        return snap
    if not reason:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            reason = "huggingface_hub is not installed, so no download was tried"
        else:
            try:
                patterns = [f"{subfolder}/{p}" for p in DOWNLOAD_PATTERNS] if subfolder else DOWNLOAD_PATTERNS
                return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                              allow_patterns=patterns, token=HUB.get().get("token"),
                                              force_download=HUB.get().get("force_download", False))) / subfolder
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
        if cached and (_no_download() or not HUB.get().get("force_download")):
            return cached[-1]
        if not _no_download():
            try:
                from huggingface_hub import hf_hub_download

                return Path(hf_hub_download(repo_id, os.fspath(gguf_file), revision=revision,
                                            cache_dir=str(hf_cache_dir()), token=HUB.get().get("token"),
                                            force_download=HUB.get().get("force_download", False)))
            except Exception as e:  # noqa: BLE001 - any failure: reported as not found, with its reason
                reason = f" (download: {type(e).__name__})"
    where = f" nor in {s!r}" if s else ""
    raise ModelNotFoundError(f"GGUF file {os.fspath(gguf_file)!r} not found: not a file{where}{reason}")
