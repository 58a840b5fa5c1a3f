"""`moelm finetune`, `moelm eval` and `moelm merge`: their arguments and what they run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_finetune_arguments(p):
    p.add_argument("recipe", help="recipe YAML (see recipes/); --section.key=value after it overrides a key")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="STEP_DIR",
                   help="continue from the newest checkpoint under checkpoint.dir (or from STEP_DIR)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write the merged model (checkpoint.dir/merged)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (default: when it is a terminal)")


def add_eval_arguments(p):
    p.add_argument("--model", required=True, help="checkpoint directory or hub id in the local cache")
    p.add_argument("--data", required=True, help="a local JSONL file (--kind text: or a .txt file)")
    p.add_argument("--kind", required=True, choices=("hellaswag", "text", "chat"),
                   help="hellaswag: multiple-choice accuracy as lm-eval's hellaswag task scores it (acc, acc_norm); "
                        "text/chat: perplexity")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) applied to the model")
    p.add_argument("--limit", type=int, default=None, help="the first N records only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=2048, help="text/chat: sequence length (text is packed)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def add_merge_arguments(p):
    p.add_argument("--model", required=True, help="the base checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format)")
    p.add_argument("--out", required=True, help="where to write the merged hub checkpoint")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")


def finetune(args, overrides: list[str]):
    from .recipe import load_recipe
    from .trainer import Trainer

    recipe = load_recipe(args.recipe, overrides)
    if args.merge:
        if recipe.peft is None:
            raise ValueError("--merge folds a LoRA adapter into its base; this recipe has no peft section")
        recipe.checkpoint.merge = True
    trainer = Trainer(recipe, resume=args.resume, progress=args.progress)
    try:
        history = trainer.train()
    finally:
        if trainer.layout.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if trainer.rank == 0:
        last = [r for r in history if "loss" in r][-1:]
        print(json.dumps({"final": str(trainer.out / "final"), "steps": trainer.step,
                          **({"loss": last[0]["loss"]} if last else {}),
                          **{k: v for k, v in history[-1].items() if k.startswith("val_")}}))


def evaluate(args):
    import torch

    from ..models.auto import AutoModelForCausalLM
    from ..text.tokenizer import AutoTokenizer
    from .data import DataConfig, load_examples
    from .evaluate import load_choices, multiple_choice, perplexity
    from .trainer import pad_id

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    if args.adapter:
        from .lora import load_adapter

        load_adapter(model, args.adapter)
    if args.kind == "hellaswag":
        result = multiple_choice(model, load_choices(args.data, tokenizer, args.limit), batch_size=args.batch_size)
    else:
        config = DataConfig(kind=args.kind, path=args.data, seq_length=args.seq_length,
                            truncation="right" if args.kind == "chat" else "error", num_samples_limit=args.limit)
        result = perplexity(model, load_examples(config, tokenizer), batch_size=args.batch_size,
                            pad_id=pad_id(tokenizer))
    print(json.dumps(result))


def merge(args):
    import torch

    from .state import merge_to

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} exists and is not empty (--force replaces it)")
    out = merge_to(args.model, args.adapter, args.out, dtype=getattr(torch, args.dtype))
    print(out)
