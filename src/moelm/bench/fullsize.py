"""The full-size benchmark: a real-size random checkpoint written straight in a quantized format, moelm and llama.cpp
each timed in fresh processes, alternating, in one time window.

    moelm bench --model ernie-4.5-21b-a3b --full-size --dtype int4 --workdir /data/bench

Both libraries cannot sit in one process at full size (21B-A3B in int4 is ~12 GB each, on a 24 GB machine), so every
measurement is a child process (`python -m moelm.bench.fullsize child ...`) that loads the model, measures and
exits; the rounds alternate moelm, llama.cpp, moelm, ... The checkpoint is `moelm new NAME --quantization`'s
(compressed-tensors, int4 in groups of 32 or int8, written one tensor at a time: never a float copy of the model),
and the GGUF holds the same codes (q4_0 blocks are moelm's int4 groups of 32, q8_0 blocks carry each row's int8
scale; the scales rounded to fp16; the token embedding, a float tensor in the checkpoint, is quantized by gguf).
The first moelm child runs with an empty kernel cache: its first decode is what a new user's first run costs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .machine import bandwidth, machine_line, peak_rss_bytes, rss_bytes


def prepare(model: str, mode: str, workdir: Path, log=print, group_size: int = 32, peer: bool = True,
            layers: int | None = None) -> tuple[Path, Path | None]:
    """(checkpoint dir, GGUF path or None without the peer) in workdir, written once (kept for later runs: delete
    workdir when done). int4 in groups other than 32: the GGUF is q4_0 of the dequantized weights (other codes).
    layers: only the model's first `layers` decoder layers, at full width (where the whole model does not fit)."""
    from ..inference.quantization import QuantizationConfig
    from ..models.scaffold import new_checkpoint
    from . import gguf

    ckpt = workdir / (f"{model}-{mode}" + (f"-g{group_size}" if mode == "int4" and group_size != 32 else "")
                      + (f"-{layers}l" if layers else ""))
    if not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        new_checkpoint(model, ckpt, quantization=QuantizationConfig(mode, group_size=group_size), layers=layers)
        log(f"wrote {ckpt} in {time.perf_counter() - t:.0f} s")
    path = workdir / f"{ckpt.name}-{gguf.FORMATS[mode]}.gguf".replace(f"-{mode}-", "-")
    if not peer:
        return ckpt, None
    if not path.is_file():
        t = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        gguf.write_gguf(ckpt, tmp, gguf.FORMATS[mode])
        os.replace(tmp, path)
        log(f"wrote {path} in {time.perf_counter() - t:.0f} s")
    return ckpt, path


# ---------------------------------------------------------------- one measurement process each

def _ids(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def child_moelm(path: str, prompt_lens: list[int], batches: list[int], steps: int, context: int, reload: bool) -> dict:
    """Load (twice with `reload`: the second from a warmer page cache), then the first decode of this process
    (kernel choices measured if the cache is empty), prefill per length (one warm-up at the first length; a later
    length's first call is timed, its kernel choices measured in the first process), decode per batch."""
    from ..inference import kernels
    from ..models.auto import AutoModelForCausalLM
    from .runner import bytes_per_token, time_decode, time_prefill

    out = {}
    t = time.perf_counter()
    kernels.library()
    out["compile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    out["load_s"] = time.perf_counter() - t
    if reload:
        del model
        gc.collect()
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path)
        out["load_warm_s"] = time.perf_counter() - t
    out["rss_gb"], out["peak_rss_gb"] = rss_bytes() / 1e9, peak_rss_bytes() / 1e9
    out["bytes_per_token"] = bytes_per_token(model, model.config)["bytes_per_token"]
    vocab = model.config.vocab_size
    t = time.perf_counter()
    first = time_decode(model, _ids(1, context, vocab, 1), steps)
    out["first_decode_b1_tok_s"] = 1 / first
    out["first_decode_wall_s"] = time.perf_counter() - t
    for n, p in enumerate(prompt_lens):  # one untimed warm-up, at the first length only (long prompts are slow)
        ids = _ids(1, p, vocab, 2)
        if n == 0:
            time_prefill(model, ids)
        out[f"prefill_{p}_tok_s"] = p / time_prefill(model, ids)
    for b in batches:
        out[f"decode_b{b}_tok_s"] = b / time_decode(model, _ids(b, context, vocab, 3), steps)
    out["peak_rss_end_gb"] = peak_rss_bytes() / 1e9
    return out


def child_llama(path: str, prompt_lens: list[int], batches: list[int], steps: int, context: int, threads: int
                ) -> dict:
    from . import llamacpp

    out = {}
    t = time.perf_counter()
    m = llamacpp.LocalModel(path, threads, n_ctx=max(512, *prompt_lens, context + steps + 4),  # its own process
                               n_batch=max(prompt_lens))
    out["load_s"] = time.perf_counter() - t
    out["rss_gb"], out["peak_rss_gb"] = rss_bytes() / 1e9, peak_rss_bytes() / 1e9
    vocab = m.n_vocab
    for n, p in enumerate(prompt_lens):
        ids = _ids(1, p, vocab, 2)[0].tolist()
        if n == 0:
            m.prefill(ids)
        out[f"prefill_{p}_tok_s"] = p / m.prefill(ids)
    for b in batches:
        ctx = _ids(b, context, vocab, 3).tolist()
        out[f"decode_b{b}_tok_s"] = (1 / m.decode(ctx[0], steps) if b == 1 else b / m.decode_batch(ctx, steps))
    out["peak_rss_end_gb"] = peak_rss_bytes() / 1e9
    m.close()
    out["info"] = llamacpp.build_info()
    return out


def _child(kind: str, path: Path, args, env: dict, log) -> dict:
    cmd = [sys.executable, "-m", "moelm.bench.fullsize", "child", kind, str(path), "--threads", str(args.threads),
           "--prompt-lens", *map(str, args.prompt_lens), "--batches", *map(str, args.batches),
           "--decode-tokens", str(args.decode_tokens), "--decode-context", str(args.decode_context)]
    if args.reload:
        cmd.append("--reload")
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t
    log(f"{kind}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                                if k != "info"))
    return result


def run(args, log=print) -> dict:
    """Prepare the files, then `rounds` of (moelm child, llama.cpp child); the first moelm child with an empty
    kernel cache (its first decode: a new user's first run)."""
    from ..inference import cpu

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, path = prepare(args.model, args.dtype, workdir, log, args.group_size, not args.no_peer, args.layers)
    bw = bandwidth(2**30)
    log(f"streaming-read bandwidth: {bw / 1e9:.1f} GB/s")
    results = {"moelm": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory(prefix="moelm-cold-") as cold:
        for r in range(args.rounds):
            env = {"MOELM_CACHE": cold}  # round 0 measures the kernel choices; later rounds reuse them
            results["moelm"].append(_child("moelm", ckpt, args, env, log))
            if not args.no_peer:
                results["llama.cpp"].append(_child("llama", path, args, {}, log))
    return dict(machine=machine_line(args.threads, "cpu"), cpu=cpu.info().line(), bandwidth=bw, model=args.model,
                layers=args.layers, dtype=args.dtype, results=results, checkpoint_gb=_size(ckpt),
                gguf_gb=path.stat().st_size / 1e9 if path else None, group_size=args.group_size,
                prompt_lens=args.prompt_lens, batches=args.batches)


def _size(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moelm.bench.fullsize", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "child"):
        q = sub.add_parser(name)
        if name == "child":
            q.add_argument("kind", choices=("moelm", "llama"))
            q.add_argument("path")
        else:
            q.add_argument("--model", default="ernie-4.5-21b-a3b")
            q.add_argument("--dtype", default="int4", choices=("int4", "int8"))
            q.add_argument("--workdir", required=True)
            q.add_argument("--rounds", type=int, default=2)
            q.add_argument("--no-peer", action="store_true")
            q.add_argument("--layers", type=int, default=None,
                           help="only the model's first N decoder layers, at full width (what fits in memory)")
            q.add_argument("--group-size", type=int, default=32,
                           help="int4 group size (32: the GGUF holds the same codes)")
            q.add_argument("--json", default=None, help="write the results here")
            q.add_argument("--markdown", default=None, help="append a section with the machine line and table")
        q.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        q.add_argument("--prompt-lens", type=int, nargs="+", default=[256, 2048])
        q.add_argument("--batches", type=int, nargs="+", default=[1, 8])
        q.add_argument("--decode-tokens", type=int, default=16)
        q.add_argument("--decode-context", type=int, default=64)
        q.add_argument("--reload", action="store_true", help="moelm: load twice, the second from a warm page cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "child":
        with torch.inference_mode():
            if args.kind == "moelm":
                out = child_moelm(args.path, args.prompt_lens, args.batches, args.decode_tokens, args.decode_context,
                                  args.reload)
            else:
                out = child_llama(args.path, args.prompt_lens, args.batches, args.decode_tokens, args.decode_context,
                                  args.threads)
        print(json.dumps(out))
        return 0
    result = run(args, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    print(markdown(result))
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(markdown(result))
    return 0


ROWS = [  # (result key, label, unit, format)
    ("load_s", "load (first in the process)", "s", ".1f"), ("load_warm_s", "load again (page cache warm)", "s", ".1f"),
    ("rss_gb", "RSS after load", "GB", ".2f"), ("peak_rss_end_gb", "peak RSS", "GB", ".2f"),
    ("first_decode_b1_tok_s", "decode b1, first in the process", "tok/s", ".2f"),
]


def markdown(result: dict) -> str:
    """A docs/benchmarks.md section: per measurement, moelm's first process (empty kernel cache), its later
    processes and llama.cpp's (medians over rounds)."""
    import statistics

    runs = result["results"]
    columns = {"moelm, first process": runs["moelm"][:1], "moelm, later": runs["moelm"][1:],
               "llama.cpp": runs["llama.cpp"]}
    columns = {k: v for k, v in columns.items() if v}

    def cell(rs, key, fmt):
        vals = [r[key] for r in rs if key in r]
        return format(statistics.median(vals), fmt) if vals else "—"
    width = f"its first {result['layers']} layers at full width" if result.get("layers") else "full size"
    lines = [f"\n## {result['model']} {width}, {result['dtype']} (random weights), {result['machine']}\n",
             f"CPU: {result['cpu']}. Streaming-read bandwidth {result['bandwidth'] / 1e9:.1f} GB/s. Checkpoint "
             f"{result['checkpoint_gb']:.1f} GB (compressed-tensors"
             + (f", int4 group {result['group_size']}" if result["dtype"] == "int4" else "") + ")"
             + (f", GGUF {result['gguf_gb']:.1f} GB. " if result["gguf_gb"] else ". ") +
             "Each column a fresh process per round (`moelm bench --full-size`), rounds alternating.\n",
             "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    rows = ROWS + [(f"prefill_{p}_tok_s", f"prefill {p}", "tok/s", ".1f") for p in result["prompt_lens"]] \
        + [(f"decode_b{b}_tok_s", f"decode b{b}", "tok/s", ".2f") for b in result["batches"]]
    for key, label, unit, fmt in rows:
        lines.append(f"| {label} ({unit}) | " + " | ".join(cell(rs, key, fmt) for rs in columns.values()) + " |")
    bpt = [r["bytes_per_token"] for r in runs["moelm"] if "bytes_per_token" in r]
    if bpt:
        share = [100 * r["decode_b1_tok_s"] * bpt[0] / result["bandwidth"] for r in runs["moelm"][1:] or runs["moelm"]]
        lines.append(f"\nmoelm reads {bpt[0] / 1e9:.2f} GB of weights per decoded token (batch 1): "
                     f"{statistics.median(share):.0f}% of the streaming bandwidth at its decode b1 rate.\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
