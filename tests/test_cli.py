"""The `moelm` command through subprocess calls, as a user runs it; and pipeline("text-generation")."""
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def moelm(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "moelm.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env or ENV)


def moelm_all(*calls):
    """Independent `moelm` commands at once (each is mostly one core's import and load): calls are argument tuples,
    or (arguments, keyword arguments of moelm()); the results in order."""
    calls = [c if len(c) == 2 and isinstance(c[1], dict) else (c, {}) for c in calls]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda c: moelm(*c[0], **c[1]), calls))


@pytest.fixture(scope="module", params=["ernie4_5_moe-tiny", "phimoe-tiny", "ernie4_5-tiny"])
def tiny(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    r = moelm("new", request.param, str(out), "--seed", "1")
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    return out


def test_generate_streams_the_same_text_as_the_python_api(tiny):
    from moelm import AutoModelForCausalLM
    from moelm.text.tokenizer import AutoTokenizer

    greedy = ("generate", "--model", str(tiny), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0")
    r, one = moelm_all(greedy, (*greedy, "--threads", "1"))
    assert r.returncode == 0, r.stderr
    model, tok = AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    enc = tok("Hello", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert r.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "Traceback" not in r.stderr
    assert one.returncode == 0 and one.stdout == r.stdout, one.stderr


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_quantized_matches_the_python_api(tiny, mode):
    from moelm import AutoModelForCausalLM
    from moelm.text.tokenizer import AutoTokenizer

    r = moelm("generate", "--model", str(tiny), "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0",
              "--quantization", mode)
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization=mode)
    tok = AutoTokenizer.from_pretrained(tiny)
    enc = tok("Hello", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    want = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert r.stdout.rstrip("\n") == want.rstrip("\n") and "Traceback" not in r.stderr


def in_process(args, capsys, monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    """The command's main() in this process (what `moelm ...` runs, less the interpreter's start): (code, out, err)."""
    from moelm.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_chat_stdin_and_seed(tiny, capsys, monkeypatch):
    args = ("generate", "--model", str(tiny), "--prompt", "-", "--chat", "--system", "Be brief.", "--max-new-tokens",
            "8", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3")
    a, b = (in_process(args, capsys, monkeypatch, stdin="What is 2+2?") for _ in range(2))
    assert a[0] == 0, a[2]
    assert a[1] == b[1] and a[1].strip()


def test_chat_repl_commands(tiny, capsys, monkeypatch):
    script = "Hi there\n/system You are terse.\nAnd again\n/reset\nOne more\n/exit\n"
    code, _, err = in_process(("chat", "--model", str(tiny), "--max-new-tokens", "6", "--temperature", "0"), capsys,
                              monkeypatch, stdin=script)
    assert code == 0, err
    assert "conversation cleared" in err
    assert "system message set" in err


def test_chat_prefills_only_the_new_turn_and_replies_as_fresh_runs(tiny, capsys, monkeypatch):
    """Each turn continues the last turn's KV cache (cut to the tokens the new prompt shares with it), so only the
    new tokens are prefilled; the replies are those of a fresh greedy generate() over the whole conversation."""
    import moelm.cli as cli
    from moelm import AutoModelForCausalLM
    from moelm.text.tokenizer import AutoTokenizer

    fed = []
    load = cli.load

    def observed(args):
        model, tok = load(args)
        model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
        return model, tok

    monkeypatch.setattr(cli, "load", observed)
    turns = ["Hi there", "And again", "One more"]
    script = f"{turns[0]}\n{turns[1]}\n/system Be terse.\n{turns[2]}\n/exit\n"
    code, out, err = in_process(("chat", "--model", str(tiny), "--max-new-tokens", "5", "--temperature", "0"), capsys,
                                monkeypatch, stdin=script)
    assert code == 0, err
    model, tok = AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    history, replies, prompts, runs = [], [], [], []
    for i, turn in enumerate(turns):
        system = [{"role": "system", "content": "Be terse."}] if i == 2 else []
        history = (history if i < 2 else []) + [{"role": "user", "content": turn}]
        enc = tok.apply_chat_template(system + history, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        ids = model.generate(**enc, max_new_tokens=5, do_sample=False)
        replies.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        prompts.append(enc["input_ids"].shape[1])
        runs.append((enc["input_ids"][0], ids[0, :-1]))  # the prompt; what the cache holds after the reply
        history.append({"role": "assistant", "content": replies[-1].strip()})
    assert out.splitlines() == [r.rstrip("\n") for r in replies]
    starts = [i for i, n in enumerate(fed) if n > 1 or i == 0]  # each turn's prefill, then one token a step
    for turn in (1, 2):  # each prefill feeds the prompt past what it shares with the last turn's cached tokens
        prompt, held = runs[turn][0], runs[turn - 1][1]
        shared = next((i for i, (a, b) in enumerate(zip(prompt, held)) if a != b), min(len(prompt), len(held)))
        assert fed[starts[turn]] == prompts[turn] - shared
    assert fed[0] == prompts[0] and fed[starts[1]] <= prompts[1] - prompts[0]  # not the first turn's prompt again


def test_info(tiny, capsys, monkeypatch):
    code, out, err = in_process(("info", "--model", str(tiny)), capsys, monkeypatch)
    assert code == 0, err
    assert "parameters" in out and "active per token" in out
    if "moe" in tiny.name:
        assert "experts" in out


def test_info_on_a_real_size_config_needs_no_weights(tmp_path, capsys, monkeypatch):
    import moelm as m

    m.named_config("ernie-4.5-21b-a3b").save_pretrained(tmp_path)
    code, out, err = in_process(("info", "--model", str(tmp_path)), capsys, monkeypatch)
    assert code == 0, err
    assert "21.8G total" in out, out
    assert "64 experts, top-6, 2 shared" in out


@pytest.mark.parametrize("args,needle", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
    (["generate", "--model", "someorg/not-cached-model", "--prompt", "x"], "someorg/not-cached-model"),
    (["info", "--model", "/no/such/dir"], "does not exist"),
    (["new", "no-such-config", "/no/such/dir/x"], "unknown config name"),
])
def test_errors_are_one_line_without_traceback(args, needle, tmp_path):
    env = dict(ENV, HF_HUB_CACHE=str(tmp_path))
    r = moelm(*args, env=env)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_user_errors_name_what_is_at_fault(tmp_path, capsys, monkeypatch):
    """Bytes that are not UTF-8 (argv, standard input), a chat template that does not compile or fails, tokenizer
    files that are not JSON or not a tokenizer, rope_parameters that is no dict: one line naming it, exit 1."""
    import io
    import json
    import shutil

    from moelm.cli import main
    from moelm.models.scaffold import new_checkpoint

    good = new_checkpoint("ernie4_5-tiny", tmp_path / "good", seed=0)
    argv = subprocess.run([sys.executable, "-m", "moelm.cli", "generate", "--model", str(good), "--prompt", b"ab\xff"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert argv.returncode == 1 and argv.stderr == "moelm: error: --prompt is not valid UTF-8: it holds 0xff at " \
        "character 2\n", argv.stderr

    def broken(name, file, change):
        shutil.copytree(good, tmp_path / name)
        path = tmp_path / name / file
        path.write_text(change(json.loads(path.read_text())) if callable(change) else change)
        return tmp_path / name

    empty = tmp_path / "empty"  # its config is what is missing first, not its tokenizer
    empty.mkdir()
    tpl = lambda text: lambda cfg: json.dumps({**cfg, "chat_template": text})  # noqa: E731
    cases = [
        (["--model", str(broken("syntax", "tokenizer_config.json", tpl("{{ messages[0].content "))), "--chat"],
         f"the chat template in {tmp_path / 'syntax' / 'tokenizer_config.json'} does not compile: unexpected end of "
         "template"),
        (["--model", str(broken("undefined", "tokenizer_config.json", tpl("{{ messages[5].content }}"))), "--chat"],
         f"the chat template in {tmp_path / 'undefined' / 'tokenizer_config.json'} failed: UndefinedError"),
        (["--model", str(broken("kind", "tokenizer.json", '{"model": {"type": "Nope"}}'))],
         f"{tmp_path / 'kind' / 'tokenizer.json'} is not a tokenizer the tokenizers library reads"),
        (["--model", str(broken("tok", "tokenizer.json", "{oops"))],
         f"{tmp_path / 'tok' / 'tokenizer.json'} is not valid JSON"),
        (["--model", str(broken("cfg", "tokenizer_config.json", '{"a": 1,'))],
         f"{tmp_path / 'cfg' / 'tokenizer_config.json'} is not valid JSON"),
        (["--model", str(broken("rope", "config.json", lambda cfg: json.dumps({**cfg, "rope_parameters": "x"})))],
         "rope_parameters must be a dict"),
        (["--model", str(empty)], f"no config.json in {empty}"),
        (["--model", str(good), "--prompt", "-"], "the prompt (standard input) is not valid UTF-8: it holds 0xff"),
        (["--model", str(good), "--system", "x\udcfe"], "--system is not valid UTF-8: it holds 0xfe at character 1"),
    ]
    for args, message in cases:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xff"), encoding="utf-8"))
        prompt = [] if "--prompt" in args else ["--prompt", "hi"]
        assert main(["generate", *args, *prompt, "--max-new-tokens", "2"]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("moelm: error: ") and message in err and err.count("\n") == 1, err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xff\n/exit\n"), encoding="utf-8"))
    assert main(["chat", "--model", str(good), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == "moelm: the line is not valid UTF-8: it holds 0xff at character 2; skipped\n"


def test_errors_with_a_model(tmp_path, capsys, monkeypatch):
    """Argument errors once a model is found (the same code for every family: one is enough); the first as a user
    runs it, the others in this process (the same main())."""
    from moelm.models.scaffold import new_checkpoint

    tiny = new_checkpoint("ernie4_5_moe-tiny", tmp_path / "m", seed=1)
    base = ("generate", "--model", str(tiny), "--prompt", "x")
    long, kernels = moelm_all(("generate", "--model", str(tiny), "--prompt", "word " * 3000, "--max-new-tokens", "4"),
                              (base, dict(env=dict(ENV, MOELM_KERNELS="linear=fastest"))))  # read once a process
    assert long.returncode == 1 and "exceeds the model's context" in long.stderr and "Traceback" not in long.stderr
    assert kernels.returncode == 1 and "MOELM_KERNELS asks for 'fastest'" in kernels.stderr \
        and "Traceback" not in kernels.stderr
    for flag in ("--dtype", "--quantization"):  # argparse's own refusal: exit 2
        with pytest.raises(SystemExit) as e:
            in_process((*base, flag, "int3"), capsys, monkeypatch)
        assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    cases = [(base + ("--device", "tpu"), "unknown --device"),
             (("chat", "--model", str(tiny), "--threads", "0"), "--threads must be at least 1")]
    if not torch.cuda.is_available():
        cases.append((base + ("--device", "cuda"), "no CUDA GPU"))
    for args, message in cases:
        code, _, err = in_process(args, capsys, monkeypatch, stdin="/exit\n")
        assert code == 1 and message in err and "Traceback" not in err and err.count("\n") == 1, (args, err)


def test_pipeline_matches_transformers(tiny):
    """pipeline("text-generation") on text and on chat messages gives what transformers' pipeline gives."""
    import transformers

    import moelm

    ours = moelm.pipeline("text-generation", model=str(tiny))
    ref = transformers.pipeline("text-generation", model=str(tiny), dtype=torch.float32)
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello!"}]
    for prompt in ("Once upon a time", messages):
        for full in (True, False):
            kw = dict(max_new_tokens=10, do_sample=False, return_full_text=full)
            assert ours(prompt, **kw) == ref(prompt, **kw)


def test_pipeline_parameters_as_transformers(tiny):
    """transformers' text-generation parameters (return types, prefix, stop_sequence, max_length reaching the
    tokenizer, truncation, handle_long_generation, continue_final_message, skip_special_tokens, documents,
    tokenizer_encode_kwargs, batch_size), its default of 256 new tokens, and generate()'s dict outputs in the
    records: the same records as transformers' pipeline."""
    import transformers

    import moelm

    ours = moelm.pipeline("text-generation", model=str(tiny))
    ref = transformers.pipeline("text-generation", model=str(tiny), dtype=torch.float32)
    chat = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Sure, here"}]
    prompts = ["Once upon a time", ["Hi", "A much longer prompt of a few words"], chat]
    variants = [dict(return_tensors=True), dict(return_text=True),
                dict(return_type=transformers.pipelines.text_generation.ReturnType.NEW_TEXT),
                dict(prefix="Start: ", max_length=30), dict(stop_sequence="e"), dict(max_length=12),
                dict(truncation=True, max_length=14), dict(handle_long_generation="hole"),
                dict(continue_final_message=False), dict(skip_special_tokens=False),
                dict(clean_up_tokenization_spaces=True), dict(documents=[{"title": "t", "text": "x"}]),
                dict(tokenizer_encode_kwargs={"add_special_tokens": False}), dict(add_special_tokens=True),
                dict(batch_size=2, num_return_sequences=2, num_beams=2)]
    for prompt in prompts:
        for variant in variants:
            kw = {"max_new_tokens": 6, "do_sample": False, **variant}
            assert ours(prompt, **kw) == ref(prompt, **kw), (prompt, variant)
    kw = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    got, expected = ours("Once upon a time", **kw)[0], ref("Once upon a time", **kw)[0]
    assert got["generated_text"] == expected["generated_text"]
    torch.testing.assert_close(torch.tensor(got["scores"]), torch.tensor(expected["scores"]), atol=1e-4, rtol=1e-4)
    kw = dict(do_sample=False, return_tensors=True)  # no max_new_tokens: the pipeline's 256
    assert ours("Once upon a time", **kw) == ref("Once upon a time", **kw)
    for bad, message in ((dict(return_text=True, return_full_text=True), "mutually exclusive"),
                         (dict(return_tensors=True, return_full_text=False), "mutually exclusive"),
                         (dict(handle_long_generation="tail"), "handle_long_generation"),
                         (dict(bogus=1), "'bogus'")):
        with pytest.raises((ValueError, TypeError), match=message):
            ours("Hi", **bad)


def test_generate_speculative_flags(tmp_path, capsys):
    """--prompt-lookup-num-tokens and --assistant-model give the greedy text of plain decoding (-v says how many
    drafts were kept); a bad flag is a one-line error (in this process: main() prints it and returns 1)."""
    from moelm.cli import main
    from moelm.models.scaffold import new_checkpoint

    path = str(new_checkpoint("ernie4_5-tiny", tmp_path / "tiny", seed=1))
    base = ["generate", "--model", path, "--prompt", "Hello Hello Hello", "--max-new-tokens", "12", "--temperature",
            "0"]
    extras = (["--prompt-lookup-num-tokens", "3"], ["--assistant-model", path, "--num-assistant-tokens", "2"])
    bad = ((["--speculative", "mtp"], "has no MTP head"),
           (["--prompt-lookup-num-tokens", "0"], "--prompt-lookup-num-tokens must be positive"),
           (["--assistant-model", str(tmp_path / "none")], "no such checkpoint"),
           (["--num-assistant-tokens", "2"], "--num-assistant-tokens is for --assistant-model or --speculative mtp"))
    plain, *runs = moelm_all(base, *[(*base, *extra, "-v") for extra in extras])
    assert plain.returncode == 0, plain.stderr
    for extra, r in zip(extras, runs):
        assert r.returncode == 0 and r.stdout == plain.stdout, (extra, r.stderr)
        assert "moelm: speculative:" in r.stderr and "drafted tokens kept" in r.stderr, r.stderr
    for extra, needle in bad:
        assert main([*base, *extra]) == 1, extra
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_pipeline_reads_the_fields_a_generation_config_sets():
    """A call's generation_config counts as setting the fields it was given, a default value included (so the
    pipeline's own defaults do not replace them), as transformers' to_diff_dict does for its config."""
    from moelm.generation import GenerationConfig
    from moelm.pipelines import _set_fields

    assert _set_fields(GenerationConfig(temperature=1.0, max_new_tokens=4)) == {"temperature": 1.0,
                                                                                 "max_new_tokens": 4}
    assert _set_fields({"do_sample": False, "top_k": None}) == {"do_sample": False}
