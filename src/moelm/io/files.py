"""Files written atomically (a temporary file in the same folder, fsync, rename, fsync of the folder), folders
locked, swapped and made for a writer (those of killed writers swept), and sizes given as "5GB" / "2GiB"."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: folders are not locked
    fcntl = None

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(s: int | str) -> int:
    """Bytes from an int or a string like "5GB" (1000-based), "2GiB" (1024-based) or "100"."""
    if isinstance(s, int) and not isinstance(s, bool):
        if s <= 0:
            raise ValueError(f"size must be positive, got {s!r}")
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", s) if isinstance(s, str) else None
    if m is None or m.group(2).upper() not in _UNITS:
        raise ValueError(f"invalid size {s!r}; expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {s!r}")
    return n


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_HELD: set[tuple[int, int]] = set()  # the folders this process holds locked


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock (flock) on a folder for the block (already held by this process: nothing more); the
    system drops it when its process dies."""
    fd = os.open(path, os.O_RDONLY)
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    try:
        if key in _HELD:
            yield
            return
        with contextlib.suppress(OSError, AttributeError):  # a file system (or system) without locks: unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)


def remove_stale(directory: Path, pattern: str) -> None:
    """The folders `pattern` in `directory` that no process holds locked (left by a killed writer)."""
    for path in directory.glob(pattern):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (OSError, AttributeError):
            continue  # its writer is alive (or nothing tells: left alone)
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def temp_folder(directory: Path, prefix: str):
    """A new folder `prefix`* in `directory` for the block, then removed; locked meanwhile, so that the next
    writer removes those that killed writers left."""
    with contextlib.ExitStack() as stack:
        with locked(directory):
            remove_stale(directory, f"{prefix}*")
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stay on a folder swapped into place
            stack.enter_context(locked(tmp))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def swap_dirs(new: Path, target: Path) -> None:
    """Folder `new` becomes `target`. An existing target is exchanged with it in one step (renameat2) where the
    system can, else renamed aside first; either way the old one, now at `new`, is then removed."""
    if target.exists():
        try:
            exchange = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        except (OSError, TypeError):  # no C library to ask (Windows)
            exchange = None
        if exchange is None or exchange(-100, bytes(new), -100, bytes(target), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
            aside = new.with_name(new.name + "-old")
            target.rename(aside)
            new.rename(target)
            new = aside
        fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # what a kill leaves here, the next writer sweeps
    else:
        new.rename(target)
        fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def atomic_write_files(directory: str | os.PathLike, files: dict[str, str | bytes]) -> list[Path]:
    """`files` (name -> text or bytes) into `directory` (made): all written to a temporary folder in it, then renamed
    into place, so that a full disk leaves the old ones whole, not some old and some new; their paths."""
    directory = make_dir(directory)
    with writing(directory), temp_folder(directory, ".tmp-files-") as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
            os.chmod(tmp / name, 0o644)
            fsync_file(tmp / name)
        for name in files:
            os.replace(tmp / name, directory / name)
    fsync_dir(directory)
    return [directory / name for name in files]


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """The block writes `path`: an error of the file system in it (an OSError, or safetensors' "... (os error N)")
    becomes an OSError naming `path` and the cause ("No space left on device"), whatever temporary file it was
    at; other errors pass as they are."""
    try:
        yield
    except Exception as e:
        code = e.errno if isinstance(e, OSError) else None
        if type(e).__name__ == "SafetensorError":
            found = re.search(r"os error (\d+)", str(e))
            code = int(found.group(1)) if found else None
            if code is None:
                raise OSError(f"cannot write {path}: {e}") from e
        if not code:
            if isinstance(e, OSError):  # numpy's short write: no errno
                raise OSError(f"cannot write {path}: {e}") from e
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def make_dir(path: str | os.PathLike) -> Path:
    """Path(path).mkdir(parents=True, exist_ok=True); a file or a dangling symbolic link in its place is an error
    saying so (mkdir's says "File exists")."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        what = f"a symbolic link to {os.readlink(path)}, which does not exist" if path.is_symlink() \
            else "Not a directory"
        raise NotADirectoryError(errno.ENOTDIR, what, str(path)) from None
    return path
