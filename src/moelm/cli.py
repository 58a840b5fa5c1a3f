"""The `moelm` command: generate, chat, serve, info, new, quantize, bench, finetune, eval, merge, experts, prune.
Errors print one line and exit non-zero, no traceback."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(argv)
    except KeyboardInterrupt:  # Ctrl-C while the command's modules are imported, or while it runs
        print(file=sys.stderr)
        return 130


def run_command(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) and not hasattr(args, "run"):  # the command came later (`moelm -- new ...`)
        parser = build_parser(args.command)
        args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) != "finetune":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # finetune: --section.key=value overrides of the recipe (load_recipe checks them)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        check_cache()
        return args.run(args) or 0
    except BrokenPipeError:
        return 0
    except (CliError, OSError, ValueError, RuntimeError, ImportError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it once
            print(f"moelm: error: {message}", file=sys.stderr)
        return 1


def check_cache():
    """MOELM_CACHE, where set, must be a directory, or a path where one can be made (compiled kernels and measured
    choices are kept there). One this process cannot write (read-only, full) is not an error: nothing is kept."""
    cache = os.environ.get("MOELM_CACHE")
    if not cache:
        return
    path = Path(cache).absolute()
    while not path.exists() and path != path.parent:  # the directory it would be made in
        path = path.parent
    if not path.is_dir():
        raise CliError(f"MOELM_CACHE={cache} is not a writable directory")


def check_seed(seed):
    if seed is not None and not 0 <= seed < 2**64:  # torch.manual_seed's range; -1 is no "random seed" here
        raise CliError(f"--seed must be in 0..2**64-1, got {seed}")


ALL = "*"


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The whole parser, or with `command` (the subcommand given, None for none) only that subcommand's arguments:
    the others' come from modules that import torch, which `moelm --help` need not wait for."""
    parser = argparse.ArgumentParser(prog="moelm", description="ERNIE 4.5 / ERNIE 4.5 MoE / PhiMoE in PyTorch")
    sub = parser.add_subparsers(dest="command")

    def wanted(*names: str) -> bool:
        return command == ALL or command in names

    def model_args(p):
        p.add_argument("--model", required=True, help="checkpoint directory or hub id in the local HF cache (or a "
                       "llama.cpp .gguf file)")
        p.add_argument("--gguf-file", default=None, help="a GGUF file in --model to load (as from_pretrained's "
                       "gguf_file=): config, weights and tokenizer from it")
        runtime_args(p)

    def runtime_args(p):
        p.add_argument("--dtype", default="auto", choices=DTYPES)
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        p.add_argument("--quantization", default=None, choices=("int8", "int4"),
                       help="quantize the weights while loading (weight-only int8 or int4)")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads at most (default: all cores); decoding measures whether fewer are faster")

    def sampling_args(p):
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--system", default=None, help="system message (chat template)")
        p.add_argument("--speculative", default=None, choices=("mtp",),
                       help="speculative decoding with ERNIE 4.5 MoE's multi-token-prediction head")
        p.add_argument("--prompt-lookup-num-tokens", type=int, default=None, metavar="K",
                       help="speculative decoding: up to K drafted tokens by n-gram lookup in the sequence")
        p.add_argument("--assistant-model", default=None, metavar="DIR",
                       help="speculative decoding: a smaller draft model sharing the tokenizer")
        p.add_argument("--num-assistant-tokens", type=int, default=None, metavar="K",
                       help="tokens the assistant model drafts a step (default 5, then adapted), or the MTP head "
                            "at most (default 1)")

    p = sub.add_parser("generate", help="stream a completion of a prompt to stdout")
    model_args(p)
    sampling_args(p)
    p.add_argument("--prompt", required=True, help="the prompt; '-' reads standard input")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print prompt and generated token counts and tokens/s on stderr")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /system TEXT, /exit)")
    model_args(p)
    sampling_args(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("info", help="family, sizes, parameters, MoE layout, memory (per rank with --tp / --ep)")
    p.add_argument("--model", required=True, help="checkpoint directory, hub id in the local cache, or a named "
                                                  "config (moelm new --help lists them)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for the per-rank memory plan")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (a multiple of --tp)")
    p.add_argument("--quantization", default=None, choices=("int8", "int4"))
    p.add_argument("--tokens", type=int, default=4096, help="prefill step size for the largest activation")
    p.add_argument("--load", action="store_true", help="after the plan, load the checkpoint (in --dtype, with "
                                                       "--quantization) and print the RSS measured after loading "
                                                       "and its peak")
    p.set_defaults(run=cmd_info)

    names = ""
    if wanted("new"):
        from .config import NAMED_CONFIGS

        names = ", ".join(NAMED_CONFIGS)
    p = sub.add_parser("new", help="write a random checkpoint of a named config, with tokenizer and chat template",
                       description="Write a random-weight checkpoint of a named config, with a tokenizer and chat "
                                   f"template. Config names: {names}.")
    p.add_argument("config_name", metavar="CONFIG", help=f"one of: {names}")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    p.add_argument("--quantization", default=None, choices=("int8", "int4"),
                   help="write int8/int4 weights (compressed-tensors) directly, one tensor at a time")
    p.set_defaults(run=cmd_new)

    p = sub.add_parser("quantize", help="write a checkpoint's weights as int8/int4 (compressed-tensors), streamed",
                       description="Rewrite a bf16/fp32 checkpoint with moelm's int8 or int4 weights in the "
                                   "compressed-tensors format (transformers and vLLM read it; from_pretrained loads it "
                                   "without re-quantizing), one tensor at a time: memory about the largest tensor.")
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id in the local HF cache")
    p.add_argument("out_dir", metavar="OUT")
    p.add_argument("--quantization", required=True, choices=("int8", "int4"))
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (a multiple of 32, default "
                                                                "64; 32 where it does not divide a layer's inputs)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    if wanted("serve"):
        from .serve.server import add_arguments as serve_arguments

        serve_arguments(p)
        runtime_args(p)
        p.set_defaults(run=cmd_serve)

    parsers = {name: sub.add_parser(name, **kw) for name, kw in (
        ("finetune", dict(help="fine-tune from a recipe (full or LoRA; torchrun for FSDP2/EP)",
                          description="Fine-tune as a recipe says; `--section.key=value` after the recipe overrides "
                                      "a key. One process as is, several with `torchrun --nproc-per-node N -m moelm "
                                      "finetune ...`.")),
        ("eval", dict(help="multiple-choice accuracy (hellaswag-style) or perplexity on a local file")),
        ("merge", dict(help="fold a LoRA adapter into its base: a hub checkpoint with tokenizer")))}
    if wanted(*parsers):
        from .train import commands

        commands.add_finetune_arguments(parsers["finetune"])
        parsers["finetune"].set_defaults(run=lambda a: commands.finetune(a, a.overrides))
        commands.add_eval_arguments(parsers["eval"])
        parsers["eval"].set_defaults(run=commands.evaluate)
        commands.add_merge_arguments(parsers["merge"])
        parsers["merge"].set_defaults(run=commands.merge)

    p = sub.add_parser("experts", help="what each MoE layer's experts do on a data file: report.json, report.html, "
                       "plots", description="Run the model over a data file and report, per MoE layer and expert, "
                       "the routing it does: load, gate mass, output norm, REAP saliency, balance (NeMo's metrics), "
                       "adjacent-token overlap and co-activation; writes OUT/report.json, report.html and PNGs.")
    q = sub.add_parser("prune", help="fewer experts per MoE layer, chosen from an expert report: a hub checkpoint")
    if wanted("experts", "prune"):
        from .experts import commands as expert_commands

        expert_commands.add_experts_arguments(p)
        runtime_args(p)
        p.set_defaults(run=lambda a: expert_commands.experts(a, load))
        expert_commands.add_prune_arguments(q)
        q.set_defaults(run=expert_commands.prune)

    p = sub.add_parser("bench", help="speed of moelm vs transformers on a random model (prefill, decode, RSS)")
    if wanted("bench"):
        from .bench.cli import add_arguments

        add_arguments(p)
        p.set_defaults(run=cmd_bench)
    for p in sub.choices.values():  # `chat --prompt 3` must not be taken for --prompt-lookup-num-tokens 3
        p.allow_abbrev = False
    return parser


# ---------------------------------------------------------------- loading

def check_device(device: str):
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CliError(f"--device {device} requested but no CUDA GPU is available")
        d = torch.device(device)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
        return d
    raise CliError(f"unknown --device {device!r}; expected cpu, cuda or cuda:N")


def load(args):
    device = check_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be at least 1, got {args.threads}")
        if args.threads > (os.cpu_count() or 1):
            raise CliError(f"--threads {args.threads} is more than the {os.cpu_count()} CPU cores")
        import torch

        torch.set_num_threads(args.threads)
    from .config.base import AutoConfig
    from .models.auto import AutoModelForCausalLM
    from .text.tokenizer import AutoTokenizer

    path, gguf = args.model, getattr(args, "gguf_file", None)
    if gguf is None and str(path).endswith(".gguf") and Path(path).is_file():
        path, gguf = None, path
    extra = {"gguf_file": gguf} if gguf is not None else {}
    AutoConfig.from_pretrained(path, gguf)  # a missing or broken config named before the tokenizer's files
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=device,
                                                 quantization=args.quantization, **extra)
    return model, tokenizer


def generation_kwargs(args) -> dict:
    if args.max_new_tokens <= 0:
        raise CliError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    kwargs = {"max_new_tokens": args.max_new_tokens}
    check_seed(args.seed)
    if args.system == "":
        raise CliError("--system is empty")
    if args.temperature is not None and args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature == 0:
        kwargs["do_sample"] = False
    elif args.temperature is not None or args.top_p is not None or args.top_k is not None:
        kwargs["do_sample"] = True
        for key in ("temperature", "top_p", "top_k"):
            if getattr(args, key) is not None:
                kwargs[key] = getattr(args, key)
    for flag in ("prompt_lookup_num_tokens", "num_assistant_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be positive, got {value}")
        if value is not None:
            kwargs[flag] = value
    if args.num_assistant_tokens is not None and args.assistant_model is None and not args.speculative:
        raise CliError("--num-assistant-tokens is for --assistant-model or --speculative mtp")
    if args.speculative:
        kwargs["speculative"] = args.speculative
    return kwargs


def load_assistant(args, model) -> dict:
    """generate's assistant_model= for --assistant-model, loaded as the model is (dtype, device, quantization)."""
    if args.assistant_model is None:
        return {}
    from .models.auto import AutoModelForCausalLM

    if not Path(args.assistant_model).exists():
        raise CliError(f"--assistant-model {args.assistant_model}: no such checkpoint")
    return {"assistant_model": AutoModelForCausalLM.from_pretrained(
        args.assistant_model, dtype=model.dtype, device=model.device, quantization=args.quantization)}


def encode(tokenizer, model, messages_or_text, chat: bool, max_new_tokens: int):
    if chat:
        enc = tokenizer.apply_chat_template(messages_or_text, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    else:
        enc = tokenizer(messages_or_text, return_tensors="pt")
    ids = enc["input_ids"]
    context = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > context:
        raise CliError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} it exceeds the "
                       f"model's context of {context} tokens")
    return ids.to(model.device), enc["attention_mask"].to(model.device)


def utf8(text: str, what: str) -> str:
    """`text` as argv or stdin decoded it (bytes that are not UTF-8 become lone surrogates): a CliError naming the
    bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        try:
            shown = " ".join(f"0x{b:02x}" for b in bad.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            shown = " ".join(f"U+{ord(c):04X}" for c in bad)
        raise CliError(f"{what} is not valid UTF-8: it holds {shown} at character {e.start}") from None
    return text


def lenient_stdin():
    """Standard input decoded with undecodable bytes kept (as lone surrogates) for utf8() to name them."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def make_streamer(tokenizer, echo: bool = True):
    from .text.streamers import TextStreamer

    class Recording(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.text = []

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.text.append(text)
            if echo:
                print(text, end="" if not stream_end else "\n", flush=True)

    return Recording()


# ---------------------------------------------------------------- commands

def cmd_generate(args):
    import torch

    if args.prompt == "-":
        lenient_stdin()
    prompt = utf8(sys.stdin.read(), "the prompt (standard input)") if args.prompt == "-" else \
        utf8(args.prompt, "--prompt")
    if not prompt:
        raise CliError("the prompt is empty")
    if args.system:
        utf8(args.system, "--system")
    kwargs = generation_kwargs(args)
    model, tokenizer = load(args)
    kwargs.update(load_assistant(args, model))
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids, mask = encode(tokenizer, model, messages, True, args.max_new_tokens)
    else:
        ids, mask = encode(tokenizer, model, prompt, False, args.max_new_tokens)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, streamer=make_streamer(tokenizer), tokenizer=tokenizer,
                             **kwargs)
    if args.verbose:
        seconds = time.perf_counter() - started
        new = out.shape[1] - ids.shape[1]
        print(f"moelm: {ids.shape[1]} prompt tokens, {new} generated in {seconds:.2f} s "
              f"({new / seconds:.1f} tokens/s, prefill included)", file=sys.stderr)
        if {"speculative", "assistant_model", "prompt_lookup_num_tokens"} & set(kwargs):
            from .generation.speculative import last_run

            print(f"moelm: speculative: {last_run.get('kept', 0)} of {last_run.get('proposed', 0)} drafted tokens "
                  f"kept, in {last_run.get('drafted_steps', 0)} of {last_run.get('steps', 0)} steps",
                  file=sys.stderr)


def cmd_chat(args):
    import torch

    kwargs = generation_kwargs(args)
    system = utf8(args.system, "--system") if args.system else args.system
    model, tokenizer = load(args)
    kwargs.update(load_assistant(args, model))
    if tokenizer.chat_template is None:
        raise CliError(f"{args.model} has no chat template; use `moelm generate` instead")
    lenient_stdin()
    history: list[dict] = []
    cache = None  # (the last reply's KV cache, the token ids it holds): the next turn prefills only what is new
    speculative = next((k for k in ("assistant_model", "prompt_lookup_num_tokens", "speculative") if k in kwargs), None)
    interactive = sys.stdin.isatty()
    if interactive:
        print("moelm chat — /reset clears the conversation, /system TEXT sets the system message, /exit quits; "
              "Ctrl-C stops a reply.", file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to quit)", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        try:
            utf8(line, "the line")
        except CliError as e:
            print(f"moelm: {e}; skipped", file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"(system message {'set' if system else 'cleared'}; conversation cleared)", file=sys.stderr)
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        try:
            ids, mask = encode(tokenizer, model, messages, True, args.max_new_tokens)
        except CliError as e:
            print(f"moelm: {e}; /reset to start over", file=sys.stderr)
            continue
        streamer = make_streamer(tokenizer)
        past = reusable(cache, ids[0])
        cache = None  # a reply cut short leaves the cache between two states
        try:
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, streamer=streamer, tokenizer=tokenizer,
                                     past_key_values=past, return_dict_in_generate=True, **kwargs)
        except KeyboardInterrupt:
            print("\n(reply interrupted)", file=sys.stderr)
            continue
        if speculative is None and out.past_key_values is not None:
            cache = (out.past_key_values, out.sequences[0, :out.past_key_values.get_seq_length()])
        history = messages[len(messages) - len(history) - 1:] + [
            {"role": "assistant", "content": "".join(streamer.text).strip()}]


def reusable(cache, ids):
    """The cache of the last turn cut to the tokens it shares with this turn's prompt ids [L] (at least one left to
    feed), or None where it shares none."""
    if cache is None:
        return None
    past, held = cache
    n = int((held[:len(ids)] == ids[:len(held)]).long().cumprod(0).sum())
    n = min(n, len(ids) - 1)
    if n == 0:
        return None
    past.crop(n)
    return past


def cmd_info(args):
    from .models.info import info

    for flag in ("tp", "ep", "tokens"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for key, value in info(args.model, args.dtype, args.tp, args.ep, args.quantization, args.tokens, args.load):
        print(f"{key:>11}: {value}")


def cmd_new(args):
    from pathlib import Path

    from .config import named_config
    from .models.scaffold import new_checkpoint

    named_config(args.config_name)  # an unknown name is the first thing to say
    check_seed(args.seed)
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CliError(f"{out} exists and is not an empty directory; pass --force to write into it")
    out = new_checkpoint(args.config_name, args.out_dir, seed=args.seed, quantization=args.quantization)
    print(f"wrote a random {args.config_name} checkpoint with a tokenizer and chat template to {out}")


def cmd_quantize(args):
    from pathlib import Path

    from .inference.quantization import QuantizationConfig
    from .loading.quantized import quantize_checkpoint
    from .models.auto import AutoModelForCausalLM

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CliError(f"{out} exists and is not an empty directory; pass --force to write into it")
    if args.group_size is not None and args.quantization != "int4":
        raise CliError("--group-size is for --quantization int4 (int8 has one scale per output row)")
    config = QuantizationConfig(args.quantization, 64 if args.group_size is None else args.group_size)
    files = quantize_checkpoint(AutoModelForCausalLM.class_for, args.model, out, config, args.max_shard_size)
    size = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    print(f"wrote {args.quantization} weights of {args.model} to {out} ({size / 2**30:.2f} GiB)")


def cmd_serve(args):
    from .serve.server import run

    check_seed(args.seed)
    return run(args, load)


def cmd_bench(args):
    from .bench.cli import main_from_args

    return main_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
