"""Speculative decoding measured: greedy decode tok/s with and without each drafting method on one model, in one
process, alternating (plain, method A, method B, ..., plain, ...), with the drafts' acceptance and, for MoE models,
the experts a check of several tokens reads (the union of their routed experts per layer) against one token's.

    python -m moelm.bench.speculative --model demo/pydoc-moe --methods plain lookup:8 --new-tokens 128
    python -m moelm.bench.speculative --model DIR --methods plain mtp assistant:DRAFT_DIR:4 --prompt-file p.txt
    python -m moelm.bench.speculative --model DIR --methods plain lookup:4 mtp --serve-streams 4 --prompt-file p.txt

Methods: plain, lookup:K (prompt_lookup_num_tokens=K), assistant:DIR[:K] (a draft model), mtp[:K] (the MTP head, up
to K drafts a step, default 1); a method with "@always" drafts at every step (what a drafted step costs) instead of
only while drafting pays.
Every method's tokens are compared with plain greedy decoding's; where they differ (a check of several tokens computes
in another order than one token at a time, which can turn a near tie), the table says where and by how much the plain
run's two best logits were apart there.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..generation import speculative
from .machine import machine_line


def method_kwargs(spec: str, dtype) -> tuple[str, dict]:
    from ..models.auto import AutoModelForCausalLM

    name, _, rest = spec.removesuffix("@always").partition(":")
    if name == "plain":
        return spec, {}
    if name == "lookup":
        return spec, dict(prompt_lookup_num_tokens=int(rest or 8))
    if name == "mtp":
        return spec, dict(speculative="mtp", **({"num_assistant_tokens": int(rest)} if rest else {}))
    if name == "assistant":
        path, _, k = rest.rpartition(":")
        if not k.isdigit():
            path, k = rest, ""
        draft = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return spec, dict(assistant_model=draft, **({"num_assistant_tokens": int(k)} if k else {}))
    raise ValueError(f"unknown method {spec!r}: plain, lookup:K, assistant:DIR[:K], mtp[:K]")


class Union:
    """Per MoE layer: the distinct routed experts of each forward, by the number of tokens it ran (ERNIE's routing:
    top-k of softmax + correction bias)."""

    def __init__(self, model):
        self.seen: dict[int, list[int]] = {}
        self.hooks = []
        for layer in model.model.layers:
            block = getattr(layer, "mlp", None)
            if block is None or not hasattr(block, "moe_statics"):
                continue
            self.hooks.append(block.register_forward_hook(self.record))

    def record(self, block, args, out):
        logits = out[1].float()  # [T, E]
        scores = logits.softmax(-1) + block.moe_statics.e_score_correction_bias.float()
        chosen = scores.topk(block.config.moe_k, dim=-1).indices
        self.seen.setdefault(chosen.shape[0], []).append(int(chosen.unique().numel()))

    def close(self):
        for h in self.hooks:
            h.remove()


def run(model_dir: str, methods: list[str], prompt: str, new_tokens: int, repeats: int, dtype, threads: int | None,
        repetition_penalty: float | None = None):
    from ..models.auto import AutoModelForCausalLM
    from ..text.tokenizer import AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kwargs = dict(method_kwargs(m, dtype) for m in methods)
    extra = {} if repetition_penalty is None else dict(repetition_penalty=repetition_penalty)
    times: dict[str, list[float]] = {m: [] for m in kwargs}
    counts, unions, plain, differ = {}, {}, None, {}
    for rep in range(repeats + 2):  # the first round warms up (kernel paths timed), the last counts experts
        for name, kw in kwargs.items():
            union = Union(model) if rep == repeats + 1 else None  # (its hooks keep the MoE blocks off the C path)
            pace = speculative.Pace
            speculative.Pace = speculative.Always if name.endswith("@always") else pace
            try:
                start = time.perf_counter()
                out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, **extra, **kw)
                took = time.perf_counter() - start
            finally:
                speculative.Pace = pace
            if union is not None:
                union.close()
                unions[name] = {t: statistics.mean(v) for t, v in sorted(union.seen.items())}
            if 0 < rep <= repeats:
                times[name].append(took)
            if name == "plain":
                plain = out
            elif plain is not None and name not in differ and not torch.equal(out.sequences, plain.sequences):
                at = int((out.sequences[0] != plain.sequences[0]).nonzero()[0]) - ids.shape[1]
                top = plain.scores[at][0].topk(2).values
                differ[name] = f"no: token {at}, top-2 gap {float(top[0] - top[1]):.2g}"
            if kw:
                counts[name] = dict(speculative.last_run)
    rows = []
    base = statistics.median(times["plain"]) if "plain" in times else None
    for name, t in times.items():
        med = statistics.median(t)
        c = counts.get(name)
        rows.append(dict(method=name, tok_s=new_tokens / med, speedup=base / med if base else None,
                         checks=c["steps"] if c else new_tokens, drafted=c["drafted_steps"] if c else 0,
                         acceptance=c["kept"] / c["proposed"] if c and c["proposed"] else None,
                         per_check=(new_tokens - 1) / c["steps"] if c and c["steps"] else 1.0,
                         union=unions.get(name, {}), same=differ.get(name, "yes")))
    return dict(rows=rows, prompt_tokens=ids.shape[1], machine=machine_line(threads or torch.get_num_threads(), "cpu"))


def serve_config(spec: str) -> tuple[dict | None, str | None]:
    """--speculative-config's dict for a method name (and the draft model's path), None for plain."""
    name, _, rest = spec.removesuffix("@always").partition(":")
    adaptive = not spec.endswith("@always")
    if name == "plain":
        return None, None
    if name == "lookup":
        return dict(method="ngram", num_speculative_tokens=int(rest or 8), prompt_lookup_min=1, prompt_lookup_max=3,
                    adaptive=adaptive), None
    if name == "mtp":
        return dict(method="mtp", num_speculative_tokens=int(rest or 1), adaptive=adaptive), None
    if name == "assistant":
        path, _, k = rest.rpartition(":")
        if not k.isdigit():
            path, k = rest, "4"
        return dict(method="draft_model", model=path, num_speculative_tokens=int(k), adaptive=adaptive), path
    raise ValueError(f"unknown method {spec!r}")


def serve(model_dir: str, methods: list[str], prompt: str, new_tokens: int, streams: int, repeats: int, dtype,
          threads: int | None):
    """The serving engine (moelm.serve) with each method's --speculative-config: `streams` greedy requests of the
    prompt at once, aggregate tok/s (median of the repeats after a warm-up round) and the drafts kept."""
    from ..models.auto import AutoModelForCausalLM
    from ..serve.engine import Engine, SamplingParams
    from ..text.tokenizer import AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ids = tok(prompt)["input_ids"]
    rows = []

    class Counts:
        def __init__(self):
            self.drafted = self.kept = 0

        def speculated(self, drafted, kept):
            self.drafted, self.kept = self.drafted + drafted, self.kept + kept

        def __getattr__(self, name):
            return lambda *args: None

    base = None
    for name in methods:
        config, path = serve_config(name)
        draft = AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if path else None
        counts = Counts()
        engine = Engine(model, tok, max_num_seqs=streams, max_model_len=len(ids) + new_tokens + 8,
                        max_num_batched_tokens=max(256, streams * 9), speculative=config, draft_model=draft,
                        metrics=counts)
        times = []
        with engine.start():
            for rep in range(repeats + 1):
                params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
                start = time.perf_counter()
                for r in [engine.submit(ids, params) for _ in range(streams)]:
                    list(r)
                if rep:
                    times.append(time.perf_counter() - start)
        tok_s = streams * new_tokens / statistics.median(times)
        base = tok_s if name == "plain" else base
        rows.append(dict(method=name, tok_s=tok_s, speedup=tok_s / base if base else None,
                         acceptance=counts.kept / counts.drafted if counts.drafted else None))
    return dict(rows=rows, prompt_tokens=len(ids), machine=machine_line(threads or torch.get_num_threads(), "cpu"))


def table(result) -> str:
    lines = ["| method | tok/s | × plain | checks | with drafts | drafts kept | tokens a check | experts a layer, "
             "by tokens a forward | tokens as plain |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        union = ", ".join(f"{t}: {u:.1f}" for t, u in r["union"].items()) or "—"
        kept = "—" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(f"| {r['method']} | {r['tok_s']:.1f} | {r['speedup'] or 1:.2f}× | {r['checks']} | "
                     f"{r['drafted']} | {kept} | "
                     f"{r['per_check']:.2f} | {union} | {r['same']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moelm.bench.speculative", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--methods", nargs="+", default=["plain", "lookup:8"])
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-file", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="generate's repetition_penalty (default: the model's generation_config)")
    p.add_argument("--serve-streams", type=int, default=None, metavar="N",
                   help="measure the serving engine instead: N greedy requests at once, each method as its "
                        "--speculative-config (lookup: ngram with n-grams of 1-3)")
    args = p.parse_args(argv)
    prompt = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    if not prompt:
        p.error("give --prompt or --prompt-file")
    if args.serve_streams and args.repetition_penalty is not None:
        p.error("--repetition-penalty is for generate; the serving engine's requests take the model's default")
    if args.serve_streams:
        result = serve(args.model, args.methods, prompt, args.new_tokens, args.serve_streams, args.repeats,
                       getattr(torch, args.dtype), args.threads)
        print(f"{args.model}, serving engine, {args.serve_streams} streams, {result['prompt_tokens']}-token prompt, "
              f"{args.new_tokens} new tokens each, greedy — {result['machine']}\n")
        print("| method | tok/s, all streams | × plain | drafts kept |\n|---|---:|---:|---:|")
        for r in result["rows"]:
            kept = "—" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
            print(f"| {r['method']} | {r['tok_s']:.1f} | {r['speedup'] or 1:.2f}× | {kept} |")
        return 0
    result = run(args.model, args.methods, prompt, args.new_tokens, args.repeats, getattr(torch, args.dtype),
                 args.threads, args.repetition_penalty)
    print(f"{args.model}, {result['prompt_tokens']}-token prompt, {args.new_tokens} new tokens, greedy — "
          f"{result['machine']}\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
