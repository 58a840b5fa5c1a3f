"""Side-by-side speed benchmark of moelm and transformers on random-weight models built from named configs.

The command line of runner.run (`moelm bench`, `python benchmarks/run.py`); its tables come from report.

    python benchmarks/run.py --model ernie-0.3b --dtype float32 --prompt-lens 256 --decode-tokens 16 --batches 1 8
    moelm bench --model ernie-21b-2l --dtype float32 --batches 1 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import os

import torch

from .report import markdown_section, paths_report, table
from .runner import BENCH_MODELS, run

FULL_SIZE = ("ernie-4.5-21b-a3b", "phi-3.5-moe")  # only with --full-size: never loaded in float in one process


def _full_size(args) -> int:
    from . import fullsize

    if not args.full_size or args.model not in FULL_SIZE:
        raise ValueError(f"--full-size takes --model {' or '.join(FULL_SIZE)}; {args.model} "
                         + ("needs --full-size" if args.model in FULL_SIZE else "is a slice: drop --full-size"))
    if args.dtype not in ("int4", "int8") or not args.workdir:
        raise ValueError("--full-size needs --dtype int4 or int8 and --workdir (tens of GB are written there)")
    argv = ["run", "--model", args.model, "--dtype", args.dtype, "--workdir", args.workdir, "--rounds",
            str(args.rounds or 2), "--group-size", str(args.group_size or 32),
            "--threads", str(args.threads or os.cpu_count() or 1), "--prompt-lens",
            *map(str, args.prompt_lens), "--batches", *map(str, args.batches), "--decode-tokens",
            str(args.decode_tokens), "--decode-context", str(args.decode_context), "--reload"]
    if args.peer is None:
        argv.append("--no-peer")
    if args.layers is not None:
        argv += ["--layers", str(args.layers)]
    if args.markdown:
        argv += ["--markdown", args.markdown]
    return fullsize.main(argv)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", default="ernie-0.3b", choices=[*BENCH_MODELS, *FULL_SIZE])
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
    p.add_argument("--full-size", action="store_true",
                   help=f"{' / '.join(FULL_SIZE)} at full size: a random int4/int8 checkpoint and its GGUF written "
                        "once to --workdir, moelm and llama.cpp timed in alternating fresh processes (bench.fullsize)")
    p.add_argument("--workdir", default=None, help="--full-size: where the checkpoint and GGUF are written and kept")
    p.add_argument("--rounds", type=int, default=None,
                   help="--full-size: rounds of (moelm, llama.cpp) processes (default 2)")
    p.add_argument("--group-size", type=int, default=None,
                   help="--full-size: int4 group size (default 32: the GGUF's q4_0 blocks hold moelm's own codes)")
    p.add_argument("--layers", type=int, default=None,
                   help="--full-size: only the model's first N decoder layers, at full width (where the whole model "
                        "does not fit in memory, as Phi-3.5-MoE on 24 GB)")


def check_numbers(args):
    """Counts below 1 are a ValueError naming the option."""
    for name in ("prompt_lens", "batches", "decode_tokens", "decode_context", "repeats", "threads", "rounds",
                 "group_size", "layers"):
        for value in getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]:
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def main_from_args(args) -> int:
    check_numbers(args)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"unknown --device {args.device!r}; expected cpu, cuda or cuda:N")
    if args.layers is not None and not args.full_size:
        raise ValueError("--layers is for --full-size runs (the slices have their own --model names)")
    for name in ("workdir", "rounds", "group_size"):
        if getattr(args, name) is not None and not args.full_size:
            raise ValueError(f"--{name.replace('_', '-')} is for --full-size runs")
    if args.full_size or args.model in FULL_SIZE:
        return _full_size(args)
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
