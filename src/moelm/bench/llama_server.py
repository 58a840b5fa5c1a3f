"""llama.cpp's own `llama-server` as a serving peer, built from the llama.cpp source that the llama-cpp-python sdist
vendors: `pip download` fetches the sdist from the package registry (nothing else is downloaded), cmake builds the
one target for this CPU (-DGGML_NATIVE=ON), and the binary is kept in moelm's cache, keyed by the sdist's version and
the CPU, so later runs start at once.

    path = llama_server.binary()            # builds on the first call (minutes), then cached
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..inference import cpu

DEFAULT_VERSION = "0.3.36"  # the llama-cpp-python release the bench extra pins at least


def version() -> str:
    """The installed llama-cpp-python's version (its sdist vendors the llama.cpp it runs), else DEFAULT_VERSION."""
    try:
        from importlib.metadata import version as installed

        return installed("llama-cpp-python")
    except Exception:  # noqa: BLE001 - not installed
        return DEFAULT_VERSION


def binary(version_: str | None = None, log=lambda *a: None) -> Path:
    """The path of llama-server built from llama-cpp-python `version_`'s sdist, building it if not cached; raises
    RuntimeError naming the step that failed (no cmake, no compiler, the download, the build)."""
    version_ = version_ or version()
    info = cpu.info()
    key = hashlib.sha256(f"{version_}|{info.model}|{' '.join(sorted(info.flags))}".encode()).hexdigest()[:16]
    target = cpu.cache_dir() / "llama-server" / key / "llama-server"
    if target.is_file():
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama-server needs {tool}, which is not installed")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        log(f"llama-server: downloading the llama-cpp-python {version_} sdist")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-d", str(tmp), f"llama-cpp-python=={version_}"], "pip download")
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"), None)
        if sdist is None:
            raise RuntimeError(f"pip download gave no llama-cpp-python {version_} sdist")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = tmp / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log("llama-server: building (cmake, this CPU's features; a few minutes)")
        _run(["cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"], "cmake configure")
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
             "cmake build")
        built = next(build.rglob("llama-server"), None)
        if built is None or not built.is_file():
            raise RuntimeError("the build produced no llama-server binary")
        os.replace(built, target)  # atomic: a concurrent run sees the whole binary or none
    return target


def _run(cmd: list[str], step: str):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"llama-server: {step} failed: {' / '.join(tail)[:600]}")
