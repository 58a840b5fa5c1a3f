"""Training speed and memory on the CPU: one training step (forward, backward, gradient clipping, AdamW) of moelm
(its trainer's choices: fused AdamW) against transformers + torch.optim.AdamW (its default per-tensor loop, and
with fused=True), full-parameter or LoRA (moelm's native LoRA against peft's, with
`target_parameters` for the stacked experts), on the same random checkpoint and the same batch. Each run is its own
process (so its peak RSS is its own), and runs alternate between the two, so a drift of the host's speed hits both
alike. Figures: tokens/s (best step after a warm-up step) and peak RSS.

    python benchmarks/train_cpu.py --shape moe21b --mode full --rounds 2
    python benchmarks/train_cpu.py --shape ernie0.3b --mode lora

Shapes: ernie0.3b (ERNIE-4.5-0.3B), moe21b (ERNIE-4.5-21B-A3B's dimensions, 2 layers: one dense, one MoE with 64
experts of which 6 chosen + 2 shared; vocabulary cut to 32000 so that AdamW's states fit 24 GiB)."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"ernie0.3b": ("ernie-4.5-0.3b", {}),
          "moe21b": ("ernie-4.5-21b-a3b", {"num_hidden_layers": 2, "vocab_size": 32000})}
ENGINES = ("moelm", "transformers", "transformers-fused")
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_checkpoint(shape: str, path: Path):
    from moelm import AutoModelForCausalLM
    from moelm.config import named_config

    name, overrides = SHAPES[shape]
    config = named_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config, seed=0, fast=False).save_pretrained(path)


def build(engine: str, path: str, mode: str):
    import torch

    if engine == "moelm":
        from moelm import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, fast=False)
        if mode == "lora":
            from moelm.train.lora import LoraConfig, apply_lora

            experts = LORA_EXPERTS if getattr(model.config, "num_experts", None) else []
            apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_MODULES, target_parameters=experts))
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if mode == "lora":
            import peft

            experts = LORA_EXPERTS if hasattr(model.config, "moe_num_experts") else []
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_MODULES,
                                                               target_parameters=experts))
    model.train()
    return model


def step(engine: str, model, ids, optimizer, params, moe: bool):
    import torch

    if engine == "moelm":
        from moelm.models.modeling import causal_lm_loss

        out = model(input_ids=ids, use_cache=False, output_router_logits=moe)
        loss = causal_lm_loss(out.logits, ids)
        if moe:
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    else:
        out = model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=moe)
        loss = out.loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def worker(engine: str, path: str, mode: str, batch: int, seq: int, steps: int) -> dict:
    import torch

    model = build(engine, path, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if engine in ("moelm", "transformers-fused") else {}
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **fused)
    config = model.config
    moe = bool(getattr(config, "moe_num_experts", None) or getattr(config, "num_experts", None))
    ids = torch.randint(10, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    losses, best = [], float("inf")
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        losses.append(step(engine, model, ids, optimizer, params, moe))
        if i:
            best = min(best, time.perf_counter() - start)
    return {"tokens_per_s": batch * seq / best, "step_s": best, "first_loss": losses[0],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trainable": sum(p.numel() for p in params)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="moe21b")
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="reuse this random checkpoint directory")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.mode, args.batch, args.seq, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint or Path(tmp) / args.shape)
        if not (path / "config.json").exists():
            make_checkpoint(args.shape, path)
        results = {engine: [] for engine in ENGINES}
        for _ in range(args.rounds):
            for engine in results:
                cmd = [sys.executable, __file__, "--worker", engine, "--checkpoint", str(path), "--mode", args.mode,
                       "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{engine} failed:\n{out.stderr[-3000:]}")
                results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(engine, results[engine][-1], file=sys.stderr, flush=True)
    best = {e: max(r, key=lambda x: x["tokens_per_s"]) for e, r in results.items()}
    ours = best["moelm"]["tokens_per_s"]
    cells = [f"{best[e]['tokens_per_s']:.1f}" + ("" if e == "moelm" else f" ({ours / best[e]['tokens_per_s']:.2f}x)")
             for e in ENGINES]
    rss = [f"{max(r['peak_rss_gib'] for r in results[e]):.2f}" for e in ENGINES]
    print(f"| {args.shape} | {args.mode} | {args.batch}x{args.seq} | " + " | ".join(cells) + " | " + " / ".join(rss)
          + " |")

if __name__ == "__main__":
    main()
