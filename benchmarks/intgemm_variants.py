"""csrc/intgemm.c's variants alone: GMAC/s of kernels.intgemm on eight expert-sized packed weights (3072 x 2560, int4
group 64 and int8, read from memory: more than the caches hold), 16 / 64 / 256 tokens, best of 3 rounds with the
variants alternating.

    python benchmarks/intgemm_variants.py [threads]
"""
import sys
import time

import torch

from moelm.inference import kernels
from moelm.inference.quantization import quantize

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
n, k, counts = 3072, 2560, (16, 64, 256)
best = {}
for mode, group in (("int4", 64), ("int8", 0)):
    q, s = quantize(torch.randn(n, k) * 0.02, mode, group or 64)
    mats = [(q.clone(), s.clone()) for _ in range(8)]
    for rows in counts:
        x = torch.randn(rows, k)
        for _ in range(3):
            for v in kernels.int_variants():
                t = time.perf_counter()
                for qq, ss in mats:
                    kernels.intgemm(x, qq, ss, group, v)
                rate = rows * n * k * len(mats) / (time.perf_counter() - t) / 1e9
                best[mode, rows, v] = max(best.get((mode, rows, v), 0.0), rate)
for mode in ("int4", "int8"):
    for rows in counts:
        print(mode, rows, "  ".join(f"{v} {best[mode, rows, v]:.0f}" for v in kernels.int_variants()))
