"""Fine-tuning data from local files: chat conversations, HellaSwag-style completions and packed plain text.

Records are JSON objects, one a line (.jsonl) or all in one array (.json); kind `text` also reads a .txt file whole.
A bad record raises one DataError naming the file and the record's 1-based line ("data/train.jsonl:7: ...").
Labels are aligned with input_ids (the model shifts them); -100 marks tokens without loss.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

KINDS = ("chat", "hellaswag", "text")
TRUNCATIONS = ("error", "right", "left")
PADDINGS = ("longest", "max_length")
ROLES = ("system", "user", "assistant")
IGNORE = -100
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """A data file or one of its records is unusable; the message starts with "path:line: "."""


@dataclass
class DataConfig:
    kind: str  # "chat" | "hellaswag" | "text"
    path: str
    seq_length: int = 512
    truncation: str = "error"  # "error" | "right" (drop the end) | "left" (drop the start); not for kind text
    padding: str = "longest"  # "longest" (each batch to its longest) | "max_length" (to seq_length)
    num_samples_limit: int | None = None  # the first N records only
    drop_last: bool = True  # kind text: drop the last incomplete chunk (False: keep it, padded by collate)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids, -100 where no loss; not shifted (the model shifts)


# ---- reading records ------------------------------------------------------------------------------------------

def read_records(path, limit: int | None = None, kind: str = "hellaswag") -> Iterator[tuple[str, dict]]:
    """("path:line", record) for the first `limit` records of a .jsonl or .json file; a .txt file (kind text only)
    is one record {"text": whole file}, located by its path alone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt" and kind == "text":
        yield str(path), {"text": _read_text(path)}
        return
    if suffix == ".jsonl":
        items = _jsonl_items(path)
    elif suffix == ".json":
        items = _json_array_items(path, _read_text(path))
    else:
        kinds = ".jsonl, .json or .txt" if kind == "text" else ".jsonl or .json"
        raise DataError(f"{path}: kind {kind} reads {kinds} files, not {suffix or 'a file without a suffix'}")
    count = 0
    for line, record in items:
        if limit is not None and count >= limit:
            break
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        count += 1
        yield where, record
    if count == 0:
        raise DataError(f"{path}: no records")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_items(path: Path):
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not text.strip():
                raise DataError(f"{path}:{line}: empty line (each line must hold one JSON object)")
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: invalid JSON: {e.msg} (column {e.colno})") from None


def _json_array_items(path: Path, text: str):
    """(line, item) of a JSON array, each item's line being where it starts."""
    decoder, line, counted = json.JSONDecoder(), 1, 0

    def line_at(i):
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, i), i
        return line

    i = _WHITESPACE.match(text, 0).end()
    if text[i:i + 1] != "[":
        raise DataError(f"{path}:{line_at(i)}: a .json data file must hold one array of records")
    i = _WHITESPACE.match(text, i + 1).end()
    if text[i:i + 1] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield line_at(i), item
        i = _WHITESPACE.match(text, end).end()
        if text[i:i + 1] == "]" and not text[i + 1:].strip():
            return
        if text[i:i + 1] != ",":
            raise DataError(f"{path}:{line_at(i)}: expected ',' or a final ']' after a record")
        i = _WHITESPACE.match(text, i + 1).end()


# ---- hellaswag ------------------------------------------------------------------------------------------------

def hellaswag_record(record: dict, where: str) -> tuple[str, list[str], int]:
    """(ctx, endings, label) of a HellaSwag record; label may be an int or a numeric string (the HF dataset's)."""
    for key in ("ctx", "endings", "label"):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str):
        raise DataError(f"{where}: ctx must be a string, got {type(ctx).__name__}")
    if not isinstance(endings, list) or not endings:
        raise DataError(f"{where}: endings must be a non-empty list of strings, got {json.dumps(endings)[:80]}")
    for j, ending in enumerate(endings):
        if not isinstance(ending, str) or not ending:
            raise DataError(f"{where}: ending {j} must be a non-empty string, got {json.dumps(ending)[:80]}")
    if isinstance(label, str) and re.fullmatch(r"\s*\d+\s*", label):
        label = int(label)
    elif isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: label {label!r} is not an integer (the HellaSwag test split has no labels)")
    if not 0 <= label < len(endings):
        raise DataError(f"{where}: label {label} is out of range for {len(endings)} endings")
    return ctx, endings, label


def hellaswag_tokens(tokenizer, ctx: str, endings: list[str], where: str) -> tuple[list[int], list[list[int]]]:
    """Context ids (with the bos the tokenizer adds, without an eos it appends) and each ending's ids.

    As lm-evaluation-harness scores a continuation: an ending follows the context after a space (the context's own
    trailing whitespace moves to the ending), and its ids are those of context + ending past the context's."""
    text = ctx.rstrip()
    gap = ctx[len(text):] or " "
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    if plain:
        start = next(s for s in range(len(full) - len(plain) + 1) if full[s:s + len(plain)] == plain)
        context = list(full[:start + len(plain)])
    else:
        context = list(full[:1]) if full[:1] == [tokenizer.bos_token_id] else []
    ends = []
    for j, ending in enumerate(endings):
        ids = list(tokenizer(text + gap + ending, add_special_tokens=False)["input_ids"][len(plain):])
        if not ids:
            raise DataError(f"{where}: ending {j} has no tokens of its own after the context")
        ends.append(ids)
    return context, ends


def _hellaswag_example(record, where, tokenizer) -> Example:
    ctx, endings, label = hellaswag_record(record, where)
    context, ends = hellaswag_tokens(tokenizer, ctx, endings, where)
    return Example(context + ends[label], [IGNORE] * len(context) + ends[label])


# ---- chat -----------------------------------------------------------------------------------------------------

def _chat_example(record, where, tokenizer, specials) -> Example:
    """The whole conversation as the chat template renders it; loss on each assistant turn (its content and what the
    template closes the turn with), found by rendering prefixes of the conversation.

    Each span is tokenized on its own, as at inference the prompt (ending with the generation prompt) is tokenized
    alone and the model generates the answer's tokens after it."""
    if "messages" not in record:
        raise DataError(f"{where}: missing key 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} objects")
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {n} is not an object")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {n} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {n} has no string content")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: no assistant message, so nothing to learn")
    if turns[0] == 0:
        raise DataError(f"{where}: message 1 is an assistant message with nothing before it to answer")

    def render(msgs, prompt=False):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise DataError(f"{where}: the chat template rejected this conversation: {e}") from None

    full = render(messages)
    spans, done = [], 0
    for i in turns:
        head = render(messages[:i], prompt=True)
        end = _turn_end(render(messages[:i + 1]), full, specials)
        if not full.startswith(head) or not done <= len(head) < end:
            raise DataError(f"{where}: the chat template is not prefix-stable: the conversation up to assistant "
                            f"message {i + 1} does not render as the start of the whole conversation, so its "
                            "tokens cannot be told apart")
        spans.append((len(head), end))
        done = end
    ids, labels, pos = [], [], 0
    for start, end in spans + [(len(full), len(full))]:
        for text, loss in ((full[pos:start], False), (full[start:end], True)):
            piece = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            ids += piece
            labels += piece if loss else [IGNORE] * len(piece)
        pos = end
    return Example(ids, labels)


def _turn_end(upto: str, full: str, specials: list[str]) -> int:
    """Where the turn `upto` ends with stops in `full`: all of `upto` when it starts `full`; else (a template that
    closes a conversation, as Phi's trailing eos) their common prefix, cut back so no special token is split."""
    if full.startswith(upto):
        return len(upto)
    end, moved = len(os.path.commonprefix([upto, full])), True
    while moved:
        moved = False
        for text in (upto, full):
            for tok in specials:
                p = text.find(tok, max(0, end - len(tok) + 1))
                if -1 < p < end:
                    end, moved = p, True
    return end


def _special_strings(tokenizer) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({str(t) for t in [*added.values(), *tokenizer.all_special_tokens] if str(t)})


# ---- text -----------------------------------------------------------------------------------------------------

def _packed_examples(config: DataConfig, tokenizer) -> list[Example]:
    """Documents tokenized (with the bos the tokenizer adds), joined with eos between them, cut into chunks of exactly
    seq_length tokens; the last incomplete chunk is dropped (drop_last) or kept for collate to pad (a 1-token
    remainder, having nothing to predict, is dropped either way)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{config.path}: kind text joins documents with the eos token, but the tokenizer has none")
    stream = []
    for where, record in read_records(config.path, config.num_samples_limit, "text"):
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: expected a non-empty string under 'text'")
        doc = list(tokenizer(text)["input_ids"])
        if stream and stream[-1] != eos:
            stream.append(eos)
        stream += doc
    n = config.seq_length
    chunks = [stream[i:i + n] for i in range(0, len(stream), n)]
    if chunks and len(chunks[-1]) < n and (config.drop_last or len(chunks[-1]) < 2):
        chunks.pop()
    if not chunks:
        raise DataError(f"{config.path}: {len(stream)} tokens in all, fewer than seq_length {n}; nothing to train "
                        "on (set drop_last: false or lower seq_length)")
    return [Example(c, list(c)) for c in chunks]


# ---- the public entry points ----------------------------------------------------------------------------------

def load_examples(config: DataConfig, tokenizer) -> list[Example]:
    """Every example of the data file, tokenized, truncated per config.truncation and checked to carry loss."""
    _check(config)
    if config.kind == "text":
        return _packed_examples(config, tokenizer)
    if config.kind == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{config.path}: kind chat renders conversations with the tokenizer's chat template, but "
                            "the tokenizer has no chat template (no chat_template in tokenizer_config.json or "
                            "chat_template.jinja)")
        specials = _special_strings(tokenizer)
    examples = []
    for where, record in read_records(config.path, config.num_samples_limit, config.kind):
        if config.kind == "chat":
            example = _chat_example(record, where, tokenizer, specials)
        else:
            example = _hellaswag_example(record, where, tokenizer)
        examples.append(_truncate(example, config, where))
    return examples


def _truncate(example: Example, config: DataConfig, where: str) -> Example:
    n, size = len(example.input_ids), config.seq_length
    if n > size:
        if config.truncation == "error":
            raise DataError(f"{where}: {n} tokens, longer than seq_length {size} (raise seq_length, or set "
                            "truncation: right or left)")
        keep = slice(0, size) if config.truncation == "right" else slice(n - size, n)
        example = Example(example.input_ids[keep], example.labels[keep])
    if all(label == IGNORE for label in example.labels[1:]):  # labels[0] has no token before it to predict it
        cut = f" after {config.truncation} truncation to seq_length {size}" if n > size else ""
        raise DataError(f"{where}: no tokens to learn from{cut}")
    return example


def _check(config: DataConfig):
    for name, value, allowed in (("kind", config.kind, KINDS), ("truncation", config.truncation, TRUNCATIONS),
                                 ("padding", config.padding, PADDINGS)):
        if value not in allowed:
            raise ValueError(f"data {name} must be one of {', '.join(allowed)}, got {value!r}")
    if isinstance(config.seq_length, bool) or not isinstance(config.seq_length, int) or config.seq_length < 2:
        raise ValueError(f"data seq_length must be an integer >= 2, got {config.seq_length!r}")
    limit = config.num_samples_limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"data num_samples_limit must be a positive integer or null, got {limit!r}")
    if config.kind == "text" and config.truncation != "error":
        raise ValueError("data truncation does not apply to kind text (documents are packed into seq_length chunks)")
    if config.kind != "text" and not config.drop_last:
        raise ValueError(f"data drop_last applies to kind text only, not {config.kind}")


def collate(examples: list[Example], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids [B, S] (pad_id), attention_mask [B, S] (1 real, 0 pad), labels [B, S] (-100 on
    pad), all int64; S = length, or the longest example's length when None."""
    longest = max(len(e.input_ids) for e in examples)
    size = longest if length is None else length
    assert longest <= size, f"an example of {longest} tokens does not fit a batch of length {size}"
    input_ids = torch.full((len(examples), size), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), size), dtype=torch.long)
    labels = torch.full((len(examples), size), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_length(config: DataConfig, examples: list[Example]) -> int | None:
    """collate's length for this batch: seq_length under padding max_length, else the batch's longest example."""
    if config.padding == "max_length":
        return config.seq_length
    return max(len(e.input_ids) for e in examples)
