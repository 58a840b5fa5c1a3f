"""KV memory of the serving engine: C concurrent chats of P prompt tokens (+ G generated) with --max-model-len L, the
paged pool sized to a fraction of what one contiguous row of L positions per sequence reserved (the engine before
paged KV). The engine runs for real on a tiny random model of the family given its context stretched to L (positions
are what paging saves; bytes per position are the named shape's: 2 * layers * kv heads * head_dim * dtype size),
and the report gives the pool's peak use, preemptions, and what those positions weigh for the named shape.

    python benchmarks/kv_memory.py --shape ernie-4.5-21b-a3b --chats 8 --prompt 2048 --max-model-len 32768
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/kv_memory.py", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="ernie-4.5-21b-a3b", help="a named config: its KV bytes per position")
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument("--fraction", type=float, default=0.25, help="the pool / the contiguous reservation")
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args(argv)
    import tempfile

    from moelm import AutoModelForCausalLM, AutoTokenizer, named_config
    from moelm.models.scaffold import new_checkpoint
    from moelm.serve.engine import Engine, SamplingParams

    shape = named_config(args.shape)
    per_position = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_size * 2  # bf16
    reserved = args.chats * args.max_model_len
    pool_positions = int(reserved * args.fraction)
    with tempfile.TemporaryDirectory() as tmp:
        path = new_checkpoint("ernie4_5_moe-tiny", tmp, seed=0)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.max_position_embeddings = args.max_model_len
    preemptions, peak = [0], [0]

    class Hooks:
        def preempted(self):
            preemptions[0] += 1

        def __getattr__(self, name):
            return lambda *a: None

    engine = Engine(model, tokenizer, max_num_seqs=args.chats, max_model_len=args.max_model_len,
                    block_size=args.block_size, num_blocks=pool_positions // args.block_size, metrics=Hooks(),
                    max_num_batched_tokens=512).start()
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], engine.cache.pool.held())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    g = torch.Generator().manual_seed(0)
    requests = [engine.submit(torch.randint(3, model.config.vocab_size, (args.prompt,), generator=g).tolist(),
                              SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True))
                for _ in range(args.chats)]
    tokens = sum(len(out.token_ids) for r in requests for out in r)
    done.set()
    engine.stop()
    held = peak[0] * args.block_size
    gib = 2 ** 30
    print(f"{args.chats} chats of {args.prompt} + {args.gen} tokens at --max-model-len {args.max_model_len}, "
          f"blocks of {args.block_size}; KV bytes per position of {args.shape}: {per_position} (bf16)\n")
    print("| | positions | GiB for " + args.shape + " |\n|---|---:|---:|")
    print(f"| contiguous rows (before): {args.chats} × {args.max_model_len} | {reserved} | "
          f"{reserved * per_position / gib:.2f} |")
    print(f"| paged pool ({args.fraction:g} of that) | {pool_positions} | {pool_positions * per_position / gib:.2f} |")
    print(f"| held at the peak | {held} | {held * per_position / gib:.2f} |")
    print(f"\n{tokens} tokens generated, {preemptions[0]} preemptions; peak / reservation = {held / reserved:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
