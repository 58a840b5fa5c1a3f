"""The OpenMP wait policy, chosen when moelm is imported (before torch loads libgomp, which reads it once).

libgomp's default keeps idle worker threads spinning for a while after each parallel region: the fastest on cores
nobody else uses, but when other processes share the cores a spinning thread takes their time and a barrier waits
for a descheduled one. Measured on the 2-core EPYC with a compiler running on both cores, ERNIE-0.3B fp32 greedy
decoding: 3.7 tok/s spinning, 5.2 with passive waits (idle: 10.0 vs 9.0). So moelm samples the machine's load for
0.1 s: when other processes keep at least half a core busy, OMP_WAIT_POLICY=PASSIVE. A policy the user set
(OMP_WAIT_POLICY, GOMP_SPINCOUNT) is kept, and nothing changes once torch has been imported.
"""
from __future__ import annotations

import os
import sys
import time

SAMPLE = 0.1  # seconds
BUSY = 0.5  # cores used by other processes from which waits are passive
chosen = "unchanged"  # what choose() did, for the benchmark's report


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies summed over the CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_jiffies() -> int:
    with open("/proc/self/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime + stime


def other_load() -> float | None:
    """Cores' worth of CPU time other processes used over SAMPLE seconds, or None where /proc is not there."""
    first = _busy_jiffies()
    if first is None:
        return None
    own = _own_jiffies()
    time.sleep(SAMPLE)
    second = _busy_jiffies()
    ticks = os.sysconf("SC_CLK_TCK") * SAMPLE
    return max(0.0, (second[0] - first[0]) - (_own_jiffies() - own)) / ticks


def choose() -> str:
    global chosen
    if "torch" in sys.modules or os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"):
        chosen = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')} (set before moelm)"
        return chosen
    load = other_load()
    if load is not None and load >= BUSY:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        chosen = f"OMP_WAIT_POLICY=PASSIVE (other processes used {load:.1f} cores at import)"
    else:
        chosen = "libgomp's default waits (the cores were free at import)"
    return chosen
