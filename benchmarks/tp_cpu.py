"""Tensor parallelism on one CPU: TP=2 in two processes (torchrun, gloo, one thread each) against one process with
two threads, each with plain modules and with moelm's fast paths, on a random checkpoint of a named shape (default ERNIE-4.5-0.3B,
fp32). Runs alternate between the setups, so a drift of the host's speed hits each alike. Each run: a prefill of
--prompt tokens (best of 3), then greedy decoding of --new tokens with the static cache; figures are tokens/s.

    python benchmarks/tp_cpu.py --model ernie-4.5-0.3b --rounds 2

A report of what TP costs and gives here, with no target: TP pays where a rank's link is fast next to its compute
(GPUs with NVLink), not between two cores of one CPU."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(path: str, prompt: int, new: int, fast: bool, layout: bool) -> dict:
    import torch

    from moelm import AutoModelForCausalLM

    kwargs = {"tp_plan": "auto", "fast": fast} if layout else {"fast": fast}
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", **kwargs)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        decode = time.perf_counter() - start - best  # the generate call's prefill taken out
    assert out.shape[1] == prompt + new
    return {"prefill_tok_s": prompt / best, "decode_tok_s": new / decode}


def worker(args):
    """One rank of a torchrun launch, or the single process."""
    import torch

    torch.set_num_threads(args.threads)
    result = measure(args.path, args.prompt, args.new, args.fast, args.tp)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result), flush=True)


def run(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ernie-4.5-0.3b")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from moelm.models.scaffold import new_checkpoint

    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--prompt", str(args.prompt), "--new",
          str(args.new)]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(new_checkpoint(args.model, tmp, seed=0))
        me += ["--path", path]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        setups = {
            "1 process, 2 threads, fast paths": me + ["--threads", "2", "--fast"],
            "1 process, 2 threads, plain modules": me + ["--threads", "2"],
            "TP=2: 2 processes x 1 thread, fast paths": None,
            "TP=2: 2 processes x 1 thread, plain modules": None,
        }
        results = {name: [] for name in setups}
        for _ in range(args.rounds):
            for name, cmd in setups.items():
                if cmd is None:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        port = s.getsockname()[1]
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(port)] + me[1:] + ["--threads", "1",
                                                                                              "--tp"]
                    cmd += ["--fast"] if "fast" in name else []
                results[name].append(run(cmd, env))
        for name, runs in results.items():
            best = {k: max(r[k] for r in runs) for k in runs[0]}
            print(f"{name:40s} prefill {best['prefill_tok_s']:8.1f} tok/s   decode {best['decode_tok_s']:6.2f} tok/s")


if __name__ == "__main__":
    main()
