"""Multi-turn chat benchmark: a client re-sends the whole conversation every turn, as chat front ends do, to
`moelm serve` with and without prefix caching and to llama.cpp's `llama-server` with and without its prompt cache.

The checkpoint and tokenizer are benchmarks/serve.py's (a random model of a named shape, a word-level synthetic
tokenizer; llama-server gets the same weights as GGUF, built from the llama-cpp-python sdist's vendored source by
moelm.bench.llama_server). A chat: a system prompt of --system-tokens random ids, then --turns turns, each a user
message of (--turn-tokens - --answer-tokens) random ids and a greedy answer of --answer-tokens tokens (EOS ignored)
that goes back into the conversation, so each turn adds --turn-tokens. Prompts are sent as token ids (moelm's
/v1/completions, llama-server's /completion), so both servers see the same ids. The servers stay up; every round
runs one new chat (other ids, so nothing is cached from an earlier round) on each server in turn, and the table
gives the median over rounds of the whole chat's wall time and of its first and last turns.

    python benchmarks/serve_chat.py --model ernie-0.3b --turns 10 --system-tokens 1000 --turn-tokens 100
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serve as sb  # noqa: E402  (benchmarks/serve.py: the checkpoint, the tokenizer, the Server process)

KINDS = ("moelm", "moelm-uncached", "llama-server", "llama-server-uncached")


def sized(args):
    """The fields benchmarks/serve.py's servers read: sized for --chats sequences."""
    args.clients, args.max_batched_tokens = [args.chats], args.max_batched
    return args


def moelm_server(directory: Path, args, logs: Path, caching: bool) -> sb.Server:
    server = sb.moelm_server(directory, sized(args), logs)
    server.cmd += [] if caching else ["--no-enable-prefix-caching"]
    server.name, server.label = ("moelm", "moelm, prefix caching" if caching else "moelm, no prefix caching")
    server.log_path = logs / f"moelm-{int(caching)}.log"
    return server


def llama_server(directory: Path, args, logs: Path, caching: bool) -> sb.Server:
    return sb.llama_server(directory, sized(args), logs, sb.log, caching)


def turn(client, server: sb.Server, prompt: list[int], answer: int, tokenizer) -> tuple[list[int], float]:
    """One turn: the answer's ids and the request's seconds."""
    t = time.perf_counter()
    if server.name == "moelm":
        r = client.post(server.url + "/v1/completions", json={
            "model": "bench", "prompt": prompt, "max_tokens": answer, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        ids = tokenizer.encode(r.json()["choices"][0]["text"]).ids
    else:
        r = client.post(server.url + "/completion", json={
            "prompt": prompt, "n_predict": answer, "temperature": 0, "ignore_eos": True, "return_tokens": True,
            "cache_prompt": server.name == "llama-server"})
        r.raise_for_status()
        ids = r.json()["tokens"]
    seconds = time.perf_counter() - t
    if len(ids) != answer:
        raise RuntimeError(f"{server.label} answered {len(ids)} tokens, not {answer}")
    return ids, seconds


def chat(server: sb.Server, args, vocab: int, seed: int, tokenizer) -> list[float]:
    """One conversation of args.turns turns; each turn's seconds."""
    import httpx

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(len(sb.SPECIALS), vocab) for _ in range(n)]  # noqa: E731
    conversation, times = ids(args.system_tokens), []
    with httpx.Client(timeout=httpx.Timeout(None, connect=30)) as client:
        for _ in range(args.turns):
            conversation += ids(args.turn_tokens - args.answer_tokens)
            answer, seconds = turn(client, server, conversation, args.answer_tokens, tokenizer)
            conversation += answer
            times.append(seconds)
    return times


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/serve_chat.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--model", default="ernie-0.3b")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quantization", default="none", choices=("none", "int8", "int4"))
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--turn-tokens", type=int, default=100, help="tokens a turn adds: the user's and the answer's")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--chats", type=int, default=1, help="sequences each server is sized for")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batched", type=int, default=256, help="moelm --max-num-batched-tokens")
    p.add_argument("--servers", default=",".join(KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--workdir", default=None)
    p.add_argument("--markdown", default=None, help="append the section (machine line, table) to this file")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if any(s not in KINDS for s in args.servers):
        p.error(f"--servers: choose from {', '.join(KINDS)}")
    if not 0 < args.answer_tokens < args.turn_tokens:
        p.error("--answer-tokens must be positive and less than --turn-tokens")
    args.context = args.system_tokens + args.turns * args.turn_tokens + 16
    return args


def main(argv=None) -> int:
    from tokenizers import Tokenizer

    from moelm.bench.machine import machine_line
    from moelm.inference import cpu

    args = parse_args(argv)
    servers, unavailable, times = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="moelm-chat-bench-", dir=args.workdir) as tmp:
        directory = Path(tmp) / "model"
        directory.mkdir()
        config = sb.write_bench_checkpoint(args.model, directory, args.seed, sb.log)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        try:
            for kind in args.servers:
                caching, s = not kind.endswith("-uncached"), None
                try:
                    make = moelm_server if kind.startswith("moelm") else llama_server
                    s = make(directory, args, Path(tmp), caching)
                    s.port = sb.free_port()
                    s.cmd = [c.replace("{port}", str(s.port)) for c in s.cmd]
                    s.start()
                    s.wait_ready(args.startup_timeout)
                    chat(s, args, config.vocab_size, -1, tokenizer)  # warm-up: a whole chat, its shapes measured
                    servers.append(s)
                    sb.log(f"{s.label}: up on port {s.port}")
                except sb.Unavailable as e:
                    unavailable[kind] = str(e)
                    sb.log(f"{kind}: unavailable — {e}")
                    if s is not None:
                        s.stop()
            for r in range(args.rounds):
                for s in servers:
                    times.setdefault(s.label, []).append(chat(s, args, config.vocab_size, args.seed * 1000 + r,
                                                              tokenizer))
                    sb.log(f"round {r + 1}: {s.label}: {sum(times[s.label][-1]):.1f} s")
        finally:
            for s in servers:
                s.stop()
    rows = []
    for label, runs in times.items():
        rows.append((label, statistics.median(sum(t) for t in runs), statistics.median(t[0] for t in runs),
                     statistics.median(t[-1] for t in runs), [round(sum(t), 1) for t in runs]))
    head = (f"{args.model} {args.quantization if args.quantization != 'none' else args.dtype}: a {args.turns}-turn "
            f"chat, system prompt {args.system_tokens} tokens, +{args.turn_tokens} tokens a turn (answers of "
            f"{args.answer_tokens}), {args.context - 16} tokens at the end; median of {args.rounds} rounds — "
            f"{machine_line(args.threads, 'cpu')}\nCPU: {cpu.info().line()}")
    lines = ["| server | whole chat (s) | first turn (s) | last turn (s) | rounds (s) |", "|---|---:|---:|---:|---|"]
    lines += [f"| {label} | {total:.1f} | {first:.2f} | {last:.2f} | {', '.join(map(str, each))} |"
              for label, total, first, last, each in rows]
    notes = [f"{k}: unavailable ({v})" for k, v in unavailable.items()]
    text = head + "\n\n" + "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"
    print("\n" + text)
    if args.markdown:
        sb.atomic_append(args.markdown, f"\n### Multi-turn chat (benchmarks/serve_chat.py)\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
