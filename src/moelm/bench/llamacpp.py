"""llama.cpp as a benchmark peer: a GGUF file (see gguf.write_gguf) timed through llama-cpp-python, in a worker
process of its own (moelm runs beside it, one at a time: the timings alternate as in one process).

    m = LlamaCppModel("model.gguf", threads=2)
    m.prefill(ids), m.decode(ids[:64], 16)                 # seconds, seconds per token (timed in the worker)
    m = LlamaCppModel("model.gguf", threads=2, logits_all=True, kv_type="f32"); m.logits(ids)   # [len(ids), vocab]

Why a process: llama.cpp's AMX kernels configure a thread's tile registers once, on its first call, and assume they
stay configured; oneDNN's AMX kernels (PyTorch's bf16 matmuls) release them after each call, and in one process the
next llama.cpp matmul died of SIGILL.
"""
from __future__ import annotations

import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - an ImportError or a broken shared library
        return False
    return True


def build_info() -> str:
    """The llama-cpp-python version and llama.cpp's system info (the CPU features it was built with)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {llama_cpp.__version__}; {info.strip()}"


class LocalModel:
    """One llama.cpp model + context, in this process. kv_type: "f16" (llama.cpp's default) or "f32" (for the
    parity check)."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 512, n_batch: int = 256,
                 logits_all: bool = False, kv_type: str = "f16", flash_attn: bool = False):
        import llama_cpp

        kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv_type]
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all, type_k=kv,
                                   type_v=kv, flash_attn=flash_attn, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.logits_all = logits_all

    def _clear(self) -> None:
        import llama_cpp

        self.llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def _last_argmax(self) -> int:
        import llama_cpp

        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(row.argmax())

    def prefill(self, ids: list[int]) -> float:
        """Seconds to run `ids` through an empty KV cache (logits of the last position only)."""
        self._clear()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def decode(self, ids_context: list[int], steps: int) -> float:
        """Seconds per token: the context and one step untimed, then `steps` greedy single-token steps timed."""
        self._clear()
        self.llm.eval(ids_context)
        self.llm.eval([self._last_argmax()])
        t = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([self._last_argmax()])
        return (time.perf_counter() - t) / steps

    def decode_batch(self, contexts: list[list[int]], steps: int) -> float:
        """Seconds per step of len(contexts) sequences decoded together (one token each per llama_decode call),
        after each context and one step untimed: llama.cpp's batched decoding (a second context with one sequence
        per row; the model's weights are shared)."""
        import llama_cpp

        n = len(contexts)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n * (max(map(len, contexts)) + steps + 2)
        params.n_batch = params.n_ubatch = max(n, max(map(len, contexts)))
        params.n_seq_max, params.kv_unified = n, True
        params.n_threads = params.n_threads_batch = self.llm.n_threads
        ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if ctx is None:
            raise RuntimeError("llama.cpp could not create a batched context")
        batch = llama_cpp.llama_batch_init(params.n_batch, 0, n)
        try:
            def run(tokens: list[tuple[int, int, int]]):  # (token, position, sequence); last token per sequence out
                batch.n_tokens = len(tokens)
                for i, (tok, pos, seq) in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = i == len(tokens) - 1 or tokens[i + 1][2] != seq
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")

            def argmax(i: int) -> int:
                row = llama_cpp.llama_get_logits_ith(ctx, i)
                return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())

            for seq, ids in enumerate(contexts):
                run([(tok, pos, seq) for pos, tok in enumerate(ids)])
                contexts[seq] = [*ids, argmax(-1)]
            lengths = [len(ids) for ids in contexts]

            def step(k: int):
                run([(contexts[seq][-1], lengths[seq] - 1 + k, seq) for seq in range(n)])
                for seq in range(n):
                    contexts[seq].append(argmax(seq))

            step(0)
            t = time.perf_counter()
            for k in range(1, steps + 1):
                step(k)
            return (time.perf_counter() - t) / steps
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float32 logits at every position (needs logits_all=True)."""
        if not self.logits_all:
            raise ValueError("LlamaCppModel(logits_all=True) is needed for logits()")
        self._clear()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        """The `steps` greedy tokens after `ids`, decoded alone (one sequence, a fresh KV cache)."""
        self._clear()
        self.llm.eval(ids)
        out = []
        for _ in range(steps):
            out.append(self._last_argmax())
            self.llm.eval([out[-1]])
        return out

    def close(self) -> None:
        self.llm.close()


def _worker() -> None:
    """The worker process: a LocalModel(*args), then its methods called as the parent asks, until "close". Pickles
    over stdin and the original stdout (anything printed goes to stderr)."""
    out, inp = os.fdopen(os.dup(1), "wb"), sys.stdin.buffer
    os.dup2(2, 1)

    def send(ok: bool, value) -> None:
        pickle.dump((ok, value), out)
        out.flush()

    from .machine import peak_rss_bytes, rss_bytes

    try:
        before = rss_bytes()
        model = LocalModel(*pickle.load(inp))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return send(False, f"{type(e).__name__}: {e}")
    send(True, (model.n_vocab, model.logits_all))
    while True:
        name, args = pickle.load(inp)
        try:
            if name == "close":
                return send(True, model.close())
            if name == "memory":
                now = rss_bytes()
                send(True, (now - before if now is not None and before is not None else None, peak_rss_bytes()))
                continue
            if name == "decode_batch":  # the grown contexts go back: the caller's lists grow as in one process
                send(True, (model.decode_batch(*args), args[0]))
            else:
                send(True, getattr(model, name)(*args))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            send(False, f"{type(e).__name__}: {e}")


class LlamaCppModel:
    """One llama.cpp model + context in a worker process (see the module's docstring); the methods of LocalModel, the
    times measured in the worker. kv_type: "f16" (llama.cpp's default) or "f32" (for the parity check)."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 512, n_batch: int = 256,
                 logits_all: bool = False, kv_type: str = "f16", flash_attn: bool = False):
        self._proc = subprocess.Popen([sys.executable, "-c", "from moelm.bench.llamacpp import _worker; _worker()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._send((str(path), threads, n_ctx, n_batch, logits_all, kv_type, flash_attn))
        self.n_vocab, self.logits_all = self._reply()

    def _send(self, message) -> None:
        pickle.dump(message, self._proc.stdin)
        self._proc.stdin.flush()

    def _reply(self):
        try:
            ok, value = pickle.load(self._proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            code = self._proc.wait(10)
            self._proc = None
            raise RuntimeError(f"llama.cpp's worker process died (exit code {code})") from None
        if not ok:
            raise RuntimeError(f"llama.cpp: {value}")
        return value

    def _call(self, name: str, *args):
        if self._proc is None:
            raise RuntimeError("this LlamaCppModel is closed")
        try:
            self._send((name, args))
        except OSError:
            pass  # the worker is gone: _reply says so
        return self._reply()

    def prefill(self, ids: list[int]) -> float:
        return self._call("prefill", list(ids))

    def decode(self, ids_context: list[int], steps: int) -> float:
        return self._call("decode", list(ids_context), steps)

    def decode_batch(self, contexts: list[list[int]], steps: int) -> float:
        seconds, grown = self._call("decode_batch", [list(c) for c in contexts], steps)
        for c, g in zip(contexts, grown):
            c[:] = g
        return seconds

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        return self._call("greedy", list(ids), steps)

    def memory(self) -> tuple[int | None, int]:
        """(RSS the model added to the worker process, the worker's peak RSS), bytes."""
        return self._call("memory")

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._call("logits", list(ids))

    def close(self) -> None:
        if self._proc is not None:
            proc = self._proc
            try:
                self._call("close")
            finally:
                proc.stdin.close()
                proc.wait(10)
                proc.stdout.close()
                self._proc = None

    def __del__(self):
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def measure(path: str | Path, threads: int, prompt_len: int = 256, context: int = 64, steps: int = 16,
            repeats: int = 3, vocab: int | None = None, seed: int = 0) -> dict:
    """llama.cpp prefill and batch-1 decode tok/s on a GGUF file (median of `repeats` after one warm-up)."""
    m = LlamaCppModel(path, threads, n_ctx=max(512, prompt_len, context + steps + 2), n_batch=prompt_len)
    rng = np.random.default_rng(seed)
    vocab = vocab or m.n_vocab
    prompt = rng.integers(0, vocab, prompt_len).tolist()
    ctx = rng.integers(0, vocab, context).tolist()
    m.prefill(prompt)
    prefill = statistics.median(m.prefill(prompt) for _ in range(repeats))
    m.decode(ctx, steps)
    decode = statistics.median(m.decode(ctx, steps) for _ in range(repeats))
    m.close()
    return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": 1 / decode}
