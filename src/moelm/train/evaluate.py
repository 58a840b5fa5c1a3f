"""Evaluation for `moelm eval` and the fine-tuning loop's validation: multiple-choice accuracy (HellaSwag-style
files, scored as lm-evaluation-harness scores them) and perplexity of a list of examples."""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE, DataError, Example, collate, hellaswag_record, hellaswag_tokens, read_records


@dataclass
class Choice:
    context: list[int]  # token ids
    endings: list[list[int]]  # token ids of each ending
    ending_chars: list[int]  # length in characters of each ending's text, for accuracy_norm
    label: int


def lm_eval_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up: WikiHow's " [title]" becomes ". ", other [tags] go."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def lm_eval_record(record: dict, ctx: str, endings: list[str]) -> tuple[str, list[str]]:
    """A row of the HellaSwag dataset itself (with activity_label, ctx_a, ctx_b) as lm-evaluation-harness's hellaswag
    task poses it: "label: ctx_a Ctx_b" and the endings, cleaned; a row with only ctx and endings as it is."""
    parts = [record.get(k) for k in ("activity_label", "ctx_a", "ctx_b")]
    if not all(isinstance(p, str) for p in parts):
        return ctx, endings
    label, a, b = parts
    return lm_eval_text(f"{label}: {a} {b.capitalize()}"), [lm_eval_text(e) for e in endings]


def load_choices(path, tokenizer, limit: int | None = None) -> list[Choice]:
    """The first `limit` records of a HellaSwag file (ctx, endings, label; as kind hellaswag reads them), rows of the
    dataset itself posed as lm-evaluation-harness poses them (lm_eval_record)."""
    choices = []
    for where, record in read_records(path, limit, "hellaswag"):
        ctx, endings, label = hellaswag_record(record, where)
        ctx, endings = lm_eval_record(record, ctx, endings)
        context, ends = hellaswag_tokens(tokenizer, ctx, endings, where)
        if not context:
            raise DataError(f"{where}: ctx has no tokens, so the first token of an ending has nothing to follow")
        choices.append(Choice(context, ends, [len(e) for e in endings], label))
    return choices


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def choice_scores(model, choices: list[Choice], batch_size: int = 8) -> list[list[float]]:
    """Per choice, per ending: the sum of the log-probabilities of the ending's tokens given the context and the
    ending's earlier tokens. Rows (context + one ending) go batch_size at a time, right-padded with a mask."""
    rows = [Example(c.context + e, [IGNORE] * len(c.context) + e) for c in choices for e in c.endings]
    flat = []
    with _eval_mode(model):
        for i in range(0, len(rows), batch_size):
            flat += (-_token_nll(model, rows[i:i + batch_size]).sum(dim=1)).tolist()
    scores, k = [], 0
    for c in choices:
        scores.append(flat[k:k + len(c.endings)])
        k += len(c.endings)
    return scores


def _token_nll(model, examples: list[Example], pad_id: int = 0, mtp: bool = False):
    """[B, S-1] fp32 negative log-likelihood of each label token (0 where the label is -100); mtp: also the MTP
    head's [B, S-2] for the tokens after the next (labels[:, 2:]), from the last layer's output before the final
    norm, as the trainer computes its mtp_loss."""
    batch = {k: v.to(_device(model)) for k, v in collate(examples, pad_id).items()}
    seen: list = []
    hook = model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if mtp else None
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, S, V]
    finally:
        if hook is not None:
            hook.remove()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE,
                          reduction="none")
    if not mtp:
        return nll
    logits = model.mtp.sequence_logits(batch["input_ids"], seen[-1], batch["attention_mask"])  # [B, S-1, V]
    return nll, F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 2:], ignore_index=IGNORE,
                                reduction="none")


@torch.no_grad()
def multiple_choice(model, choices: list[Choice], batch_size: int = 8) -> dict:
    """{"accuracy", "accuracy_norm", "count"}: accuracy picks the ending of highest log-probability sum,
    accuracy_norm the highest sum / character length of the ending text (lm-evaluation-harness's acc_norm).
    Ties go to the first ending."""
    if not choices:
        raise ValueError("multiple_choice needs at least one choice")
    correct = correct_norm = 0
    for c, s in zip(choices, choice_scores(model, choices, batch_size)):
        correct += max(range(len(s)), key=lambda j: s[j]) == c.label
        correct_norm += max(range(len(s)), key=lambda j: s[j] / c.ending_chars[j]) == c.label
    return {"accuracy": correct / len(choices), "accuracy_norm": correct_norm / len(choices), "count": len(choices)}


@torch.no_grad()
def perplexity(model, examples: list[Example], batch_size: int = 8, pad_id: int = 0, mtp: bool = False) -> dict:
    """{"loss", "perplexity", "tokens"}: loss is the mean negative log-likelihood over every label token of all
    examples (token-weighted, not a mean of batch means); computed from the logits, so no MoE aux loss is in it.
    mtp (a model with an MTP head, ERNIE's model.mtp, run without the inference fast paths): also "mtp_loss", the
    head's mean negative log-likelihood of the token after the next over every label token from the third on
    (the trainer's mtp_loss), and "mtp_tokens"."""
    if mtp and getattr(model, "mtp", None) is None:
        raise ValueError("perplexity(mtp=True) needs a model with an MTP head (model.mtp)")
    total, tokens, mtp_total, mtp_tokens = 0.0, 0, 0.0, 0
    with _eval_mode(model):
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            nll = _token_nll(model, batch, pad_id, mtp)
            if mtp:
                nll, head = nll
                mtp_total += head.sum().item()
                mtp_tokens += sum(sum(label != IGNORE for label in e.labels[2:]) for e in batch)
            total += nll.sum().item()
            tokens += sum(sum(label != IGNORE for label in e.labels[1:]) for e in batch)
    if tokens == 0:
        raise ValueError("perplexity needs at least one label token (-100 everywhere, or no examples)")
    loss = total / tokens
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
    if mtp:
        result.update(mtp_loss=mtp_total / max(mtp_tokens, 1), mtp_tokens=mtp_tokens)
    return result
