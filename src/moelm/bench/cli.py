"""Side-by-side speed benchmark of moelm and transformers on random-weight models built from named configs.

The command line of runner.run (`moelm bench`, `python benchmarks/run.py`); its tables come from report.

    python benchmarks/run.py --model ernie-0.3b --dtype float32 --prompt-lens 256 --decode-tokens 16 --batches 1 8
    moelm bench --model ernie-21b-2l --dtype float32 --batches 1 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse

import torch

from .report import markdown_section, paths_report, table
from .runner import BENCH_MODELS, run


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", default="ernie-0.3b", choices=list(BENCH_MODELS))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "int8", "int4"),
                   help="int8/int4: moelm's quantized weights against moelm float32 (and their mean KL)")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[256])
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--decode-context", type=int, default=64, help="tokens in the KV cache before decoding")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-transformers", action="store_true", help="measure moelm only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--peer", default=None, choices=("llama.cpp",),
                   help="also time llama.cpp (llama-cpp-python) on the same weights as GGUF in the matching format")
    p.add_argument("--markdown", default=None, help="append a section with the machine line and table to this file")


def main_from_args(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device} requested but no CUDA GPU is available")
    result = run(model=args.model, dtype=args.dtype, prompt_lens=args.prompt_lens, decode_tokens=args.decode_tokens,
                 batches=args.batches, repeats=args.repeats, threads=args.threads,
                 transformers=not args.no_transformers, device=args.device, decode_context=args.decode_context,
                 peer=args.peer)
    print(f"\n{result['model']} {result['dtype']} — {result['machine']}\nCPU: {result['cpu']}\n")
    print(table(result))
    print(f"\npaths chosen:\n{paths_report(result['paths'])}")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(markdown_section(result))
        print(f"\nappended to {args.markdown}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moelm-bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))
