"""Usage-aware mixed-bit experts (issue 24): uniform int4 / int8 against the routed experts int4 with each MoE
layer's most-used 20% of them (and the shared experts) int8, the hot ones chosen from an expert report (`moelm
experts`) of other text than the one measured. Per quantization: mean KL divergence of next-token distributions to
the fp32 model over every position of held-out text, the routing-weighted bytes of weights read per token (each
expert's bytes times the share of tokens that chose it on that text: sum_e P(e chosen) x bytes(e), plus every
non-expert weight but the input embedding), and decode tok/s at batch 1 (greedy, alternating, median).

On the demo model (demo/pydoc-moe) and on a random 2-layer slice of ERNIE-4.5-21B-A3B (moelm.bench.runner
bench_config("ernie-21b-2l"), written once to --work, given the demo's tokenizer so that `moelm experts` can read the
same text). Text: build/demo_pydoc/ as scripts/make_demo.py leaves it: the hot experts from the first training pages
(corpus.jsonl), everything measured on the held-out validation pages (val.jsonl).

    python benchmarks/mixed_bits.py --out /tmp/s/bench_B.md [--work /tmp/mixed-bits] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import moelm
from moelm.bench.machine import machine_line
from moelm.bench.runner import bench_config, bytes_per_token, write_checkpoint
from moelm.inference import cpu
from moelm.inference.mixed import MixedExperts
from moelm.inference.quantization import QuantizedExperts
from moelm.nn.moe import Experts
from moelm.train.data import DataConfig, collate, load_examples

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "pydoc-moe"
TEXT = ROOT / "build" / "demo_pydoc"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HOT = 0.2


def specs(calib: Path, shuffled: Path) -> dict[str, object]:
    """label -> from_pretrained's quantization=."""
    hot = {"experts": "int4", "hot_experts": "int8", "hot_fraction": HOT}
    return {
        "int4": "int4",
        "int4, hot 20% + shared int8": {"mode": "int4", **hot, "report": str(calib)},
        "int4, random 20% + shared int8": {"mode": "int4", **hot, "report": str(shuffled)},
        "experts int4, rest int8": {"experts": "int4"},
        "experts int4, hot 20% + shared + rest int8": {**hot, "report": str(calib)},
        "experts int4, random 20% + shared + rest int8": {**hot, "report": str(shuffled)},
        "int8": "int8",
    }


TIMED = ("int4", "int4, hot 20% + shared int8", "experts int4, rest int8", "experts int4, hot 20% + shared + rest int8",
         "int8")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def texts(work: Path, calib_pages: int, eval_chars: int | None) -> tuple[Path, Path]:
    """(calibration text: the first training pages, held-out text: the validation pages, cut to eval_chars)."""
    corpus, val = TEXT / "corpus.jsonl", TEXT / "val.jsonl"
    if not corpus.is_file() or not val.is_file():
        sys.exit(f"{corpus} / {val} missing: run python scripts/make_demo.py (its steps 1-2 write them)")
    calib = work / f"calib-{calib_pages}.jsonl"
    with open(corpus, encoding="utf-8") as f:
        calib.write_text("".join(line for _, line in zip(range(calib_pages), f)), encoding="utf-8")
    held = work / f"val-{eval_chars}.jsonl"
    records, left = [], eval_chars
    for line in val.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        if left is not None:
            text, left = text[:left], left - len(text[:left])
        if text:
            records.append(json.dumps({"text": text}) + "\n")
    held.write_text("".join(records), encoding="utf-8")
    return calib, held


def report(model_dir: Path, data: Path, out: Path, seq: int, threads: int) -> tuple[dict, str]:
    """The expert report of the fp32 model on `data`: `moelm experts`, or (that command failing) forward hooks on
    the experts modules counting the chosen experts."""
    cmd = [sys.executable, "-m", "moelm.cli", "experts", str(model_dir), "--data", str(data), "--kind", "text",
           "--out", str(out), "--seq-length", str(seq), "--dtype", "float32", "--threads", str(threads),
           "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads((out / "report.json").read_text()), "moelm experts"
    log(f"moelm experts failed ({done.stderr.strip()[-400:]}): counting with forward hooks instead")
    model = moelm.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    counts, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            layer = int(name.split(".")[2])
            counts[layer] = torch.zeros(module.num_experts, dtype=torch.long)
            hooks.append(module.register_forward_hook(lambda m, a, o, layer=layer: counts[layer].add_(
                torch.bincount(a[1].reshape(-1), minlength=m.num_experts))))
    with torch.no_grad():
        for ids in batches(model_dir, data, seq):
            model(ids)
    for h in hooks:
        h.remove()
    top_k = model.config.moe_k
    data = {"schema": "moelm.experts/1", "model_type": model.config.model_type, "top_k": top_k, "layers": [
        {"layer": layer, "num_experts": len(c), "top_k": top_k, "tokens": c.tolist()} for layer, c in counts.items()]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(data))
    return data, "forward hooks"


def shuffled(rep: dict, out: Path, seed: int = 0) -> Path:
    """The report with each layer's token counts shuffled: hot experts at random (a control)."""
    rng = random.Random(seed)
    data = json.loads(json.dumps(rep))
    for layer in data["layers"]:
        rng.shuffle(layer["tokens"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(data))
    return out


def batches(model_dir: Path, data: Path, seq: int, batch: int = 4):
    tokenizer = moelm.AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(DataConfig(kind="text", path=str(data), seq_length=seq), tokenizer)
    for i in range(0, len(examples), batch):
        yield collate(examples[i:i + batch], 0)["input_ids"]


def expected_bytes(model, rep: dict) -> tuple[int, int]:
    """(routing-weighted bytes of weights read per token, bytes_per_token's figure: top-k of E per expert stack)."""
    embed = model.get_input_embeddings().weight
    stacks = [n for n, m in model.named_modules() if isinstance(m, (QuantizedExperts, MixedExperts, Experts))]
    outer = {n: model.get_submodule(n) for n in stacks if not any(n.startswith(o + ".") for o in stacks)}
    inside = tuple(f"{n}." for n in outer)
    dense = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                if not n.startswith(inside) and t is not embed)
    shares = {}
    for layer in rep["layers"]:
        tokens = torch.tensor(layer["tokens"], dtype=torch.float64)
        shares[layer["layer"]] = tokens / (tokens.sum() / layer["top_k"])  # P(expert chosen by a token)
    routed = 0.0
    for name, m in outer.items():
        each = per_expert_bytes(m)
        routed += float((shares[int(name.split(".")[2])] * each).sum())
    return int(dense + routed), bytes_per_token(model, model.config)["bytes_per_token"]


def per_expert_bytes(m) -> torch.Tensor:
    """[E] bytes of each expert's weights (and scales)."""
    def each(stack) -> float:
        return sum(t.numel() * t.element_size() for t in [*stack.parameters(), *stack.buffers()]) / stack.num_experts
    if isinstance(m, MixedExperts):
        out = torch.full((m.num_experts,), each(m.cold), dtype=torch.float64)
        out[list(m.hot_ids)] = each(m.hot)
        return out
    return torch.full((m.num_experts,), each(m), dtype=torch.float64)


class torch_paths:
    """PyTorch's ops for every layer (quantized ones: dequantized weights, fp32 matmul): the KL then measures the
    weights' quantization alone, not the integer prefill paths' rounding of activations, nor which path the
    timing picked."""

    def __enter__(self):
        os.environ["MOELM_KERNELS"] = "torch"
        cpu.reset()

    def __exit__(self, *exc):
        del os.environ["MOELM_KERNELS"]
        cpu.reset()


@torch.no_grad()
def logprobs(model, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch_paths():
        return [model(ids).logits.float().log_softmax(-1) for ids in chunks]


def mean_kl(ref: list[torch.Tensor], model, chunks: list[torch.Tensor]) -> float:
    """Mean over every position of KL(fp32 || model)."""
    total = n = 0
    with torch.no_grad(), torch_paths():
        for p, ids in zip(ref, chunks):
            q = model(ids).logits.float().log_softmax(-1)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            n += p.shape[0] * p.shape[1]
    return total / n


def decode_rates(models: dict, prompt: torch.Tensor, new: int, rounds: int) -> dict[str, float]:
    """Decode tok/s at batch 1: (new - 1) tokens over the time of generate(new) less that of generate(1) (the
    prefill and first token), alternating the models, median of rounds (after a warm-up each)."""
    def run(model, n):
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    for model in models.values():
        run(model, new)
    times = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            times[label].append(run(model, new) - run(model, 1))
    return {label: (new - 1) / statistics.median(ts) for label, ts in times.items()}


def measure(name: str, model_dir: Path, work: Path, calib_text: Path, eval_text: Path, seq: int, args) -> dict:
    log(f"== {name}: reports ({calib_text.name}, {eval_text.name})")
    calib_rep, how = report(model_dir, calib_text, work / f"{name}-calib", seq, args.threads)
    eval_rep, how_eval = report(model_dir, eval_text, work / f"{name}-eval", seq, args.threads)
    random_dir = shuffled(calib_rep, work / f"{name}-random")
    chunks = list(batches(model_dir, eval_text, seq))
    ref_model = moelm.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = logprobs(ref_model, chunks)
    prompt = chunks[0][:1, :16]
    del ref_model
    rows, timed = {}, {}
    for label, spec in specs(work / f"{name}-calib", random_dir).items():
        log(f"== {name}: {label}")
        model = moelm.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization=spec)
        kl = mean_kl(ref, model, chunks)
        weighted, topk = expected_bytes(model, eval_rep)
        hot = [m.hot_ids for m in model.modules() if isinstance(m, MixedExperts)]
        rows[label] = {"kl": kl, "bytes": weighted, "bytes_topk": topk, "hot": hot}
        log(f"   KL {kl:.3e}  bytes/token {weighted / 2**20:.2f} MiB (top-k count {topk / 2**20:.2f})  hot {hot[:2]}")
        if label in TIMED:
            timed[label] = model
        del model
    log(f"== {name}: decode")
    for label, rate in decode_rates(timed, prompt, args.new_tokens, args.rounds).items():
        rows[label]["tok_s"] = rate
    tokens = sum(c.numel() for c in chunks)
    hot_share = mean_hot_share(calib_rep, eval_rep)
    return {"rows": rows, "tokens": tokens, "report": how, "report_eval": how_eval, "hot_share": hot_share,
            "experts": calib_rep["layers"][0]["num_experts"], "layers": [x["layer"] for x in calib_rep["layers"]]}


def mean_hot_share(calib: dict, held: dict) -> tuple[float, float]:
    """(share of the routed choices on the calibration text, on the held-out text) that go to the experts hot by
    the calibration report, averaged over the MoE layers."""
    out = []
    for a, b in zip(calib["layers"], held["layers"]):
        e = len(a["tokens"])
        n = max(1, math.ceil(HOT * e - 1e-9))  # as moelm.inference.mixed.hot_experts
        hot = sorted(range(e), key=lambda i: -a["tokens"][i])[:n]
        out.append((sum(a["tokens"][i] for i in hot) / sum(a["tokens"]),
                    sum(b["tokens"][i] for i in hot) / sum(b["tokens"])))
    return tuple(statistics.mean(x) for x in zip(*out))


def table(name: str, result: dict) -> str:
    rows = result["rows"]
    base = rows["int4"]
    lines = [f"| {name} | mean KL to fp32 | KL / int4's | weights read per token | vs int4 | decode tok/s (b1) |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        rate = f"{r['tok_s']:.1f}" if "tok_s" in r else "-"
        lines.append(f"| {label} | {r['kl']:.2e} | {r['kl'] / base['kl']:.2f} | {r['bytes'] / 2**20:.2f} MiB | "
                     f"{r['bytes'] / base['bytes']:.2f}x | {rate} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/s/bench_B.md")
    p.add_argument("--work", default="/tmp/mixed-bits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-pages", type=int, default=40)
    p.add_argument("--e21-calib-pages", type=int, default=2, help="the 21B slice's calibration text (its random "
                   "weights route about uniformly whatever the text; ~340 MFLOP a token)")
    p.add_argument("--demo-chars", type=int, default=60000, help="held-out text measured on the demo (characters)")
    p.add_argument("--e21-chars", type=int, default=3000, help="held-out text measured on the 21B slice")
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=("demo", "e21"), default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "demo"):
        calib, held = texts(work, args.calib_pages, args.demo_chars)
        results["demo/pydoc-moe"] = measure("demo", DEMO, work, calib, held, 256, args)
    if args.only in (None, "e21"):
        e21 = work / "ernie-21b-2l"
        if not (e21 / "config.json").is_file():
            log("== writing the random ernie-21b-2l checkpoint")
            write_checkpoint(bench_config("ernie-21b-2l"), str(e21), seed=0)
        for f in TOKENIZER_FILES:  # the demo's tokenizer: 8192 ids, all within the slice's vocabulary
            shutil.copy(DEMO / f, e21 / f)
        calib, held = texts(work, args.e21_calib_pages, args.e21_chars)
        results["random ernie-21b-2l"] = measure("e21", e21, work, calib, held, 128, args)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_md(Path(args.out), results, args)


def write_md(out: Path, results: dict, args):
    parts = [f"## Mixed-bit experts (issue 24): usage-aware int8/int4\n\nMachine: {machine_line(args.threads, 'cpu')}"
             f"\n\n`python benchmarks/mixed_bits.py` ({' '.join(sys.argv[1:]) or 'defaults'}). Hot experts: the "
             f"ceil({HOT} x E) routed experts of each MoE layer with the most tokens in an expert report on the first "
             f"training pages of the demo's corpus (build/demo_pydoc/corpus.jsonl: {args.calib_pages} for the demo, "
             f"{args.e21_calib_pages} for the 21B slice); measured on its held-out validation pages (val.jsonl). "
             "\"random 20%\": as many experts picked at random (the report's counts shuffled), a control. KL: "
             "mean over every position, PyTorch's ops (dequantized weights, fp32 matmuls) for the fp32 and the "
             "quantized models alike, so it measures the weights alone. Weights read per token: every weight but "
             "the input embedding, "
             "each routed expert's bytes weighted by the share of tokens that chose it on the measured text (its "
             "expert report): sum_e P(e chosen) x bytes(e). Decode: batch 1, greedy, "
             f"{args.new_tokens - 1} tokens after the first, median of {args.rounds} alternating rounds."]
    for name, r in results.items():
        calib_share, held_share = r["hot_share"]
        parts.append(f"### {name}\n\n{len(r['layers'])} MoE layers of {r['experts']} routed experts; "
                     f"{r['tokens']} tokens measured; reports by {r['report']}. The hot experts took "
                     f"{100 * calib_share:.0f}% of the routed choices on the calibration text and "
                     f"{100 * held_share:.0f}% on the held-out text.\n\n{table(name, r)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n")
    log(out.read_text())


if __name__ == "__main__":
    main()
