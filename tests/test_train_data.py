"""Fine-tuning data (moelm.train.data): chat loss spans from the chat template, HellaSwag endings, packed text,
truncation, padding, and one clear file:line error per bad record; on the tiny checkpoints' real tokenizers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from moelm import AutoTokenizer
from moelm.models.scaffold import new_checkpoint
from moelm.train.data import DataConfig, DataError, Example, batch_length, collate, load_examples

SYSTEM = {"role": "system", "content": "Be nice."}
CHAT = [SYSTEM, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris."}]
SWAG = {"ctx": "A man is sitting on a roof. he", "endings": ["is using wrap.", "is ripping tiles.",
                                                             "is holding a cube.", "starts pulling up."], "label": 1}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: new_checkpoint(name, root / name) for name in ("ernie4_5_moe-tiny", "phimoe-tiny")}


@pytest.fixture(scope="module")
def tok(dirs):
    return AutoTokenizer.from_pretrained(dirs["ernie4_5_moe-tiny"])


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def loss_runs(tok, example):
    """The decoded text of each run of labelled tokens."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != -100:
            assert label == token
            run.append(label)
        elif run:
            runs, run = runs + [run], []
    return [tok.decode(r) for r in runs + ([run] if run else [])]


def test_chat_loss_is_on_assistant_turns_only(tok, tmp_path):
    path = write(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    multi, single = load_examples(DataConfig("chat", path), tok)
    assert tok.decode(multi.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert loss_runs(tok, multi) == ["Hello!<|end_of_sentence|>", "Paris.<|end_of_sentence|>"]
    assert loss_runs(tok, single) == ["Hello!<|end_of_sentence|>"]
    prompt = tok.apply_chat_template(CHAT[1:2], add_generation_prompt=True)["input_ids"]
    assert single.input_ids[:len(prompt)] == prompt  # the prompt tokenized as at inference, no loss on it
    assert single.labels[:len(prompt)] == [-100] * len(prompt)


def test_chat_turn_ends_before_a_template_closing_eos(dirs, tmp_path):
    # Phi's template closes a conversation with eos: the first turn ends at <|end|>\n, the last one includes it
    tok = AutoTokenizer.from_pretrained(dirs["phimoe-tiny"])
    (example,) = load_examples(DataConfig("chat", write(tmp_path / "chat.jsonl", [{"messages": CHAT}])), tok)
    assert loss_runs(tok, example) == ["Hello!<|end|>\n", "Paris.<|end|>\n</s>"]
    assert tok.decode(example.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)


def test_chat_without_a_template_names_the_data_file(dirs, tmp_path):
    copy = shutil.copytree(dirs["ernie4_5_moe-tiny"], tmp_path / "m")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    path = write(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=f"^{path}: .*the tokenizer has no chat template"):
        load_examples(DataConfig("chat", path), AutoTokenizer.from_pretrained(copy))


@pytest.mark.parametrize("template, message", [
    # the generation prompt is not how the template starts an assistant turn
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}ASSISTANT:{% endif %}", "the chat template is not prefix-stable"),
    ("{{ raise_exception('roles must alternate') }}", "the chat template rejected this conversation: roles must"),
])
def test_chat_template_problems_name_file_and_line(dirs, tmp_path, template, message):
    tok = AutoTokenizer.from_pretrained(dirs["ernie4_5_moe-tiny"])
    tok.chat_template = template
    path = write(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=f"^{path}:1: {message}"):
        load_examples(DataConfig("chat", path), tok)


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "message 2 has role 'bot'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, "message 1 has no string content"),
    ({"messages": [SYSTEM, {"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"text": "hi"}, "missing key 'messages'"),
    ('["not", "an", "object"]', "expected a JSON object, got list"),
])
def test_bad_chat_record_names_file_and_line(tok, tmp_path, bad, message):
    path = write(tmp_path / "chat.jsonl", [{"messages": CHAT}, bad])
    with pytest.raises(DataError, match=f"^{path}:2: {message}"):
        load_examples(DataConfig("chat", path), tok)


def test_hellaswag_loss_is_on_the_gold_ending(tok, tmp_path):
    path = write(tmp_path / "swag.jsonl", [SWAG, {**SWAG, "label": "2"}])
    first, second = load_examples(DataConfig("hellaswag", path), tok)
    context = tok(SWAG["ctx"])["input_ids"]
    assert first.input_ids[:len(context)] == context and first.labels[:len(context)] == [-100] * len(context)
    assert loss_runs(tok, first) == [" is ripping tiles."]
    assert loss_runs(tok, second) == [" is holding a cube."]  # label "2", as the HF dataset has it
    assert tok.decode(second.input_ids) == SWAG["ctx"] + " " + SWAG["endings"][2]


@pytest.mark.parametrize("bad, message", [
    ({**SWAG, "label": 4}, "label 4 is out of range for 4 endings"),
    ({**SWAG, "label": ""}, "label '' is not an integer"),
    ({**SWAG, "endings": []}, "endings must be a non-empty list"),
    ({**SWAG, "endings": ["a", 3]}, "ending 1 must be a non-empty string"),
    ({**SWAG, "ctx": None}, "ctx must be a string"),
    ({"ctx": "x", "label": 0}, "missing key 'endings'"),
    ('{"ctx": "x", "endings": ["a"], "label": 0', "invalid JSON"),
    ("", "empty line"),
])
def test_bad_hellaswag_record_names_file_and_line(tok, tmp_path, bad, message):
    path = write(tmp_path / "swag.jsonl", [SWAG, SWAG, bad, SWAG])
    with pytest.raises(DataError, match=f"^{path}:3: {message}"):
        load_examples(DataConfig("hellaswag", path), tok)


def test_json_array_gives_the_same_examples_and_line_numbers(tok, tmp_path):
    path = tmp_path / "swag.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in (SWAG, SWAG)) + "\n]\n")
    jsonl = write(tmp_path / "swag.jsonl", [SWAG, SWAG])
    assert load_examples(DataConfig("hellaswag", str(path)), tok) == \
        load_examples(DataConfig("hellaswag", jsonl), tok)
    path.write_text("[\n" + json.dumps(SWAG) + ",\n\n" + json.dumps({**SWAG, "label": 9}) + "\n]")
    with pytest.raises(DataError, match=f"^{path}:4: label 9 is out of range"):
        load_examples(DataConfig("hellaswag", str(path)), tok)


def test_files_and_limits(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        load_examples(DataConfig("hellaswag", str(tmp_path / "nope.jsonl")), tok)
    path = write(tmp_path / "swag.jsonl", [SWAG, SWAG, {**SWAG, "label": 9}])
    assert len(load_examples(DataConfig("hellaswag", path, num_samples_limit=2), tok)) == 2  # line 3 not read
    with pytest.raises(DataError, match="no records"):
        load_examples(DataConfig("hellaswag", write(tmp_path / "empty.jsonl", [])), tok)
    with pytest.raises(DataError, match="kind hellaswag reads .jsonl or .json files, not .txt"):
        load_examples(DataConfig("hellaswag", write(tmp_path / "swag.txt", ["hi"])), tok)
    with pytest.raises(ValueError, match="data padding must be one of longest, max_length, got 'max'"):
        load_examples(DataConfig("hellaswag", path, padding="max"), tok)


def test_text_is_packed_into_full_chunks(tok, tmp_path):
    docs = ["The quick brown fox jumps over the lazy dog.", "Hello! How are you today?", "I am fine, thank you."]
    path = write(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    stream = []
    for d in docs:
        stream += ([tok.eos_token_id] if stream else []) + tok(d)["input_ids"]
    examples = load_examples(DataConfig("text", path, seq_length=8), tok)
    assert len(examples) == len(stream) // 8 and len(stream) % 8
    assert all(e.input_ids == e.labels and len(e.input_ids) == 8 for e in examples)
    assert sum((e.input_ids for e in examples), []) == stream[:len(examples) * 8]
    kept = load_examples(DataConfig("text", path, seq_length=8, drop_last=False), tok)
    assert sum((e.input_ids for e in kept), []) == stream and len(kept[-1].input_ids) == len(stream) % 8
    whole = tmp_path / "text.txt"
    whole.write_text("\n".join(docs))
    (one,) = load_examples(DataConfig("text", str(whole), seq_length=1000, drop_last=False), tok)
    assert tok.decode(one.input_ids) == "\n".join(docs)
    with pytest.raises(DataError, match="fewer than seq_length 1000"):
        load_examples(DataConfig("text", str(whole), seq_length=1000), tok)


def test_truncation(tok, tmp_path):
    path = write(tmp_path / "swag.jsonl", [SWAG, {**SWAG, "ctx": SWAG["ctx"] * 3}])
    short, long = load_examples(DataConfig("hellaswag", path, seq_length=512), tok)
    n = len(short.input_ids)
    with pytest.raises(DataError, match=f"^{path}:2: {len(long.input_ids)} tokens, longer than seq_length {n}"):
        load_examples(DataConfig("hellaswag", path, seq_length=n), tok)
    _, left = load_examples(DataConfig("hellaswag", path, seq_length=n, truncation="left"), tok)
    assert left == Example(long.input_ids[-n:], long.labels[-n:])  # the start dropped, the ending kept
    short_ctx = write(tmp_path / "r.jsonl", [{**SWAG, "ctx": "A"}])
    (right,) = load_examples(DataConfig("hellaswag", short_ctx, seq_length=3, truncation="right"), tok)
    (full,) = load_examples(DataConfig("hellaswag", short_ctx), tok)
    assert right == Example(full.input_ids[:3], full.labels[:3])  # the end dropped
    with pytest.raises(DataError, match=f"^{path}:2: no tokens to learn from after right truncation"):
        load_examples(DataConfig("hellaswag", path, seq_length=n, truncation="right"), tok)  # only context left


def test_collate_and_padding(tok, tmp_path):
    examples = [Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(v.dtype == torch.long for v in batch.values())
    path = write(tmp_path / "swag.jsonl", [SWAG])
    assert batch_length(DataConfig("hellaswag", path), examples) == 3
    assert batch_length(DataConfig("hellaswag", path, seq_length=16, padding="max_length"), examples) == 16
    assert collate(examples, pad_id=2, length=16)["input_ids"].shape == (2, 16)
    with pytest.raises(AssertionError):
        collate(examples, pad_id=0, length=2)
