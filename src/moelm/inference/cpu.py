"""The machine, and choosing between correct paths by measuring them on it.

`info()` reads the CPU's features from /proc/cpuinfo and torch.backends.cpu.get_cpu_capability(), its caches from
sysfs. `choose(op, key, candidates)` times the candidates, keeps the fastest, and remembers it per CPU and version of
this code in the kernel cache directory (choices-*.json beside the compiled kernels): the same machine never measures
the same shape class twice. The callers time a weight's candidates on its first probe_rows() output rows (tens of MB
in fp32, not a 1 GB LM head) and key the choice on that class, so that a first run on a new CPU measures for seconds
in all (said once on stderr), not for minutes. MOELM_KERNELS forces paths: "torch" (PyTorch's own op everywhere),
"gemv" (that path wherever it applies, PyTorch's op elsewhere), or per op family "linear=onednn,experts=torch".
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import json
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..io.files import atomic_write_text

# flags worth reporting, in /proc/cpuinfo's spelling
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    capability: str  # what PyTorch's kernels dispatch to: DEFAULT, AVX2, AVX512, ...
    flags: frozenset = field(repr=False)
    cores: int  # usable by this process
    caches: dict = field(default_factory=dict)  # "L1d" / "L2" / "L3" -> bytes per cache

    def has(self, feature: str) -> bool:
        return feature in self.flags

    @property
    def features(self) -> list[str]:
        return [f for f in FEATURES if f in self.flags]

    @property
    def key(self) -> str:
        """What a measured choice depends on: the CPU, its features, the cores and PyTorch's version."""
        text = "|".join([self.model, self.capability, ",".join(self.features), str(self.cores), torch.__version__])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def line(self) -> str:
        caches = ", ".join(f"{name} {_size(n)}" for name, n in self.caches.items())
        return (f"{self.model} ({self.vendor}); {self.cores} cores; PyTorch capability {self.capability}; "
                f"features {' '.join(self.features) or 'none listed'}"
                + (f"; caches {caches}" if caches else ""))


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


@functools.cache
def info() -> CpuInfo:
    model = vendor = ""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name, value = name.strip(), value.strip()
                if name == "model name" and not model:
                    model = value
                elif name == "vendor_id" and not vendor:
                    vendor = value
                elif name == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CpuInfo(model or platform.processor() or platform.machine(), vendor or "unknown",
                   torch.backends.cpu.get_cpu_capability(), frozenset(flags), cores, _caches())


def _caches() -> dict[str, int]:
    """Sizes of cpu0's caches from sysfs: L1d, L2, L3 (one cache each, not summed over cores)."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        n = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        out[f"L{level}" + ("d" if level == "1" else "")] = n
    return out


def memory() -> tuple[int | None, int]:
    """(resident, peak resident) bytes of this process: VmRSS and VmHWM of /proc/self/status (the peak from
    getrusage where there is no /proc, the resident size None)."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    found[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    if "VmHWM" not in found:
        import resource

        found["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return found.get("VmRSS"), found["VmHWM"]


# ---------------------------------------------------------------- choosing by measurement

_CHOSEN: dict[tuple, str] = {}  # (op, key) -> path: what this process has taken
_FILE: dict[str, str] = {}  # "op|key" -> path: what this CPU chose before (cache_file), looked up on a miss
_LOCK = threading.RLock()  # a candidate may itself choose (quantized experts -> expert_linear)
_loaded = False
MEASURED: list[tuple[str, float, int]] = []  # ("op|key", seconds, depth): what this process measured; a choice
# made inside another's candidate (depth 1) is part of that one's seconds
_MEASURING: list[str] = []  # the choices being measured now, outermost first


def cache_dir() -> Path:
    """Where compiled kernels and measured choices are kept: $MOELM_CACHE/kernels or ~/.cache/moelm/kernels."""
    return Path(os.environ.get("MOELM_CACHE") or Path.home() / ".cache" / "moelm") / "kernels"


@functools.cache
def _code_key() -> str:
    """A hash of the inference code (Python and C): new code, new candidates, so choices are measured anew."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("*.py"), *here.glob("csrc/*.c")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def cache_file() -> Path:
    """The choices of this CPU and code; those made with MOELM_NO_KERNELS set apart, so that neither names a path
    the other cannot take."""
    off = "-nokernels" if os.environ.get("MOELM_NO_KERNELS") else ""
    return cache_dir() / f"choices-{info().key}-{_code_key()}{off}.json"


def _load():
    """The choices this CPU made before, unless MOELM_KERNELS forces paths (then nothing is read or written)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    if forced():
        return
    try:
        _FILE.update(json.loads(cache_file().read_text()))
    except (OSError, ValueError):
        pass


def _save(entry: str, path: str):
    """Adds one choice to the file, atomically (read, merge, write a temporary file, rename)."""
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(target.read_text())
        except (OSError, ValueError):
            known = {}
        known[entry] = path
        atomic_write_text(target, json.dumps(known, indent=0, sort_keys=True))  # its temporary file goes on failure
    except OSError:
        pass  # a read-only cache: choices are measured again by the next process


PATHS: dict[str, tuple[str, ...]] = {}  # op family -> its paths (register)


def register(op: str, paths) -> None:
    """Declare an op family's paths (at import), so that MOELM_KERNELS can be checked against them."""
    PATHS[op] = tuple(paths)


@functools.cache
def forced() -> dict[str, str]:
    """MOELM_KERNELS parsed: {op family or "*": path}; an op or path no family has is a ValueError naming it."""
    spec = os.environ.get("MOELM_KERNELS", "").strip()
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        op, sep, path = (s.strip() for s in part.partition("="))
        op, path = (op, path) if sep else ("*", op)
        if op != "*" and op not in PATHS:
            raise ValueError(f"MOELM_KERNELS names the op {op!r}; the ops are {', '.join(PATHS)}")
        known = PATHS[op] if op != "*" else {p for paths in PATHS.values() for p in paths}
        if path not in known:
            raise ValueError(f"MOELM_KERNELS asks for {path!r} for {op if op != '*' else 'every op'}; "
                             f"the paths are {', '.join(sorted(known))}")
        if op in out and out[op] != path:
            raise ValueError(f"MOELM_KERNELS asks for {out[op]!r} and {path!r} for "
                             f"{op if op != '*' else 'every op'}: one path per op")
        out[op] = path
    return out


def measure(candidates: dict[str, Callable[[], object]], least: int = 3, most: int = 50,
            span: float = 0.05) -> dict[str, float]:
    """Seconds of one call of each candidate: the best over rounds that call every candidate once in turn (so that
    a burst of other work on the machine slows them all alike), after one warm-up round; at least `least` rounds,
    more until `span` seconds have gone by (at most `most`). Other work only slows a call down, so the best is the
    truest."""
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    start, rounds = time.perf_counter(), 0
    while rounds < least or (rounds < most and time.perf_counter() - start < span):
        for name, fn in candidates.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
        rounds += 1
    return best


def chosen(op: str, key: tuple) -> str | None:
    """The path already chosen for op and key on this CPU, or None (then call choose). The hot path: one dict
    lookup once the entry is known to this process."""
    path = _CHOSEN.get((op, key))
    if path is None:
        if not _loaded:
            _load()
        path = _FILE.get(f"{op}|{key}")
        if path is not None:
            _CHOSEN[(op, key)] = path
    return path


def choose(op: str, key: tuple, candidates: dict[str, Callable[[], object]], timer=measure) -> str:
    """The fastest of `candidates` (path -> one call, on the real activations and probe_rows() rows of the
    weight: see probes; "torch", PyTorch's own op, usually among them) for `op` ("family" or "family.variant") on
    this CPU and `key` (the shape class, dtypes, threads): measured once, remembered in memory and in cache_file().
    A path forced by MOELM_KERNELS for the op's family (or for every op) is taken where it is a candidate, PyTorch's
    op (or the first candidate) where it is not; nothing is measured or written then."""
    force = forced()
    want = force.get(op.split(".")[0], force.get("*"))
    entry = f"{op}|{key}"
    with _LOCK:
        _load()
        if want is not None:
            path = want if want in candidates else "torch" if "torch" in candidates else next(iter(candidates))
        else:
            path = _FILE.get(entry)
            if path not in candidates:
                times = _timed(entry, timer, candidates) if len(candidates) > 1 else {}
                if times and not _MEASURING:
                    trim()
                path = min(times, key=times.get) if times else next(iter(candidates))
                _FILE[entry] = path
                _save(entry, path)
        _CHOSEN[(op, key)] = path
        return path


def _timed(entry: str, timer, candidates) -> dict[str, float]:
    """timer(candidates), recorded in MEASURED; the first time in a process, a line on stderr says why it waits."""
    if not MEASURED and not _MEASURING:
        print(f"moelm: timing kernel paths for this CPU (once; remembered in {cache_dir()}) ...", file=sys.stderr,
              flush=True)
    start = time.perf_counter()
    _MEASURING.append(entry)
    try:
        return timer(candidates)
    finally:
        _MEASURING.pop()
        MEASURED.append((entry, time.perf_counter() - start, len(_MEASURING)))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim() -> None:
    """Return the allocator's free memory to the system (glibc's malloc_trim; nothing elsewhere). After timing:
    its candidates' temporaries (tens of MB of fp32 per shape class, see probe_elements) are freed, but glibc keeps
    freed chunks below its grown mmap threshold in its arenas, so each new shape class timed would keep RSS up."""
    lib = _libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)


def measuring() -> tuple[str, ...]:
    """The choices ("op|key") being measured now, outermost first: empty unless their candidates are running."""
    return tuple(_MEASURING)


def pick(op: str, key: tuple, candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """chosen(op, key), or else choose among candidates() (built only then)."""
    return chosen(op, key) or choose(op, key, candidates())


def choices(used_only: bool = False) -> dict[str, str]:
    """The choices known to this CPU ("op|key" -> path), or only those this process has taken."""
    _load()
    taken = {f"{op}|{key}": path for (op, key), path in _CHOSEN.items()}
    return taken if used_only else {**_FILE, **taken}


def reset():
    """Forget the choices in memory and re-read MOELM_KERNELS (tests)."""
    global _loaded
    _CHOSEN.clear()
    _FILE.clear()
    _loaded = False
    forced.cache_clear()


def rows_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: one measurement serves every input length in (bucket / 2, bucket]."""
    return 1 << max(rows - 1, 0).bit_length()


def probe_elements() -> int:
    """The weight elements a candidate is timed on at most: as many as make twice the largest cache in fp32 (what
    the dequantizing and converting paths make of a weight), at least 64 MiB and at most 128 MiB of it. Fewer would
    flatter those paths: their fp32 copy would stay in the caches and come back warm from the allocator, where the
    whole weight's stream from memory into new pages. At most 128 MiB: a virtual machine reports its host socket's
    L3, shared with every other tenant (480 MiB on an Intel Xeon with 2 cores), and probes of twice that made a
    full-size ERNIE-4.5-21B-A3B's first 2048-token prefill measure for 36 s."""
    return min(max(64 << 20, 2 * max(info().caches.values(), default=0)), 128 << 20) // 4


PROBE_MACS = 1 << 33  # multiply-adds of one probe call at most, for many activation rows (see probe_rows)


@functools.lru_cache(maxsize=4096)
def probe_rows(rows: int, features: int, tokens: int = 1) -> int:
    """The output rows that stand for a weight of `rows` rows of `features` elements each, times `tokens` rows of
    activations, in the key of its choice and when timing its candidates (on its first min(rows, probe_rows)
    rows): its rows rounded up to a power of two, at most the power of two whose rows fit in probe_elements().
    Bigger weights share that class: which path is fastest depends on the activations' rows, the input features and
    the format, not on how many more rows of the same kind follow (a 1 GB LM head is timed on 64 MB of it in fp32,
    8 MB in int4). For many tokens also at most PROBE_MACS of work a call (but 256 rows at least): there the
    arithmetic, not the weight's stream, sets the pace, and a 2048-token prompt timed five paths on 2048 x 12288
    weights for 6.5 s."""
    most = 1 << max((probe_elements() // max(features, 1)).bit_length() - 1, 0)
    work = 1 << max((PROBE_MACS // (rows_bucket(tokens) * max(features, 1))).bit_length() - 1, 8)
    return min(rows_bucket(rows), most, work)


def probe_starts(rows: int, n: int) -> Callable[[], int]:
    """The first row of each successive n-row probe of a weight of `rows` rows, for all of a choice's candidates
    together: probes one after another through the weight (wrapping), so that a call reads memory that the last
    calls did not, as one call on the whole weight does (a probe read again would come from the caches)."""
    last = max(rows - n, 0)
    count = max(-(-last // n), 0) + 1  # probes 0, n, 2n, ... and the last one ending at the last row
    calls = itertools.count()
    return lambda: min((next(calls) % count) * n, last)


def probes(names, rows: int, n: int, run: Callable[[str, slice], object]) -> dict[str, Callable[[], object]]:
    """Candidates for choose(): {name: a call of run(name, rows) on the next n of a weight's `rows` rows}."""
    start = probe_starts(rows, n)

    def call(name):
        s = start()
        return run(name, slice(s, s + n))
    return {name: functools.partial(call, name) for name in names}
