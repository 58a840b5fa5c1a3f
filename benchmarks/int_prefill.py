"""Prefill tok/s of a quantized moelm model with the integer prefill paths (csrc/intgemm.c) hidden ("old": the
dequantizing paths, as before issue 21), measured among the rest ("new"), and each forced, alternating in rounds
(best of rounds), and each path's mean next-token KL against "old".

    # a random checkpoint as moelm bench writes it, then old vs new:
    python -c "from moelm.bench.runner import *; write_checkpoint(bench_config('ernie-21b-2l'), '/tmp/e21')"
    python benchmarks/int_prefill.py /tmp/e21 int4 64,256 5
"""
import json
import os
import sys
import time

import torch

import moelm
from moelm.inference import cpu, kernels

ckpt, mode, lens, rounds = sys.argv[1], sys.argv[2], [int(v) for v in sys.argv[3].split(",")], int(sys.argv[4])
torch.set_num_threads(2)
model = moelm.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization=mode).eval()
real = kernels.int_variants


def setmode(m):
    os.environ.pop("MOELM_KERNELS", None)
    kernels.int_variants = list if m == "old" else real
    if m.startswith("int8dot"):
        os.environ["MOELM_KERNELS"] = f"quantized={m}"
    cpu.reset()
    try:  # forced runs read no choices: load them, so that only the forced family differs between modes
        cpu._FILE.update(json.loads(cpu.cache_file().read_text()))
    except OSError:
        pass
    cpu._loaded = True


modes = ["old", "new"] + [f"int8dot_{v}" for v in real()]
for n in lens:
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    best = dict.fromkeys(modes, float("inf"))
    logits, chosen = {}, None
    with torch.inference_mode():
        for m in modes:  # warm-up: measures the choices of old / new
            setmode(m)
            logits[m] = model(input_ids=ids, use_cache=False).logits[0].float()
        for _ in range(rounds):
            for m in modes:
                setmode(m)
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                best[m] = min(best[m], time.perf_counter() - t)
                if m == "new" and chosen is None:
                    chosen = sorted({v for k, v in cpu.choices(True).items() if k.startswith("quantized")})
    p = logits["old"].log_softmax(-1)
    kl = {m: float((p.exp() * (p - logits[m].log_softmax(-1))).sum(-1).mean()) for m in modes}
    print(f"{mode} {n} tok: " + "  ".join(f"{m} {n / best[m]:.1f} tok/s" for m in modes)
          + f"  | new/old {best['old'] / best['new']:.2f}x | new chose {chosen} | KL vs old "
          + " ".join(f"{m}={kl[m]:.1e}" for m in modes if m != "old"), flush=True)
