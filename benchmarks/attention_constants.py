"""The decoding attention's constants on this CPU: gemv.c built with other ATT_CHUNK (positions a task merges),
ATT_BLOCK (positions of v converted to fp32 at a time) and ATT_AHEAD (prefetch distance, positions), each build's
attend_f32 / attend_bf16 called in turn over a cold cache (one pool per layer, as a decoding step reads them), rounds
alternating in order and reverse order; median and best microseconds per call, and the median against the build as
shipped. Nothing is changed: a constant is worth changing only where a CPU shows it clearly.

    python benchmarks/attention_constants.py --dtype float32 --heads 20,4,128 --positions 2001
    python benchmarks/attention_constants.py --dtype bfloat16 --heads 32,8,128      # Phi-3.5-MoE's shape
"""
import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from moelm.inference import kernels

VARIANTS = [{}, {"ATT_CHUNK": 128}, {"ATT_CHUNK": 512}, {"ATT_BLOCK": 16}, {"ATT_BLOCK": 64}, {"ATT_AHEAD": 8},
            {"ATT_AHEAD": 16}, {"ATT_AHEAD": 64}]


def build(defines: dict, directory: Path, name: str):
    """gemv.c and the rest compiled as kernels.py compiles them, with -D defines; the attend function's handle."""
    objects = []
    for src in kernels.SOURCES:
        obj = directory / f"{name}_{src.stem}.o"
        subprocess.run(["cc", *kernels.FLAGS, *[f"-D{k}={v}" for k, v in defines.items()], "-c", "-o", str(obj),
                        str(src)], check=True)
        objects.append(str(obj))
    so = directory / f"{name}.so"
    subprocess.run(["cc", *kernels.LINK, "-o", str(so), *objects, *kernels.LIBS], check=True)
    return ctypes.CDLL(str(so))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--heads", default="20,4,128", help="query heads, kv heads, head size (ERNIE-4.5-21B-A3B's)")
    p.add_argument("--positions", type=int, default=2001, help="positions in the cache, the new one included")
    p.add_argument("--layers", type=int, default=28, help="pools, one per layer (cold: read once a round)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    heads, kv_heads, d = map(int, args.heads.split(","))
    dtype = getattr(torch, args.dtype)
    reference = kernels.library()
    with tempfile.TemporaryDirectory() as tmp:
        fns = []
        for i, v in enumerate(VARIANTS):
            lib = build(v, Path(tmp), f"v{i}")
            fn = lib.attend_bf16 if dtype == torch.bfloat16 else lib.attend_f32
            fn.argtypes, fn.restype = reference.attend_f32.argtypes, None
            fns.append(fn)
        t_max, pos = args.positions + 7 & ~7, args.positions - 1
        keys = [torch.randn(1, kv_heads, t_max, d).to(dtype) for _ in range(args.layers)]
        values = [torch.randn(1, kv_heads, t_max, d).to(dtype) for _ in range(args.layers)]
        qkv = torch.randn(1, (heads + 2 * kv_heads) * d)
        cos, sin, out = torch.randn(1, d // 2), torch.randn(1, d // 2), torch.empty(1, heads * d)
        q = qkv.data_ptr()
        k, v = q + heads * d * 4, q + (heads + kv_heads) * d * 4
        times = [[] for _ in VARIANTS]
        for r in range(args.rounds):
            order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                t = time.perf_counter()
                for layer in range(args.layers):
                    fns[i](q, k, v, qkv.stride(0), 1, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(), 1,
                           keys[layer].data_ptr(), values[layer].data_ptr(), t_max, pos, None, 0, None, None, 0,
                           d ** -0.5, out.data_ptr(), args.threads)
                times[i].append((time.perf_counter() - t) / args.layers * 1e6)
    base = statistics.median(times[0])
    print(f"{args.dtype}, heads {heads}/{kv_heads} of {d}, {args.positions} positions, {args.threads} threads")
    for v, ts in zip(VARIANTS, times):
        label = ", ".join(f"{k}={x}" for k, x in v.items()) or "as shipped"
        print(f"{label:16s} median {statistics.median(ts):8.1f} us  best {min(ts):8.1f} us  "
              f"median vs as shipped {statistics.median(ts) / base:.3f}")


if __name__ == "__main__":
    main()
