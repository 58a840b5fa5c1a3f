"""Side-by-side speed measurements of moelm and transformers (and llama.cpp) on random-weight models built from
named configs.

Both libraries load the same random checkpoint (written once to a temporary directory) in the same dtype, live in
the same process, and are measured alternately (moelm, transformers, moelm, ...); each figure is the median of the
repeats, after one untimed warm-up per library. No downloads. With `peer="llama.cpp"` (the `bench` extra:
llama-cpp-python and gguf) the same random weights are also written as GGUF in the matching format (float32 -> f32,
bfloat16 -> bf16, int8 -> q8_0, int4 -> q4_0) and llama.cpp is timed in the same alternation (prefill, and decode at
batch 1). Every run reports the CPU, its features and the path moelm chose for each op and shape.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from . import gguf
from .machine import bandwidth, machine_line, peak_rss_bytes, rss_bytes, sync
from .report import row_line

BENCH_MODELS = {
    # name: (moelm named config, overrides); the named configs' own names work too (the ones that fit a machine)
    "ernie-0.3b": ("ernie-4.5-0.3b", {}),
    "ernie-21b-2l": ("ernie-4.5-21b-a3b", dict(num_hidden_layers=2, moe_layer_start_index=1, moe_layer_end_index=1)),
    "phi-3.5-moe-1l": ("phi-3.5-moe", dict(num_hidden_layers=1)),
    "ernie-tiny": ("ernie4_5-tiny", {}),
    **{name: (name, {}) for name in ("ernie-4.5-0.3b", "ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny")},
}


# ---------------------------------------------------------------- models

def bench_config(name: str):
    from ..config import AutoConfig, named_config

    if name not in BENCH_MODELS:
        raise ValueError(f"unknown bench model {name!r}; known: {', '.join(BENCH_MODELS)}")
    base, overrides = BENCH_MODELS[name]
    data = named_config(base).to_dict()
    data.pop("num_nextn_predict_layers", None)  # plain decoding: no MTP head (python -m moelm.bench.speculative)
    data.update(overrides)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def bytes_per_token(model, config) -> dict:
    """Bytes of weights read per decoded token (batch 1): every parameter and buffer (quantized weights and their
    scales included) except the input embedding (a row gather; counted once when tied to lm_head) and ERNIE's MTP
    head (model.mtp_*: loaded, but read only when drafting), with each stacked-experts module counted for its top-k
    of E experts only (as if every expert were chosen as often: a mixed-bit layer's routing-weighted figure is
    benchmarks/mixed_bits.py's)."""
    from ..inference.mixed import MixedExperts
    from ..inference.quantization import QuantizedExperts
    from ..nn.moe import Experts

    k = getattr(config, "moe_k", None) or getattr(config, "num_experts_per_tok", None) or 1
    embed = model.get_input_embeddings().weight
    head = getattr(model.lm_head, "weight", None)
    per_module = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        per_module[name] = (module, own)
    read = total = params = 0
    seen = set()
    for name, (module, own) in per_module.items():
        expert_share = None
        for owner, (m, _) in per_module.items():  # the outermost stack (a mixed-bit one holds two inside)
            if isinstance(m, (Experts, QuantizedExperts, MixedExperts)) and (name == owner or
                                                                           name.startswith(owner + ".")):
                expert_share = k / m.num_experts
                break
        for _, t in own:
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            total += nbytes
            params += t.numel() if t.is_floating_point() or t.dtype == torch.int8 else 2 * t.numel()
            if (t is embed and t is not head) or name.startswith("model.mtp_"):
                continue
            read += nbytes * (expert_share if expert_share is not None else 1)
    return {"params_total": params, "bytes_total": total, "bytes_per_token": int(read)}


def write_checkpoint(config, directory: str, seed: int = 0):
    """Random weights (normal, std = initializer_range = 0.02) saved in hub layout; both libraries load it."""
    from ..models.auto import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, seed=seed)
    model.save_pretrained(directory)
    del model


QUANTIZED = ("int8", "int4")


def load_models(directory: str, dtype: str, device: torch.device, with_transformers: bool):
    """{label: model} and {label: (RSS added, peak RSS)}. Float dtypes: moelm and transformers in that dtype.
    int8/int4: moelm quantized and moelm fp32 (transformers has no CPU int8/int4 path to compare with)."""
    from ..config import dtype_from_str
    from ..models.auto import AutoModelForCausalLM

    models, rss = {}, {}

    def load(label, fn):
        before = rss_bytes()
        models[label] = fn().eval()
        rss[label] = (rss_bytes() - before if before is not None else None, peak_rss_bytes())

    if dtype in QUANTIZED:
        load(f"moelm {dtype}", lambda: AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, device=device, quantization=dtype))
        load("moelm float32", lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                                 device=device))
        return models, rss
    torch_dtype = dtype_from_str(dtype)
    load("moelm", lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, device=device,
                                                                    attn_implementation="sdpa"))
    if with_transformers:
        import transformers

        load("transformers", lambda: transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype, attn_implementation="sdpa").to(device))
    return models, rss


@torch.inference_mode()
def mean_kl(model, reference, vocab: int, device, prompts: int = 8, length: int = 32, seed: int = 1) -> float:
    """Mean KL(reference || model) of the next-token distributions at every position of a fixed set of random
    prompts (a fixed seed: the same set on every run)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (prompts, length), generator=g).to(device)
    p = reference(input_ids=ids).logits.float().log_softmax(-1)
    q = model(input_ids=ids).logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# ---------------------------------------------------------------- measurements

def load_peer(directory: str, dtype: str, threads: int, prompt_lens, decode_context: int, decode_tokens: int,
              log) -> tuple[str, object]:
    """(label, llamacpp.LlamaCppModel) of the checkpoint in `directory` written as GGUF in dtype's format."""
    from . import llamacpp

    check_peer(dtype)
    ftype = gguf.FORMATS[dtype]
    t = time.perf_counter()
    path = gguf.write_gguf(directory, os.path.join(directory, f"model-{ftype}.gguf"), ftype)
    log(f"wrote GGUF {ftype} in {time.perf_counter() - t:.1f} s; {llamacpp.build_info()}")
    n_ctx = max(512, *prompt_lens, decode_context + decode_tokens + 4)
    return f"llama.cpp {ftype}", llamacpp.LlamaCppModel(path, threads, n_ctx=n_ctx, n_batch=max(prompt_lens))


def check_peer(dtype: str):
    from . import llamacpp

    if dtype not in gguf.FORMATS:
        raise ValueError(f"--peer llama.cpp: no matching llama.cpp format for {dtype} "
                         f"(formats: {', '.join(f'{k} -> {v}' for k, v in gguf.FORMATS.items())})")
    if not llamacpp.available():
        raise RuntimeError("--peer llama.cpp needs llama-cpp-python and gguf: pip install 'moelm[bench]'")


def _is_peer(model) -> bool:
    return type(model).__module__.endswith("llamacpp")


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor) -> float:
    if _is_peer(model):
        return model.prefill(ids[0].tolist())
    sync(ids.device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync(ids.device)
    return time.perf_counter() - t


@torch.inference_mode()
def time_decode(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds per decode step: prefill `ids` into the KV cache (untimed), one untimed step, then `steps` greedy
    single-token forwards with past_key_values, timed together. moelm models decode through their StaticCache
    (what moelm's generate uses), transformers through its DynamicCache (what its generate uses), llama.cpp (batch
    1) through its own KV cache."""
    if _is_peer(model):
        return model.decode(ids[0].tolist(), steps)
    cache = None
    if type(model).__module__.startswith("moelm"):
        from ..inference.cache import StaticCache

        cache = StaticCache(model.config, ids.shape[0], ids.shape[1] + steps + 2,
                            model.get_input_embeddings().weight.dtype, ids.device)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    sync(ids.device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    sync(ids.device)
    return (time.perf_counter() - t) / steps


def _alternate(models: dict, fn, repeats: int) -> dict:
    """One untimed warm-up per library, then `repeats` rounds alternating libraries; the median per library."""
    for m in models.values():
        fn(m)
    times = {lib: [] for lib in models}
    for _ in range(repeats):
        for lib, m in models.items():
            times[lib].append(fn(m))
    return {lib: statistics.median(ts) for lib, ts in times.items()}


def run(model: str = "ernie-0.3b", dtype: str = "float32", prompt_lens=(256,), decode_tokens: int = 16,
        batches=(1, 8), repeats: int = 3, threads: int | None = None, transformers: bool = True,
        device: str = "cpu", decode_context: int = 64, bandwidth_bytes: int = 2**30, seed: int = 0,
        peer: str | None = None, log=print) -> dict:
    """Benchmark one model/dtype; returns a dict with keys machine, cpu (the CPU's features), paths (the path moelm
    chose for each op and shape), model, dtype, threads, device, bandwidth, weights, rss, labels (the columns: moelm
    first), kl (quantized runs) and rows (one per metric: name, unit, per label). peer="llama.cpp" adds llama.cpp on
    the same weights (batch-1 decode only)."""
    if peer not in (None, "llama.cpp"):
        raise ValueError(f"unknown peer {peer!r}; the peer is llama.cpp")
    if peer:
        check_peer(dtype)
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dev = torch.device(device)
    config = bench_config(model)
    rows = []
    log = log or (lambda *a, **k: None)

    bw = bandwidth(bandwidth_bytes, device=dev)
    log(f"streaming-read bandwidth: {bw / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory(prefix="moelm-bench-") as tmp:
        t = time.perf_counter()
        write_checkpoint(config, tmp, seed=seed)
        log(f"wrote random {model} checkpoint in {time.perf_counter() - t:.1f} s")
        models, rss = load_models(tmp, dtype, dev, transformers)
        if peer:  # llama.cpp runs in a worker process: its own memory figures
            label, models[label] = load_peer(tmp, dtype, threads, prompt_lens, decode_context, decode_tokens, log)
            rss[label] = models[label].memory()
    labels = list(models)
    weights = {label: bytes_per_token(m, config) for label, m in models.items() if label.startswith("moelm")}
    main = weights[labels[0]]
    log(f"loaded {', '.join(labels)}: {main['params_total'] / 1e6:.0f}M parameters, "
        f"{main['bytes_per_token'] / 1e6:.0f} MB of weights read per decoded token")
    kl = None
    if dtype in QUANTIZED:
        kl = mean_kl(models[labels[0]], models[labels[1]], config.vocab_size, dev)
        log(f"mean KL of next-token distributions vs fp32: {kl:.2e}")

    g = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    for p in prompt_lens:
        ids = torch.randint(0, vocab, (1, p), generator=g).to(dev)
        med = _alternate(models, lambda m: time_prefill(m, ids), repeats)
        rows.append(dict(name=f"prefill {p} tok", unit="tok/s", **{lib: p / s for lib, s in med.items()}))
        log(row_line(rows[-1], labels))
    for b in batches:
        ids = torch.randint(0, vocab, (b, decode_context), generator=g).to(dev)
        decoders = {label: m for label, m in models.items() if b == 1 or not _is_peer(m)}
        med = _alternate(decoders, lambda m: time_decode(m, ids, decode_tokens), repeats)
        rows.append(dict(name=f"decode b{b}", unit="tok/s", **{lib: b / s for lib, s in med.items()}))
        log(row_line(rows[-1], labels))
        if b == 1:
            per_token = {lib: weights.get(lib, weights[labels[0]])["bytes_per_token"] for lib in med}
            rows.append(dict(name="decode b1 / bandwidth", unit="%",
                             **{lib: 100 * per_token[lib] / s / bw for lib, s in med.items()}))
    rows.append(dict(name="RSS added by load", unit="MB",
                     **{lib: (d / 1e6 if d is not None else float("nan")) for lib, (d, _) in rss.items()}))
    rows.append(dict(name="peak RSS after load", unit="MB", **{lib: pk / 1e6 for lib, (_, pk) in rss.items()}))
    from ..inference import cpu

    for m in models.values():
        if _is_peer(m):
            m.close()
    return dict(machine=machine_line(threads, device), cpu=cpu.info().line(), paths=cpu.choices(used_only=True),
                model=model, dtype=dtype, threads=threads, device=device,
                bandwidth=bw, weights=main, rss=rss, rows=rows, labels=labels, kl=kl, decode_tokens=decode_tokens,
                decode_context=decode_context, repeats=repeats)
