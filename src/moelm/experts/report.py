"""`moelm experts`: a model run over a data file with a Recorder on its MoE layers, and the report made of it:
report.json (SCHEMA below), PNG plots and a self-contained report.html; two reports compared.

report.json: {"schema": "moelm.experts/1", "model", "model_type", "num_experts", "top_k", "data": {"path", "kind",
"examples", "tokens"}, "balance": NeMo AutoModel's brief metrics (moe/cv_mean, ...), "layers": [one per MoE layer:
{"layer": decoder layer index, "num_experts", "top_k", "tokens": [E] times each expert was chosen, "load_share": [E]
tokens / all choices, "utilization": [E] tokens / (all choices / E), "gate_mass": [E] routing weights summed,
"mean_gate": [E], "mean_output_norm": [E] mean ||expert output|| (unweighted) over its tokens, "reap": [E] REAP
saliency = mean of routing weight x output norm over its tokens (0 for an expert never chosen), "cv",
"dead_expert_frac", "expert_diversity" (exp(entropy of load_share) / E), "adjacent_overlap" (experts the next token
of a row shares with this one, mean, 0..top_k), "adjacent_union" (experts two adjacent tokens read together:
2 top_k - overlap), "coactivation": [E, E] tokens choosing both (diagonal: tokens)}], and with --compare:
"compare": {"other", "layers": [{"layer", "total_variation" (half the L1 distance of the load shares),
"load_share_change": [E], and the pairs [this, other] of cv, dead_expert_frac, expert_diversity,
adjacent_overlap}]}}."""
from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path

import torch

from ..inference.mixed import SCHEMA, load_report
from ..io.files import atomic_write_files
from ..train.balance import balance_metrics, layer_balance
from .record import Recorder


def load_data(path, kind: str, tokenizer, limit: int | None, seq_length: int, labelled: bool = True) -> list:
    """The examples of a data file as fine-tuning reads it (kind text: packed into seq_length chunks, the last one
    shorter; chat and hellaswag: one example each, cut to seq_length). labelled=False (a report, which counts every
    token): a chat or hellaswag example cut before its labelled tokens is kept."""
    from ..train.data import DataConfig, Example, load_examples

    text = kind == "text"
    cut = labelled or text
    examples = load_examples(DataConfig(kind=kind, path=str(path), seq_length=seq_length if cut else sys.maxsize,
                                        num_samples_limit=limit, truncation="error" if text else "right",
                                        drop_last=not text), tokenizer)
    return examples if cut else [Example(e.input_ids[:seq_length], e.labels[:seq_length]) for e in examples]


@torch.no_grad()
def record(model, examples: list, batch_size: int = 8, pad_id: int = 0, progress: bool = False) -> Recorder:
    """Run the examples through the model batch_size at a time, recording its MoE layers (padding not counted)."""
    from ..train.data import collate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with Recorder(model) as rec:
            for i in range(0, len(examples), batch_size):
                batch = collate(examples[i:i + batch_size], pad_id)
                rec.batch(batch["attention_mask"])
                # every token through every layer (router logits asked: the last layer is not trimmed to the
                # kept position), the LM head on one position only
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      logits_to_keep=1, output_router_logits=True)
                if progress:
                    done = min(i + batch_size, len(examples))
                    print(f"\rmoelm experts: {done}/{len(examples)} examples, {rec.seen} tokens", end="",
                          file=sys.stderr, flush=True)
    finally:
        model.train(was)
        if progress:
            print(file=sys.stderr)
    return rec


def _mean(total: torch.Tensor, count: torch.Tensor) -> list[float]:
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).tolist()


def build(rec: Recorder, model, model_name: str, data: dict) -> dict:
    """The report (see the module's docstring) of what rec recorded on `model`."""
    k = rec.top_k
    layers = []
    for slot, layer in enumerate(rec.layers):
        tokens, count = rec.tokens[slot], rec.tokens[slot].double()
        balance = layer_balance(tokens)
        overlap = float(rec.overlap[slot]) / rec.pairs if rec.pairs else 0.0
        layers.append({
            "layer": layer, "num_experts": rec.num_experts, "top_k": k, "tokens": tokens.tolist(),
            "load_share": (count / count.sum().clamp(min=1)).tolist(),
            "utilization": balance["utilization"].tolist(), "gate_mass": rec.gate[slot].tolist(),
            "mean_gate": _mean(rec.gate[slot], count), "mean_output_norm": _mean(rec.norm[slot], count),
            "reap": _mean(rec.reap[slot], count), "cv": balance["cv"],
            "dead_expert_frac": balance["dead_expert_frac"], "expert_diversity": balance["expert_diversity"],
            "adjacent_overlap": overlap, "adjacent_union": 2 * k - overlap if rec.pairs else 0.0,
            "coactivation": rec.coact[slot].tolist()})
    return {"schema": SCHEMA, "model": model_name, "model_type": model.config.model_type,
            "num_experts": rec.num_experts, "top_k": k, "data": {**data, "tokens": rec.seen},
            "balance": balance_metrics([rec.tokens[s] for s in range(len(rec.layers))], layers=rec.layers),
            "layers": layers}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read(path) -> dict:
    """A report.json (or the directory holding it), checked to be one: what compare and prune read of it."""
    path, report = load_report(path)
    e = report.get("num_experts")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (e, report.get("top_k"))):
        raise ValueError(f"expert report {path}: num_experts and top_k must be positive integers")
    seen = set()
    for x in report["layers"]:
        if not (isinstance(x, dict) and isinstance(x.get("layer"), int) and x["layer"] not in seen
                and all(isinstance(x.get(k), list) and len(x[k]) == e and all(map(_number, x[k]))
                        for k in ("tokens", "load_share", "reap"))
                and all(_number(x.get(k)) for k in ("cv", "dead_expert_frac", "expert_diversity",
                                                     "adjacent_overlap"))):
            raise ValueError(f"expert report {path}: a layers entry without a new int layer, {e} tokens, load_share "
                             f"and reap, and cv, dead_expert_frac, expert_diversity, adjacent_overlap: "
                             f"{str(x)[:120]}")
        seen.add(x["layer"])
    return report


def compare(report: dict, other: dict, other_name: str) -> dict:
    """The "compare" section: per layer, how the load moved from `other` to `report`."""
    ours, theirs = {x["layer"]: x for x in report["layers"]}, {x["layer"]: x for x in other["layers"]}
    if ours.keys() != theirs.keys() or report["num_experts"] != other["num_experts"]:
        raise ValueError(f"--compare {other_name}: its MoE layers / experts ({sorted(theirs)}, "
                         f"{other['num_experts']} experts) are not this model's ({sorted(ours)}, "
                         f"{report['num_experts']} experts)")
    layers = []
    for layer, a in ours.items():
        b = theirs[layer]
        change = [x - y for x, y in zip(a["load_share"], b["load_share"])]
        layers.append({"layer": layer, "total_variation": 0.5 * sum(abs(c) for c in change),
                       "load_share_change": change,
                       **{key: [a[key], b[key]] for key in ("cv", "dead_expert_frac", "expert_diversity",
                                                            "adjacent_overlap")}})
    return {"other": other_name, "layers": layers}


def write(report: dict, out, coact_layer: int | None = None) -> list[Path]:
    """report.json, the plots and report.html into `out` (created), all or none (a full disk leaves the old report
    whole); their paths."""
    from . import plots

    images = plots.render(report, coact_layer)
    return atomic_write_files(out, {**images, "report.json": json.dumps(report, indent=1) + "\n",
                                    "report.html": page(report, images)})


def _row(cells, head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def _experts(values: list, order: list[int]) -> str:
    return ", ".join(f"{e} ({values[e]:.1%})" for e in order)


def page(report: dict, images: dict[str, bytes]) -> str:
    """report.html: one self-contained page (the plots inline as data: URLs, no script, no outside link)."""
    data = report["data"]
    head = (f"{report['model']} ({report['model_type']}): {len(report['layers'])} MoE layers of "
            f"{report['num_experts']} experts, top-{report['top_k']}; {data['tokens']} tokens of {data['path']} "
            f"({data['kind']}, {data['examples']} examples)")
    rows = [_row(("layer", "CV", "dead", "exp(H)/N", "next token shares", "2 tokens read", "most used",
                  "least used"), head=True)]
    for x in report["layers"]:
        order = sorted(range(x["num_experts"]), key=lambda e: -x["tokens"][e])
        rows.append(_row((x["layer"], f"{x['cv']:.3f}", f"{x['dead_expert_frac']:.1%}",
                          f"{x['expert_diversity']:.3f}", f"{x['adjacent_overlap']:.2f} of {x['top_k']}",
                          f"{x['adjacent_union']:.2f}", _experts(x["load_share"], order[:3]),
                          _experts(x["load_share"], order[-3:]))))
    brief = [_row(("metric", "value"), head=True)] + [_row((k, f"{v:.4g}")) for k, v in report["balance"].items()]
    parts = [f"<h1>Experts report</h1><p>{html.escape(head)}</p>",
             "<h2>Per layer</h2><table>" + "".join(rows) + "</table>"]
    if "compare" in report:
        c = report["compare"]
        crows = [_row(("layer", "total variation", "CV (this / other)", "dead", "exp(H)/N", "next token shares"),
                      head=True)]
        crows += [_row((x["layer"], f"{x['total_variation']:.3f}",
                        *(f"{a:.3f} / {b:.3f}" for a, b in (x["cv"], x["dead_expert_frac"], x["expert_diversity"],
                                                            x["adjacent_overlap"]))))
                  for x in c["layers"]]
        parts.append(f"<h2>Compared with {html.escape(c['other'])}</h2><table>" + "".join(crows) + "</table>")
    for name, png in images.items():
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f'<h2>{html.escape(plot_title(name))}</h2><img alt="{html.escape(name)}" src="{src}">')
    parts.append("<h2>Load balance (NeMo AutoModel's brief metrics)</h2><table>" + "".join(brief) + "</table>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}img{max-width:100%}")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>moelm experts report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def plot_title(name: str) -> str:
    return {"load.png": "Load per layer and expert (1 = a fair share)", "balance.png": "Balance per layer",
            "coactivation.png": "Co-activation", "compare.png": "Load share change"}.get(name, name)
