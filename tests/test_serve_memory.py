"""Memory that must not grow while a server runs: the kernel-choice timing gives its temporaries back."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Twelve new shape classes timed, each candidate making an fp32 copy of up to 32 MB of a bf16 weight (as the
# fp32 paths of matmul and experts do on probe_rows() rows). Without a trim after timing, glibc keeps about one such
# temporary in its arena (its mmap threshold grows to the size of the chunks freed), so RSS stays up by ~32 MB.
CHILD = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from moelm.inference import cpu

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8192, 1024, generator=g).to(torch.bfloat16)
    x = torch.randn(4, 1024, generator=g)
    paths = {"fp32": lambda n: F.linear(x, w[:n].float()), "half": lambda n: F.linear(x.bfloat16(), w[:n]).float()}
    for n in (256, 512):  # the allocator's and PyTorch's first use, before the baseline
        cpu.choose("test", ("warm", n), {k: (lambda f=f, n=n: f(n)) for k, f in paths.items()})
    before = cpu.memory()[0]
    for k in range(12):
        n = 8192 - 192 * k
        cpu.choose("test", (n,), {name: (lambda f=f, n=n: f(n)) for name, f in paths.items()})
    print(cpu.memory()[0] - before, len(cpu.MEASURED))
""")


def test_timing_kernel_choices_gives_its_temporaries_back(tmp_path):
    env = {**os.environ, "MOELM_CACHE": str(tmp_path)}
    env.pop("MOELM_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown, measured = map(int, out.stdout.split())
    assert measured == 14  # every class was timed, none read from a cache
    temporary = 8192 * 1024 * 4  # the largest fp32 copy one candidate makes
    assert grown < temporary // 2, f"RSS grew by {grown / 2**20:.1f} MiB over timing 12 shape classes"
