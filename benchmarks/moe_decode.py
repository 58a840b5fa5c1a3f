"""MoE decode in one C call (gemv.c moe_block, folded into decode_layer) against the MoE block op by op, on a
2-layer slice of ERNIE-4.5-21B-A3B at its real widths (issue 21, point 4).

    PYTHONPATH=src python benchmarks/moe_decode.py --dtypes int4 int8 --batches 1 8

Both paths run the attention in decode_layer (forced); "op by op" is the MoE block as before (routing in PyTorch,
the chosen experts through the quantized experts' kernels, the shared experts, the sum), "one call" the whole layer
in one C call. The two alternate within each round; the best of the rounds is reported (other work on the machine
only slows a round down). Also the MoE block alone, and bytes of weights read per token against the measured
streaming bandwidth.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("MOELM_KERNELS", "decode_layer=gemv")

import torch  # noqa: E402

from moelm.bench.machine import bandwidth, machine_line  # noqa: E402
from moelm.bench.runner import bench_config, bytes_per_token, time_decode, write_checkpoint  # noqa: E402
from moelm.inference import decode  # noqa: E402
from moelm.models.auto import AutoModelForCausalLM  # noqa: E402

REAL = decode._moe_plan


def use(one_call: bool):
    """The MoE block in the C call (one_call) or op by op; the layer plans are rebuilt."""
    decode._moe_plan = REAL if one_call else (lambda *a: None)
    decode._PLANS.clear()
    decode._MOE_PLANS.clear()


def moe_bytes(model, config) -> int:
    """Bytes of one MoE block read per token at batch 1: router, k of E experts, shared experts."""
    block = model.model.layers[1].mlp
    k, e = config.moe_k, config.moe_num_experts
    total = 0
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        share = k / e if name.startswith("experts.") else 1
        total += t.numel() * t.element_size() * share
    return int(total)


@torch.inference_mode()
def block_time(block, layer, batch: int, rounds: int) -> dict:
    h = torch.randn(batch, 1, block.config.hidden_size)
    x = torch.randn(batch, 1, block.config.hidden_size)
    run = decode.moe_step(block, x, h)
    fns = {"op by op": lambda: layer.__class__.__bases__[0].feed_forward(layer, x, h), "one call": run}
    best = dict.fromkeys(fns, float("inf"))
    for f in fns.values():
        f()
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(5):
                f()
            best[name] = min(best[name], (time.perf_counter() - t) / 5)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", nargs="+", default=["int4", "int8"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dir", default="/tmp/moedecode-ernie21b-2l")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = bench_config("ernie-21b-2l")
    if not (Path(args.dir) / "config.json").is_file():
        write_checkpoint(config, args.dir)
    bw = bandwidth()
    print(machine_line(args.threads, "cpu"))
    print(f"streaming bandwidth {bw / 1e9:.1f} GB/s")
    for dtype in args.dtypes:
        model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32, quantization=dtype).eval()
        read = bytes_per_token(model, config)["bytes_per_token"]
        moe = moe_bytes(model, config)
        print(f"{dtype}: {read / 1e6:.1f} MB of weights per token at batch 1 (the MoE block {moe / 1e6:.1f} MB)")
        layer = model.model.layers[1]
        for batch in args.batches:
            ids = torch.randint(3, config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
            best = {"op by op": float("inf"), "one call": float("inf")}
            for one_call in (False, True):  # warm-up: kernel choices measured, plans built
                use(one_call)
                time_decode(model, ids, 2)
            for _ in range(args.rounds):
                for name, one_call in (("op by op", False), ("one call", True)):
                    use(one_call)
                    best[name] = min(best[name], time_decode(model, ids, args.steps))
            use(True)
            blk = block_time(layer.mlp, layer, batch, args.rounds)
            for name in best:
                line = (f"  {dtype} batch {batch} {name:9s}: decode {batch / best[name]:7.2f} tok/s "
                        f"({best[name] * 1e3:6.2f} ms/step); MoE block alone {blk[name] * 1e3:6.3f} ms")
                if batch == 1:
                    line += (f"; {read / best[name] / 1e9:5.1f} GB/s = {100 * read / best[name] / bw:3.0f}% of "
                             f"streaming (block: {100 * moe / blk[name] / bw:3.0f}%)")
                print(line, flush=True)
        del model


if __name__ == "__main__":
    main()
