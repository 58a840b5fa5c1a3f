"""The cost of structured output per generated token: the serving engine (no HTTP) at batch B, every sequence free or
every sequence constrained, alternating in one process, on benchmarks/serve.py's random checkpoint with a byte-level
BPE tokenizer of the model's vocabulary size trained on this Python's standard library sources (a real-sized
vocabulary whose every byte string tokenizes, as llguidance needs; the synthetic word-level one does not). Each
constraint lets the model write for the whole answer (EOS ignored), so that both runs make the same number of
tokens; the mask is computed for every token.

    python benchmarks/structured.py --model ernie-0.3b --batch 8 --tokens 64 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve as sb  # noqa: E402

CONSTRAINTS = {
    "regex": ("regex", r"[a-z_]+( [a-z_]+)*"),
    "json": ("json", {"type": "object", "properties": {"text": {"type": "string", "pattern": r"^[a-z_ ]+$"}},
                      "required": ["text"], "x-guidance": {"whitespace_flexible": False}}),
    "choice": ("choice", [" ".join(f"word{i}_{j}" for j in range(60)) for i in range(40)]),
}


def bpe_tokenizer(vocab_size: int, path: Path):
    """A byte-level BPE of vocab_size ids (the ERNIE specials first) trained on the standard library's sources."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                yield f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                pass

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=sb.SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    tok.save(str(path))
    return tok


def run(engine, prompts, params) -> float:
    t = time.perf_counter()
    requests = [engine.submit(p, params) for p in prompts]
    tokens = 0
    for r in requests:
        for out in r:
            tokens += len(out.token_ids)
    return (time.perf_counter() - t) / tokens * len(prompts)  # seconds per step of the batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/structured.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ernie-0.3b")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--constraints", nargs="+", default=list(CONSTRAINTS), choices=list(CONSTRAINTS))
    args = p.parse_args(argv)
    import random

    import torch

    from moelm import AutoModelForCausalLM, AutoTokenizer
    from moelm.bench.machine import machine_line
    from moelm.inference import cpu
    from moelm.serve.engine import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moelm-structured-") as tmp:
        config = sb.write_bench_checkpoint(args.model, Path(tmp), 0, sb.log)
        t = time.perf_counter()
        bpe = bpe_tokenizer(config.vocab_size, Path(tmp) / "tokenizer.json")
        sb.log(f"trained a {bpe.get_vocab_size()}-token BPE in {time.perf_counter() - t:.0f} s")
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, config.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(args.batch)]
    kinds = ["free", *args.constraints]
    params = {k: SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True,
                                structured=None if k == "free" else CONSTRAINTS[k] + (k,)) for k in kinds}
    times = {k: [] for k in kinds}
    with Engine(model, tokenizer, max_num_seqs=args.batch, max_model_len=args.prompt_tokens + args.tokens + 8,
                enable_prefix_caching=False).start() as engine:
        for k in kinds:  # warm-up: kernel paths measured, grammars compiled once
            run(engine, prompts, params[k])
        for _ in range(args.rounds):
            for k in kinds:
                times[k].append(run(engine, prompts, params[k]))
    free = statistics.median(times["free"])
    print(f"\n{args.model} {args.dtype}, batch {args.batch}, {args.tokens} tokens a sequence, vocabulary "
          f"{config.vocab_size} (BPE {bpe.get_vocab_size()}); median of {args.rounds} rounds — "
          f"{machine_line(args.threads, 'cpu')}\n"
          f"CPU: {cpu.info().line()}\n")
    print("| sequences | ms a step of the batch | vs free |\n|---|---:|---:|")
    for k in kinds:
        t = statistics.median(times[k])
        print(f"| {k} | {t * 1e3:.1f} | {t / free:.3f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
