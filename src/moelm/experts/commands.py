"""`moelm experts` and `moelm prune`: their arguments and what they run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = ("text", "chat", "hellaswag")


def add_experts_arguments(p):
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id in the local cache")
    p.add_argument("--data", required=True, help="a local JSONL/JSON file, as `moelm finetune` reads it")
    p.add_argument("--kind", default="text", choices=KINDS, help="text: packed into --seq-length chunks; chat: "
                   "conversations through the chat template; hellaswag: context + the labelled ending")
    p.add_argument("--limit", type=int, default=None, help="the first N records only")
    p.add_argument("--out", required=True, help="directory for report.json, report.html and the PNG plots")
    p.add_argument("--compare", default=None, metavar="REPORT", help="another report.json (or its directory) to "
                   "compare with: before/after fine-tuning, two data sets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--coact-layer", type=int, default=None, help="the decoder layer whose co-activation is drawn "
                   "(default: the MoE layer of the largest CV)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr (default: when it is a terminal)")


def add_prune_arguments(p):
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id in the local cache")
    p.add_argument("out", metavar="OUT", help="where to write the pruned hub checkpoint")
    p.add_argument("--report", required=True, help="the expert report (moelm experts --out DIR) of this model")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of each layer's routed experts kept")
    p.add_argument("--by", default="reap", choices=("reap", "frequency"),
                   help="reap: mean routing weight x expert output norm (REAP); frequency: tokens routed")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--eval-data", default=None, help="evaluate before and after pruning on this file")
    p.add_argument("--eval-kind", default="text", choices=KINDS,
                   help="hellaswag: multiple-choice accuracy; text/chat: perplexity")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _positive(name: str, value):
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value}")


def experts(args, load):
    """The command; `load(args)` returns (model, tokenizer) as the other commands load them."""
    from ..train.trainer import pad_id
    from . import report as rp

    for name in ("limit", "batch_size", "seq_length"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory")
    other = rp.read(args.compare) if args.compare else None
    model, tokenizer = load(args)
    examples = rp.load_data(args.data, args.kind, tokenizer, args.limit, args.seq_length, labelled=False)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    rec = rp.record(model, examples, args.batch_size, pad_id(tokenizer), progress)
    if not rec.seen:
        raise ValueError(f"{args.data}: no tokens to record")
    report = rp.build(rec, model, str(args.model), {"path": str(args.data), "kind": args.kind,
                                                     "examples": len(examples)})
    report["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    quantization = getattr(model, "quantization", None)  # --quantization, or the checkpoint's own
    report["quantization"] = None if quantization is None else quantization.mode
    if other is not None:
        report["compare"] = rp.compare(report, other, str(args.compare))
    paths = rp.write(report, args.out, args.coact_layer)
    print(json.dumps({"report": str(Path(args.out) / "report.json"), "html": str(Path(args.out) / "report.html"),
                      "files": [str(p) for p in paths], "tokens": rec.seen, **report["balance"]}))


def prune(args):
    from ..models.auto import AutoModelForCausalLM
    from ..text.tokenizer import AutoTokenizer
    from . import prune as pr
    from .report import load_data, read

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} exists and is not empty (--force replaces it)")
    report = read(args.report)
    keep = pr.chosen(report, args.keep, args.by)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, fast=False)
    pr.check(model, report, args.report)
    result = {"out": str(out), "by": args.by, "keep": args.keep,
              "experts": len(next(iter(keep.values()))), "of": report["num_experts"],
              "kept": {str(layer): ids for layer, ids in keep.items()}}
    score = None
    if args.eval_data:
        from ..train.evaluate import load_choices, multiple_choice, perplexity
        from ..train.trainer import pad_id

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if args.eval_kind == "hellaswag":
            choices = load_choices(args.eval_data, tokenizer, args.eval_limit)

            def score():
                return multiple_choice(model, choices)
        else:
            examples = load_data(args.eval_data, args.eval_kind, tokenizer, args.eval_limit, args.seq_length)

            def score():
                return perplexity(model, examples, pad_id=pad_id(tokenizer))
        result["before"] = score()
    pr.prune(model, keep)
    if score is not None:
        result["after"] = score()
    pr.save(model, out, args.model, {"pruning.json": json.dumps(result, indent=1) + "\n"})
    print(json.dumps(result))
