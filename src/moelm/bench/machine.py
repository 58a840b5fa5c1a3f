"""The machine a benchmark runs on: its one-line description, memory use (RSS) and streaming-read bandwidth.

The CPU itself (model, features, cores) is probed by moelm.inference.cpu; this module only adds what a benchmark
reports beside it.
"""
from __future__ import annotations

import datetime
import os
import time

import torch


def meminfo(key: str, path: str = "/proc/meminfo") -> int | None:
    """A `Key:   123 kB` line of /proc/meminfo or /proc/self/status, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    from ..inference import cpu

    return cpu.memory()[0]


def peak_rss_bytes() -> int:
    from ..inference import cpu

    return cpu.memory()[1]


def cpu_model() -> str:
    from ..inference import cpu

    return cpu.info().model


def machine_line(threads: int, device: str) -> str:
    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = "not installed"
    ram = meminfo("MemTotal")
    dev = cpu_model() if device == "cpu" else torch.cuda.get_device_name(torch.device(device))
    ram = f"{ram / 2**30:.0f} GiB RAM; " if ram else ""
    return (f"{dev}; {os.cpu_count()} cores, {threads} threads used; {ram}torch {torch.__version__}; "
            f"transformers {tv}; {datetime.date.today().isoformat()}")


def sync(device: torch.device):
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(nbytes: int = 2**30, repeats: int = 10, device: torch.device = torch.device("cpu")) -> float:
    """Streaming-read bandwidth in bytes/s: the best time of `x.sum()` over an fp32 tensor of `nbytes` (the best,
    not the median: a 2-core machine's other work only ever slows a repeat down)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    del x
    return nbytes / min(times)
