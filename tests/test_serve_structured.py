"""Structured output (llguidance): random tiny models of the three families, which would otherwise print garbage,
answer JSON that validates against the schema, strings matching the regex, one of the choices, sentences of the
grammar; the mask keeps EOS once the grammar is complete; constrained and free sequences share a batch; the HTTP
fields (OpenAI's response_format, vLLM's structured_outputs and guided_*) and their errors."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

pytest.importorskip("llguidance")

from moelm import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from moelm.models.scaffold import new_checkpoint  # noqa: E402
from moelm.serve.engine import Engine, RequestError, SamplingParams  # noqa: E402
from moelm.serve.structured import Grammars, allowed  # noqa: E402
from serve_fixtures import running_server  # noqa: E402

FAMILIES = ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
COMPACT = {"x-guidance": {"whitespace_flexible": False}}
# (constraint, a check of the text)
CASES = {
    "json": (("json", {**SCHEMA, **COMPACT}), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    "regex": (("regex", r"[0-9]{1,3}-[a-z]{2}"), lambda text: re.fullmatch(r"[0-9]{1,3}-[a-z]{2}", text)),
    "choice": (("choice", ["yes", "no", "not sure"]), lambda text: text in ("yes", "no", "not sure")),
    "lark": (("grammar", 'start: "(" ITEM ("," ITEM)~0..2 ")"\nITEM: /[a-c]/'),
             lambda text: re.fullmatch(r"\([a-c](,[a-c]){0,2}\)", text)),
    "gbnf": (("grammar", 'root ::= "v" [0-9] "." [0-9]'), lambda text: re.fullmatch(r"v[0-9]\.[0-9]", text)),
}


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    path = new_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def answer(engine, prompt, params) -> tuple[str, str]:
    text, finish = "", None
    for out in engine.submit(prompt, params):
        text += out.text
        finish = out.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("case", CASES)
def test_outputs_follow_the_constraint(loaded, case):
    """Greedy and sampled answers (every seed) end by themselves ("stop", not "length") and check."""
    _, model, tokenizer = loaded
    (kind, spec), check = CASES[case]
    prompt = tokenizer("Reply:")["input_ids"]
    with Engine(model, tokenizer, max_num_seqs=4, max_model_len=256).start() as engine:
        for temperature, seed in [(0, None), (1.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)]:
            params = SamplingParams(max_tokens=120, temperature=temperature, seed=seed, structured=(kind, spec, kind))
            text, finish = answer(engine, prompt, params)
            assert finish == "stop", (temperature, seed, text)
            assert check(text) is not False, (temperature, seed, text)


def test_eos_is_kept_once_the_grammar_is_complete(loaded):
    """After one digit of [0-9]{1,3} the mask allows EOS and more digits; after three, EOS alone; a choice's mask
    never allows EOS before the choice is complete."""
    _, model, tokenizer = loaded
    eos = tokenizer.eos_token_id
    grammars = Grammars(tokenizer, model.config.vocab_size, [eos])
    digit = tokenizer("7", add_special_tokens=False)["input_ids"]
    assert len(digit) == 1
    matcher = grammars.matcher(grammars.compile("regex", "[0-9]{1,3}"))
    assert not allowed(matcher, model.config.vocab_size)[eos]
    for n in range(3):
        assert matcher.consume_token(digit[0])
        mask = allowed(matcher, model.config.vocab_size)
        assert mask[eos] and mask[digit[0]] == (n < 2)
    assert int(mask.sum()) == 1  # three digits: EOS alone
    choice = grammars.matcher(grammars.compile("choice", ["abc"]))
    for token in tokenizer("abc", add_special_tokens=False)["input_ids"]:
        assert not allowed(choice, model.config.vocab_size)[eos]
        assert choice.consume_token(token)
    assert allowed(choice, model.config.vocab_size)[eos]


def test_constrained_and_free_sequences_share_a_batch(loaded):
    """Free greedy sequences batched with constrained ones (and min_tokens past a complete choice, and n-gram
    drafting, which constrained sequences skip) answer as when they run alone."""
    _, model, tokenizer = loaded
    prompts = [tokenizer(t)["input_ids"] for t in ("Hello there", "def f(x):", "Once upon a time")]
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with Engine(model, tokenizer, max_num_seqs=6, max_model_len=128).start() as engine:
        alone = [answer(engine, p, free)[0] for p in prompts]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    with Engine(model, tokenizer, max_num_seqs=6, max_model_len=128, speculative=spec).start() as engine:
        constrained = [engine.submit(p, SamplingParams(max_tokens=60, temperature=0, min_tokens=5,
                                                       structured=CASES[c][0] + (c,)))
                       for p, c in zip(prompts, ("choice", "regex", "json"))]
        frees = [engine.submit(p, free) for p in prompts]
        texts = []
        for r in constrained + frees:
            texts.append("".join(out.text for out in r))
    assert texts[3:] == alone
    for text, case in zip(texts[:3], ("choice", "regex", "json")):
        assert CASES[case][1](text) is not False, (case, text)


def test_bad_constraints_are_request_errors(loaded):
    _, model, tokenizer = loaded
    with Engine(model, tokenizer, max_model_len=64).start() as engine:
        for structured, message in [(("regex", "[a-", "guided_regex"), "guided_regex: the regex constraint does "
                                     "not compile"),
                                    (("json", "{nope", "structured_outputs"), "the JSON schema is not JSON"),
                                    (("choice", [], "guided_choice"), "list of non-empty strings"),
                                    (("grammar", "root ::= (", "guided_grammar"), "guided_grammar")]:
            with pytest.raises(RequestError, match=re.escape(message)) as info:
                engine.submit([5, 6], SamplingParams(structured=structured))
            assert info.value.param == structured[2]


def test_http_fields_and_errors(loaded):
    path, _, _ = loaded
    with running_server(path, max_model_len=256) as (url, engine, tokenizer):
        def post(body, endpoint="/v1/chat/completions"):
            base = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in endpoint else {"prompt": "Hi"}
            return httpx.post(url + endpoint, json={**base, "max_tokens": 80, "temperature": 0, **body}, timeout=60)

        r = post({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
                  "structured_outputs": {"disable_any_whitespace": True}})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
        r = post({"structured_outputs": {"choice": ["alpha", "beta"]}}, "/v1/completions")
        assert r.json()["choices"][0]["text"] in ("alpha", "beta") and r.json()["choices"][0]["finish_reason"] == "stop"
        r = post({"guided_regex": "[0-9]{4}", "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        assert re.fullmatch("[0-9]{4}", "".join(c["choices"][0]["delta"].get("content", "") for c in chunks))
        r = post({"guided_grammar": 'root ::= "a" [bc] "d"'}, "/v1/completions")
        assert re.fullmatch("a[bc]d", r.json()["choices"][0]["text"])
        for body, field, message in [
            ({"guided_regex": "[a-"}, "guided_regex", "does not compile"),
            ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "give one structured-output constraint"),
            ({"response_format": {"type": "yaml"}}, "response_format", "response_format type 'yaml' is not supported"),
            ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema.schema"),
            ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag is not supported"),
            ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend", "llguidance"),
            ({"guided_json": "{nope"}, "guided_json", "not JSON"),
        ]:
            r = post(body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == field and message in error["message"], (body, error)


def test_a_vocabulary_that_cannot_spell_the_constraint_is_a_request_error(tmp_path):
    """A word-level tokenizer (no byte fallback) cannot spell what a regex needs: a 400, never a forbidden token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = new_checkpoint("ernie4_5-tiny", tmp_path, seed=0)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(path / "tokenizer.json"))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with Engine(model, tokenizer, max_model_len=64).start() as engine:  # no decoder: llguidance refuses it
        with pytest.raises(RequestError, match="cannot use this model's tokenizer"):
            engine.submit([3, 4], SamplingParams(structured=("choice", ["hello"], "guided_choice")))
    words.decoder = decoders.ByteLevel()
    words.save(str(path / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    with Engine(model, tokenizer, max_model_len=64).start() as engine:
        with pytest.raises(RequestError, match="allows no first token"):
            engine.submit([3, 4], SamplingParams(structured=("regex", "[0-9]+", "guided_regex")))
        assert answer(engine, [3, 4], SamplingParams(max_tokens=3, structured=("choice", ["hello"], "x")))[0] \
            == "hello"

