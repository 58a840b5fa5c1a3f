"""`moelm serve`: load the model, start the engine, run the app under uvicorn."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class Terminated(Exception):
    pass


def _terminate(signum, frame):
    raise Terminated()


def add_arguments(p):
    """vLLM's flag names."""
    p.add_argument("model_path", nargs="?", metavar="MODEL",
                   help="checkpoint directory or hub id in the local HF cache")
    p.add_argument("--model", default=None, help="the same as MODEL (or a llama.cpp .gguf file)")
    p.add_argument("--gguf-file", default=None, help="a GGUF file in MODEL to load (as from_pretrained's gguf_file=): "
                   "config, weights, tokenizer and chat template from it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names the API answers to (default: MODEL as given); the first is reported")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together (KV slots)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per sequence (default: the model's, at most 4096)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="tokens per step: running sequences' next tokens plus prompt chunks")
    p.add_argument("--max-waiting", type=int, default=256, help="sequences queued for a slot before 503s")
    p.add_argument("--block-size", type=int, default=16, help="positions per KV block (paged KV cache)")
    p.add_argument("--kv-cache-memory-bytes", type=byte_size, default=None, metavar="SIZE",
                   help="the KV block pool's size (e.g. 4GiB, 500M; default: every sequence can reach "
                        "--max-model-len)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, metavar="N",
                   help="the KV block pool's size in blocks (vLLM's name; on every device)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) served beside the model: a request whose model is NAME "
                        "runs with it (also vLLM's JSON form {\"name\": ..., \"path\": ...})")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV of full blocks of earlier prompts (default: on, off with MTP drafting)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set MOELM_API_KEY)")
    p.add_argument("--seed", type=int, default=None, help="seed for requests that give none")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="take a request's chat_template (off by default, as in vLLM: a template runs in the sandbox)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s fields: {"method": "ngram" | "mtp" | "draft_model", '
                        '"num_speculative_tokens": K, "prompt_lookup_min"/"prompt_lookup_max": N (ngram), "model": '
                        'DIR or a .gguf file and "quantization" (draft_model), "disable_by_batch_size": N; '
                        'moelm\'s "adaptive": false drafts at every step}')
    p.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info (the tokenizer's configuration and chat template, as vLLM does; "
                        "lm-eval's tokenizer_backend=remote reads it)")
    p.add_argument("--expert-metrics", action="store_true",
                   help="count in /metrics the tokens routed to each expert of each MoE layer "
                        "(moelm:expert_tokens_total; an MoE model)")
    p.add_argument("--shutdown-timeout", type=float, default=5, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long the requests in flight may run on before they are aborted "
                        "(a stream ends with finish_reason 'abort'; vLLM's flag, whose default is 0)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))


def byte_size(text: str) -> int:
    """'4GiB', '4G', '500M', '1.5GB', '1000000' -> bytes: k, M, G, T (and kB/KB, MB, GB, TB) powers of 1000, with
    'i' (KiB, Mi, ..) powers of 1024, as vLLM reads its sizes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKMGT]?)(i?)B?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 500M, 1000000)")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def lora_modules(specs: list[str] | None) -> dict[str, str]:
    """--lora-modules NAME=PATH (or vLLM's JSON {"name", "path"}) -> {name: path}; ValueError naming a bad one."""
    out = {}
    for spec in specs or []:
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules {spec}: the JSON form needs \"name\" and \"path\"") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {spec}: give NAME=PATH")
        if name in out:
            raise ValueError(f"--lora-modules: the name {name} is given twice")
        out[name] = path
    return out


def check_extra():
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client", "pydantic"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"moelm serve needs the serve extra: pip install 'moelm[serve]' "
                          f"(missing: {', '.join(missing)})")


def check_address(host: str, port: int):
    """OSError naming the address when it cannot be listened on (before minutes of loading a model)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(f"could not listen on {host}:{port}: {e.strerror}") from None


def drain_then_abort(server, engine, seconds: float):
    """Make uvicorn's shutdown abort the requests still running after `seconds` (or at a second Ctrl-C) in the
    engine, so that each ends its response (a stream: finish_reason "abort", [DONE]) rather than being cancelled
    mid-way."""
    shutdown = server.shutdown

    async def drain(sockets=None):
        task = asyncio.ensure_future(shutdown(sockets))
        deadline = time.monotonic() + seconds
        while not task.done() and time.monotonic() < deadline and not server.force_exit:
            await asyncio.wait([task], timeout=0.1)
        engine.abort()  # what still runs (nothing after a drain; all of it after a forced exit)
        await task
        for _ in range(20):  # after a forced exit too, the aborted requests end their responses
            if not server.server_state.tasks:
                break
            await asyncio.sleep(0.05)

    server.shutdown = drain


def load_draft(speculative, model):
    """The draft model of --speculative-config, loaded as the model is (dtype, device): a directory or a .gguf file."""
    from ..models.auto import AutoModelForCausalLM

    path = Path(speculative.model)
    if not path.exists():
        raise FileNotFoundError(f"--speculative-config: model {speculative.model}: no such checkpoint")
    gguf = {"gguf_file": str(path)} if path.is_file() and path.suffix == ".gguf" else {}
    return AutoModelForCausalLM.from_pretrained(None if gguf else speculative.model, dtype=model.dtype,
                                                device=model.device, quantization=speculative.quantization, **gguf)


def run(args, load):
    """The command; `load(args)` returns (model, tokenizer) as the other commands load them."""
    check_extra()
    import uvicorn

    from ..models.modeling import moe_blocks
    from ..text.chat_template import compile_chat_template
    from .app import create_app
    from .engine import Engine
    from .speculation import SpeculativeConfig

    model_path = args.model_path or args.model
    if not model_path:
        raise ValueError("give the model: moelm serve MODEL")
    if args.model_path and args.model and args.model_path != args.model:
        raise ValueError(f"two models given: {args.model_path} and --model {args.model}")
    args.model = model_path
    api_key = args.api_key or os.environ.get("MOELM_API_KEY") or None
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    template = args.chat_template
    if template is not None and "{" not in template:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template {template}: no such file (and not a template)")
        try:
            template = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--chat-template {path}: not UTF-8 text: {e}") from None
        compile_chat_template(template, f"--chat-template {path}")
    elif template is not None:
        compile_chat_template(template, "--chat-template")
    speculative = None if args.speculative_config is None else SpeculativeConfig.parse(args.speculative_config)
    check_address(args.host, args.port)
    modules = lora_modules(args.lora_modules)
    model, tokenizer = load(args)
    own = getattr(tokenizer, "chat_template", None)
    if template is None and own:  # the checkpoint's (each of them, tool_use's included)
        for text in own.values() if isinstance(own, dict) else [own]:
            compile_chat_template(text, tokenizer.template_origin(text))
    adapters = None
    if modules:
        from .lora import Adapters

        adapters = Adapters.load(model, modules)
    if args.expert_metrics and not moe_blocks(model):
        raise ValueError(f"--expert-metrics: {model_path} is a dense model (no MoE layers): it has no experts to count")
    draft = None
    if speculative is not None and speculative.method == "draft_model":
        draft = load_draft(speculative, model)
    engine = Engine(model, tokenizer, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
                    seed=args.seed, speculative=speculative, draft_model=draft, block_size=args.block_size,
                    num_blocks=args.num_gpu_blocks_override, kv_cache_memory=args.kv_cache_memory_bytes,
                    enable_prefix_caching=args.enable_prefix_caching, adapters=adapters,
                    expert_metrics=args.expert_metrics)
    configured = model.generation_config.to_dict()
    defaults = {k: configured[k] for k in SAMPLING_DEFAULTS if k in configured}
    names = args.served_model_name or [model_path]
    app = create_app(engine, tokenizer, names, api_key=api_key, chat_template=template, defaults=defaults,
                     tokenizer_info=args.enable_tokenizer_info_endpoint,
                     trust_request_chat_template=args.trust_request_chat_template)
    cache = engine.cache
    kv = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    print(f"moelm serve: {model_path} as {', '.join(names)} on http://{args.host}:{args.port} "
          f"({args.max_num_seqs} sequences of up to {engine.max_model_len} positions; KV {kv / 2**20:.0f} MiB: "
          f"{cache.num_blocks} blocks of {cache.block_size} positions, "
          f"prefix caching {'on' if cache.prefix_caching else 'off'}"
          f"{'; sampling defaults from generation_config: ' + str(defaults) if defaults else ''}"
          f"{'; API key required' if api_key else ''}"
          f"{'; speculative: ' + speculative.method if speculative else ''}"
          f"{'; expert metrics' if args.expert_metrics else ''})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    engine.warmup()
    print(f"moelm serve: warmed up in {time.perf_counter() - started:.1f} s (kernel paths measured on a first start "
          "are remembered for this CPU)", file=sys.stderr, flush=True)
    engine.start()
    try:
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5, lifespan="off")
        server = uvicorn.Server(config)
        drain_then_abort(server, engine, args.shutdown_timeout)
        signal.signal(signal.SIGTERM, _terminate)
        try:
            server.run()
        except (KeyboardInterrupt, Terminated):  # uvicorn re-raises the signal it shut down on
            pass
        except SystemExit:  # uvicorn exits when it cannot start (it logged why)
            pass
        finally:  # shut down: a further signal (a supervisor's second) ends the process at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if not server.started:
            raise OSError(f"could not listen on {args.host}:{args.port} (see above)")
    finally:
        engine.stop()
    print("moelm serve: stopped", file=sys.stderr)
