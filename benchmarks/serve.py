"""Serving benchmark: `moelm serve` against llama.cpp's `llama-server`, llama-cpp-python's OpenAI server and
`transformers serve`, over HTTP.

A random checkpoint of a named shape (moelm.bench's BENCH_MODELS) is written once, with a synthetic tokenizer, to a
temporary directory; each server runs on it as a subprocess on 127.0.0.1 (llama.cpp on the same weights written as
GGUF in the matching format: float32 -> f32, bfloat16 -> bf16, int8 -> q8_0, int4 -> q4_0). All servers stay up
for the whole run and the concurrency levels alternate between them (moelm at C clients, llama.cpp at C, transformers
at C, then the next C), so a drift of the host's speed hits every server alike. At each level C clients stream
completions concurrently, each sending R requests back to back (a prompt of exactly --prompt-tokens tokens, greedy,
--gen-tokens tokens with EOS ignored); the figures per level are the generated tokens per second of wall time, the
time to first token and the inter-token latency (the gaps between streamed text chunks as the client sees them: tokens
a server flushes together show as gaps of 0). One warm-up request per server first, then two staggered requests
per client at the highest client count (moelm measures its kernel paths per shape the first time it meets one).

The tokenizer: a synthetic word-level one with exactly the model's vocabulary (id i is the word ' t' + i in letters),
so every sampled id decodes to text and a prompt of N words is N tokens for moelm and transformers; llama.cpp's GGUF
(moelm.bench.gguf) has a synthetic vocabulary without merges, so its prompt is N ASCII letters, N byte tokens. The
prompt lengths are checked on every server before the run.

    python benchmarks/serve.py --model ernie-0.3b --clients 1 4 8 --requests 4
    python benchmarks/serve.py --model ernie-tiny --clients 1 2 --requests 2 --gen-tokens 8 --peers moelm

The peers as they are: llama-server (llama.cpp's own, built by moelm.bench.llama_server from the llama-cpp-python
sdist's vendored source) runs with --parallel (the highest client count) and --cont-batching, its prompt cache on
(`llama-server`) or off per request (`llama-server-nocache`), prompts sent as token ids; llama-cpp-python's server
runs one request at a time (no batching; the others queue; started
with --interrupt_requests False, else a new request ends the running stream early; it has no ignore_eos, a request
that stops early is counted with the tokens it made and reported); `transformers serve` runs with
--continuous-batching, --cb-num-blocks and --cb-max-batch-tokens set (on CPU its default sizes the KV from 60% of
RAM), EOS disabled through the request's generation_config. Needs httpx; llama.cpp needs llama-cpp-python, gguf and the
server extras (sse-starlette, starlette-context, pydantic-settings); transformers serve needs accelerate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PEERS = ("moelm", "llama-server", "llama-server-nocache", "llama.cpp", "transformers")
SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]  # ids 0..4, as moelm new


# ---------------------------------------------------------------- checkpoint

def filler(i: int) -> str:
    """The text of token id i of the synthetic vocabulary: ' t' and i in letters (' tf' for 5): one pre-token of
    GPT-2's split, so that the text of a list of ids encodes back to exactly those ids."""
    s = ""
    while True:
        s = chr(97 + i % 26) + s
        i //= 26
        if not i:
            return " t" + s


def synthetic_tokenizer(vocab_size: int):
    """A `tokenizers` word-level tokenizer of exactly vocab_size ids: the ERNIE specials at 0..4, every other id a
    word (filler(i)). Every id the random model samples decodes to text (the benchmark streams one chunk per
    token) and a prompt built of fillers is exactly as many tokens as it has words, for every server that tokenizes
    with this file (moelm, transformers)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} is too small")
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({filler(i).replace(" ", "\u0120"): i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def write_bench_checkpoint(model: str, directory: Path, seed: int, log) -> object:
    """The random checkpoint of the named shape (moelm.bench.runner.write_checkpoint) with the synthetic tokenizer
    and the ERNIE chat template; returns its config."""
    from moelm.bench.runner import bench_config, write_checkpoint
    from moelm.io.files import atomic_write_text
    from moelm.text.chat_template import ERNIE_TEMPLATE

    config = bench_config(model)
    t = time.perf_counter()
    write_checkpoint(config, str(directory), seed=seed)
    synthetic_tokenizer(config.vocab_size).save(str(directory / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
                  "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>",
                  "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
                  "clean_up_tokenization_spaces": False, "chat_template": ERNIE_TEMPLATE}
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    log(f"wrote the random {model} checkpoint and a {config.vocab_size}-token synthetic tokenizer in "
        f"{time.perf_counter() - t:.1f} s")
    return config


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Unavailable(Exception):
    """A peer that cannot run here; the message (one line) says why, `detail` (its log's tail) says more."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


@dataclass
class Server:
    name: str  # moelm | llama.cpp | transformers
    label: str  # as the table shows it
    cmd: list[str]
    ready_path: str
    log_path: Path
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    note: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        env = {**os.environ, **self.env}
        self._log = open(self.log_path, "wb")
        # a session of its own: a Ctrl-C at the terminal reaches this script only, which then stops the server
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self._log.close()
            raise Unavailable(f"cannot start {self.cmd[0]}: {e}") from None

    def last_line(self) -> str:
        lines = [x for x in self.log_tail(40).splitlines() if x.strip() and not x.startswith(("INFO:", " "))]
        return lines[-1].strip()[:300] if lines else "(nothing in its log)"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def wait_ready(self, timeout: float):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"exited with status {self.proc.returncode} while starting: {self.last_line()}",
                                  self.log_tail())
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise Unavailable(f"not ready after {timeout:.0f} s: {self.last_line()}", self.log_tail())

    def stop(self):
        """SIGTERM to its process group (its own session: only what it started), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (Linux)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return None

    # -- requests: one body and one prompt per server, so that every server gets exactly P prompt tokens

    def prompt(self, ids: list[int]):
        if self.name.startswith("llama-server"):
            return ids  # token ids as the prompt: the same tokens as moelm's
        if self.name == "llama.cpp":
            # the GGUF's vocabulary (moelm.bench.gguf) has no merges: each ASCII letter is one byte token
            return "".join(chr(97 + i % 26) for i in ids)
        return "".join(filler(i) for i in ids)

    def body(self, prompt: str, max_tokens: int) -> dict:
        if self.name == "moelm":
            return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if self.name.startswith("llama-server"):
            return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "cache_prompt": self.name == "llama-server", "stream_options": {"include_usage": True}}
        if self.name == "llama.cpp":
            # no ignore_eos: a request that stops early is counted with the tokens it made (and reported)
            return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "top_p": 1.0, "top_k": 0,
                    "min_p": 0.0, "repeat_penalty": 1.0, "stream": True}
        # transformers serve refuses unknown fields; EOS is ignored through a generation_config without eos
        gen = {"max_new_tokens": max_tokens, "do_sample": False, "eos_token_id": None}
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "generation_config": json.dumps(gen)}

    def check_prompt(self, prompt: str, tokens: int):
        """Raise if this server does not see the prompt as `tokens` tokens (where it has an endpoint to ask)."""
        import httpx

        if self.name.startswith("llama-server"):
            return  # token ids
        if self.name == "moelm":
            got = httpx.post(self.url + "/tokenize", json={"prompt": prompt}, timeout=30).json()["count"]
        elif self.name == "llama.cpp":
            got = len(httpx.post(self.url + "/extras/tokenize", json={"input": prompt}, timeout=30).json()["tokens"])
        else:
            return  # checked through usage.prompt_tokens of the warm-up
        if got != tokens:
            raise Unavailable(f"the benchmark prompt is {got} tokens for {self.label}, not {tokens}")


def moelm_server(directory: Path, args, logs: Path) -> Server:
    cmd = [sys.executable, "-m", "moelm.cli", "serve", str(directory), "--port", "{port}", "--host", "127.0.0.1",
           "--served-model-name", "bench", "--max-num-seqs", str(max(args.clients)), "--threads", str(args.threads),
           "--dtype", args.dtype, "--max-model-len", str(args.context),
           "--max-num-batched-tokens", str(args.max_batched_tokens), "--uvicorn-log-level", "warning"]
    if args.quantization != "none":
        cmd += ["--quantization", args.quantization]
    label = "moelm" + (f" {args.quantization}" if args.quantization != "none" else f" {args.dtype}")
    return Server("moelm", label, cmd, "/health", logs / "moelm.log", env=_thread_env(args.threads))


def llamacpp_server(directory: Path, args, logs: Path, log) -> Server:
    from moelm.bench import gguf, llamacpp

    if not llamacpp.available():
        raise Unavailable("llama-cpp-python is not installed (pip install 'moelm[bench]')")
    try:
        import llama_cpp.server.app  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"llama-cpp-python's server extras are missing ({type(e).__name__}: {e}); "
                          "pip install sse-starlette starlette-context pydantic-settings") from None
    fmt = args.quantization if args.quantization != "none" else args.dtype
    ftype = gguf.FORMATS[fmt]
    t = time.perf_counter()
    try:
        path = gguf.write_gguf(directory, directory / f"model-{ftype}.gguf", ftype)
    except ValueError as e:
        raise Unavailable(f"cannot write this model as GGUF: {e}") from None
    log(f"wrote GGUF {ftype} in {time.perf_counter() - t:.1f} s; {llamacpp.build_info()}")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_threads", str(args.threads),
           "--n_threads_batch", str(args.threads), "--n_ctx", str(args.context), "--n_batch", "512",
           "--host", "127.0.0.1", "--port", "{port}", "--verbose", "False",
           # the default (True) ends a streaming response early when another request arrives
           "--interrupt_requests", "False"]
    return Server("llama.cpp", f"llama.cpp {ftype}", cmd, "/v1/models", logs / "llama.cpp.log",
                  env=_thread_env(args.threads), note="one request at a time (no batching)")


def llama_server(directory: Path, args, logs: Path, log, caching: bool) -> Server:
    """llama.cpp's own server, built from the llama-cpp-python sdist's vendored source (moelm.bench.llama_server),
    with --parallel (the highest client count) and --cont-batching; its prompt cache on or off per request."""
    from moelm.bench import gguf
    from moelm.bench import llama_server as build

    try:
        binary = build.binary(log=log)
    except RuntimeError as e:
        raise Unavailable(str(e)) from None
    fmt = args.quantization if args.quantization != "none" else args.dtype
    ftype = gguf.FORMATS[fmt]
    path = directory / f"model-{ftype}.gguf"
    if not path.exists():
        gguf.write_gguf(directory, path, ftype)
    slots = max(args.clients)
    cmd = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", "{port}", "-t", str(args.threads),
           "-tb", str(args.threads), "-c", str(args.context * slots), "--parallel", str(slots), "--cont-batching",
           "-b", "512", "--no-webui"]
    name = "llama-server" if caching else "llama-server-nocache"
    return Server(name, f"llama-server {ftype}" + ("" if caching else ", no prompt cache"), cmd, "/health",
                  logs / f"{name}.log", env=_thread_env(args.threads),
                  note=f"--parallel {slots} --cont-batching, {'with' if caching else 'without'} its prompt cache")


def transformers_server(directory: Path, args, logs: Path) -> Server:
    if args.quantization != "none":
        raise Unavailable(f"transformers has no CPU {args.quantization} path to compare with "
                          "(transformers serve quantizes with bitsandbytes only)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise Unavailable("transformers is not installed") from None
    for module, why in (("fastapi", "transformers[serving]"), ("uvicorn", "transformers[serving]"),
                        ("accelerate", "accelerate (it loads with a device map)")):
        try:
            __import__(module)
        except ImportError:
            raise Unavailable(f"transformers serve needs {why}: pip install {module}") from None
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe) if exe.exists() else "transformers", "serve", str(directory), "--device", "cpu",
           "--dtype", args.dtype, "--continuous-batching", "--cb-num-blocks", str(args.tf_blocks),
           "--cb-max-batch-tokens", str(args.max_batched_tokens), "--host", "127.0.0.1", "--port", "{port}",
           "--log-level", "error"]
    env = {**_thread_env(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TQDM": "1"}
    return Server("transformers", f"transformers {args.dtype}", cmd, "/health", logs / "transformers.log", env=env,
                  note="--continuous-batching")


def _thread_env(threads: int) -> dict:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- clients

@dataclass
class Result:
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None
    finish: str | None = None
    error: str | None = None
    e2e: float = 0.0


async def stream_one(client, server: Server, prompt: str, max_tokens: int) -> Result:
    """One streaming completion; chunk arrival times as the client sees them."""
    res = Result()
    chunks, usage = [], None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=server.body(prompt, max_tokens)) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {r.status_code}: {text[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(f"stream error: {str(obj['error'])[:300]}")
                usage = obj.get("usage") or usage
                for choice in obj.get("choices") or []:
                    if choice.get("text"):
                        chunks.append(now)
                    res.finish = choice.get("finish_reason") or res.finish
    except Exception as e:  # noqa: BLE001 - reported per level
        res.error = f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - t0
    if chunks:
        res.ttft = chunks[0] - t0
        res.itl = [b - a for a, b in zip(chunks, chunks[1:])]
    # usage where the server sends it in the stream (moelm, transformers), else one token per text chunk (llama.cpp)
    res.tokens = usage["completion_tokens"] if usage else len(chunks)
    res.prompt_tokens = usage["prompt_tokens"] if usage else None
    return res


def prompt_ids(seed: int, level: int, client: int, request: int, tokens: int, vocab: int) -> list[int]:
    """The same prompts for every server at a level: ids of fillers (never specials), distinct from the first
    token on, so that no server reuses a cached prefix."""
    rng = random.Random(f"{seed}-{level}-{client}-{request}")
    return [rng.randrange(len(SPECIALS), vocab) for _ in range(tokens)]


async def run_level(server: Server, clients: int, requests: int, args, vocab: int, level_key: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        async def one_client(c: int) -> list[Result]:
            out = []
            for r in range(requests):
                ids = prompt_ids(args.seed, level_key, c, r, args.prompt_tokens, vocab)
                out.append(await stream_one(client, server, server.prompt(ids), args.gen_tokens))
            return out

        cpu0 = server.cpu_seconds()
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        cpu1 = server.cpu_seconds()
    results = [r for rs in per_client for r in rs]
    return summarize(server, clients, results, wall, None if cpu0 is None or cpu1 is None else cpu1 - cpu0, args)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(server: Server, clients: int, results: list[Result], wall: float, cpu: float | None, args) -> dict:
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    short = sum(1 for r in ok if r.tokens < args.gen_tokens)
    prompts = sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None})
    return dict(server=server.label, name=server.name, clients=clients, requests=len(ok), sent=len(results),
                errors=errors, tokens=tokens, wall=wall, tok_s=tokens / wall if wall > 0 and ok else None,
                ttft50=percentile(ttft, 50), ttft95=percentile(ttft, 95), itl50=percentile(itl, 50),
                itl95=percentile(itl, 95), short=short, prompt_tokens=prompts, cpu=cpu)


# ---------------------------------------------------------------- report

def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def _rate(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def table(rows: list[dict]) -> str:
    base = {r["server"]: r["tok_s"] for r in rows if r["clients"] == 1 and r["tok_s"]}
    head = ("| server | clients | requests | gen tok/s | × 1 client | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) "
            "| ITL p95 (ms) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (_order(r["name"]), r["clients"])):
        scale = (f"{r['tok_s'] / base[r['server']]:.2f}×" if r["tok_s"] and r["server"] in base
                 and r["clients"] != 1 else "")
        done = f"{r['requests']}" + (f" of {r['sent']}" if r["requests"] != r["sent"] else "")
        lines.append(f"| {r['server']} | {r['clients']} | {done} | {_rate(r['tok_s'])} | {scale} | "
                     f"{_ms(r['ttft50'])} | {_ms(r['ttft95'])} | {_ms(r['itl50'])} | {_ms(r['itl95'])} |")
    return "\n".join(lines)


def _order(name: str) -> int:
    return PEERS.index(name) if name in PEERS else len(PEERS)


def ratios(rows: list[dict]) -> list[str]:
    """moelm's throughput over each peer's at each client count, and moelm's 8-client (or most) / 1-client."""
    out = []
    moelm = {r["clients"]: r for r in rows if r["name"] == "moelm" and r["tok_s"]}
    levels = sorted(moelm)
    if len(levels) > 1 and levels[0] == 1:
        top = 8 if 8 in moelm else levels[-1]
        out.append(f"moelm {top} clients / 1 client: {moelm[top]['tok_s'] / moelm[1]['tok_s']:.2f}× aggregate "
                   f"tokens/s")
    for peer in sorted({r["server"] for r in rows if r["name"] != "moelm"}):
        parts = [f"{c} client{'s' * (c > 1)} {moelm[c]['tok_s'] / r['tok_s']:.2f}×" for c in levels for r in rows
                 if r["server"] == peer and r["clients"] == c and r["tok_s"]]
        if parts:
            out.append(f"moelm ÷ {peer} (aggregate tokens/s): " + ", ".join(parts))
    return out


def notes(rows: list[dict], servers: list[Server], unavailable: dict[str, str], args) -> list[str]:
    out = [f"{s.label}: {s.note}" for s in servers if s.note]
    out += [f"{name}: unavailable — {why}" for name, why in unavailable.items()]
    for r in rows:
        if r["errors"]:
            out.append(f"{r['server']} at {r['clients']} clients: {len(r['errors'])} failed request(s), first: "
                       f"{r['errors'][0]}")
        if r["short"]:
            out.append(f"{r['server']} at {r['clients']} clients: {r['short']} request(s) ended before "
                       f"{args.gen_tokens} tokens (counted with the tokens they made)")
        if r["prompt_tokens"] and r["prompt_tokens"] != [args.prompt_tokens]:
            out.append(f"{r['server']}: prompt tokens by usage {r['prompt_tokens']} (expected {args.prompt_tokens})")
    return out


def markdown_section(result: dict) -> str:
    a = result["args"]
    fmt = a.quantization if a.quantization != "none" else a.dtype
    extra = "".join(f"- {n}\n" for n in result["notes"] + result["ratios"])
    return (f"\n### Serving: {result['model']}, {fmt}, clients {', '.join(map(str, a.clients))}\n\n"
            f"Machine: {result['machine']}  \n"
            f"CPU: {result['cpu']}  \n"
            f"{result['versions']}  \n"
            f"Workload: each client streams {a.requests} completion(s) back to back, prompt {a.prompt_tokens} "
            f"tokens, {a.gen_tokens} generated (greedy, EOS ignored); levels alternate between servers; "
            f"{a.threads} threads per server; TTFT from request to first text chunk, ITL the gaps between text "
            f"chunks; gen tok/s = completion tokens / wall time of the level.\n\n"
            f"{result['table']}\n\n{extra}")


def atomic_append(path: str, text: str):
    """Append by writing the whole new file beside it and renaming it over the old one."""
    target = Path(path)
    old = target.read_text(encoding="utf-8") if target.exists() else ""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(old + text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def versions() -> str:
    parts = []
    for module, name in (("llama_cpp", "llama-cpp-python"), ("httpx", "httpx")):
        try:
            parts.append(f"{name} {__import__(module).__version__}")
        except Exception:  # noqa: BLE001
            pass
    import moelm

    return f"moelm {getattr(moelm, '__version__', '?')}; " + "; ".join(parts)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    from moelm.bench.runner import BENCH_MODELS

    p = argparse.ArgumentParser(prog="benchmarks/serve.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--model", nargs="+", default=["ernie-0.3b"],
                   choices=[m for m in BENCH_MODELS if m.startswith("ernie")], help="shapes (moelm.bench's random-weight models); one table each, run one after the other")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quantization", default="none", choices=("none", "int8", "int4"),
                   help="moelm's weight-only int8/int4 (with float32 activations); llama.cpp q8_0/q4_0")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests per client at each level, back to back")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads of every server")
    p.add_argument("--peers", default=",".join(PEERS),
                   help=f"comma-separated servers to run, from {','.join(PEERS)}")
    p.add_argument("--context", type=int, default=2048,
                   help="context per sequence: moelm --max-model-len, llama.cpp --n_ctx")
    p.add_argument("--max-batched-tokens", type=int, default=256,
                   help="tokens per step: moelm --max-num-batched-tokens, transformers --cb-max-batch-tokens")
    p.add_argument("--tf-blocks", type=int, default=32,
                   help="transformers --cb-num-blocks (256-token pages; the default sizes the KV from 60%% of RAM)")
    p.add_argument("--warmup-tokens", type=int, default=8,
                   help="tokens of the shortest request of the concurrent warm-up (client c: this + 2c)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds a server may take to start")
    p.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: $TMPDIR)")
    p.add_argument("--markdown", default=None, help="append the section (machine line, table) to this file")
    args = p.parse_args(argv)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    bad = [x for x in args.peers if x not in PEERS]
    if bad or not args.peers:
        p.error(f"--peers: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(PEERS)}")
    if min(args.clients) < 1 or args.requests < 1 or args.prompt_tokens < 1 or args.gen_tokens < 1:
        p.error("--clients, --requests, --prompt-tokens and --gen-tokens must be positive")
    if args.prompt_tokens + args.gen_tokens + 8 > args.context:
        p.error(f"--context {args.context} is too small for {args.prompt_tokens} + {args.gen_tokens} tokens")
    if args.quantization != "none" and args.dtype != "float32":
        p.error("--quantization runs with --dtype float32")
    args.clients = sorted(set(args.clients))
    return args


def log(*a):
    print(*a, file=sys.stderr, flush=True)


async def warm_up(server: Server, args, vocab: int):
    """One request, then the highest client count sending two requests each, of staggered lengths (client c
    generates warmup_tokens + 2c), so that the batch goes through every size up to it, with and without prompt
    chunks: moelm measures its kernel paths for each shape (rows rounded up to a power of two) the first time it
    meets one, once per machine and version of its code; the warm-up keeps that out of the levels."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30)) as client:
        first = await stream_one(client, server, server.prompt(prompt_ids(args.seed, -1, 0, 0, args.prompt_tokens,
                                                                          vocab)), args.gen_tokens)
        if first.error or not first.tokens:
            raise Unavailable(f"the warm-up request failed: {first.error or 'no tokens'}", server.log_tail())
        if first.prompt_tokens is not None and first.prompt_tokens != args.prompt_tokens:
            raise Unavailable(f"the prompt is {first.prompt_tokens} tokens for {server.label}, "
                              f"not {args.prompt_tokens}")
        async def staggered(c: int):
            for r in range(2):
                ids = prompt_ids(args.seed, -2, c, r, args.prompt_tokens, vocab)
                await stream_one(client, server, server.prompt(ids), args.warmup_tokens + 2 * c)

        if max(args.clients) > 1:
            await asyncio.gather(*(staggered(c) for c in range(max(args.clients))))


def run(args, model: str) -> dict:
    from moelm.bench.machine import machine_line
    from moelm.inference import cpu

    servers: list[Server] = []
    unavailable: dict[str, str] = {}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="moelm-serve-bench-", dir=args.workdir) as tmp:
        directory = Path(tmp) / "model"
        directory.mkdir()
        logs = Path(tmp)
        config = write_bench_checkpoint(model, directory, args.seed, log)
        vocab = config.vocab_size
        try:
            for name in args.peers:
                try:
                    if name == "moelm":
                        s = moelm_server(directory, args, logs)
                    elif name == "llama.cpp":
                        s = llamacpp_server(directory, args, logs, log)
                    elif name.startswith("llama-server"):
                        s = llama_server(directory, args, logs, log, name == "llama-server")
                    else:
                        s = transformers_server(directory, args, logs)
                    s.port = free_port()
                    s.cmd = [c.replace("{port}", str(s.port)) for c in s.cmd]
                    t = time.perf_counter()
                    s.start()
                    servers.append(s)
                    s.wait_ready(args.startup_timeout)
                    s.check_prompt(s.prompt(prompt_ids(args.seed, -3, 0, 0, args.prompt_tokens, vocab)),
                                   args.prompt_tokens)
                    asyncio.run(warm_up(s, args, vocab))
                    log(f"{s.label}: up on port {s.port} in {time.perf_counter() - t:.1f} s (warm-up included)")
                except Unavailable as e:
                    unavailable[name] = str(e)
                    log(f"{name}: unavailable — {e}" + (f"\n{e.detail}" if e.detail else ""))
                    if servers and servers[-1].name == name:
                        servers.pop().stop()
            if not servers:
                raise RuntimeError("no server could run: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
            for level, clients in enumerate(args.clients):
                for s in servers:
                    idle = {o.name: o.cpu_seconds() for o in servers if o is not s}
                    if s.proc.poll() is not None:
                        if s.name not in unavailable:
                            unavailable[s.name] = (f"exited during the run (status {s.proc.returncode}): "
                                                   f"{s.last_line()}")
                            log(f"{s.label} exited (status {s.proc.returncode}):\n{s.log_tail()}")
                        continue
                    row = asyncio.run(run_level(s, clients, args.requests, args, vocab, level))
                    rows.append(row)
                    busy = {o.label: (o.cpu_seconds() or 0) - (idle[o.name] or 0) for o in servers if o is not s
                            and idle.get(o.name) is not None}
                    hot = {k: v for k, v in busy.items() if v > 0.05 * row["wall"] + 0.2}
                    log(f"{s.label:>22} {clients} clients: {_rate(row['tok_s'])} tok/s, TTFT p50 {_ms(row['ttft50'])}"
                        f" ms, ITL p50 {_ms(row['itl50'])} ms, {row['requests']}/{row['sent']} requests in "
                        f"{row['wall']:.1f} s" + (f", server CPU {row['cpu']:.1f} s" if row["cpu"] else "")
                        + (f"; idle servers busy: {hot}" if hot else ""))
        finally:
            for s in servers:
                s.stop()
    result = dict(machine=machine_line(args.threads, "cpu"), cpu=cpu.info().line(), versions=versions(),
                  rows=rows, args=args, model=model, servers=servers)
    result["table"] = table(rows)
    result["ratios"] = ratios(rows)
    result["notes"] = notes(rows, servers, unavailable, args)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (and a Ctrl-C, as KeyboardInterrupt) unwind through run()'s finally, which stops every server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fmt = args.quantization if args.quantization != "none" else args.dtype
    try:
        for model in args.model:
            result = run(args, model)
            print(f"\n{model} {fmt}, prompt {args.prompt_tokens}, gen {args.gen_tokens}, {args.requests} request(s) "
                  f"per client — {result['machine']}\nCPU: {result['cpu']}\n{result['versions']}\n", flush=True)
            print(result["table"])
            for line in result["notes"] + result["ratios"]:
                print(f"- {line}")
            if args.markdown:
                atomic_append(args.markdown, markdown_section(result))
                print(f"\nappended to {args.markdown}")
            sys.stdout.flush()
    except KeyboardInterrupt:
        log("interrupted; every server was stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
