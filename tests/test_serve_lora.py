"""Per-request LoRA in the serving engine: adapters saved by moelm's LoRA (attention, dense MLP or shared experts, and
stacked experts) served side by side; sequences with different adapters (and none) in one batch each answer as the
model with that adapter merged, run alone; prefix caching never shares KV across adapters; the server's
--lora-modules, /v1/models and errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.models.scaffold import new_checkpoint
from moelm.serve.engine import Engine, RequestError, SamplingParams
from moelm.serve.lora import Adapters
from moelm.train.lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter

# family -> two adapters' targets: (target_modules, target_parameters)
TARGETS = {
    "ernie4_5-tiny": [(["q_proj", "v_proj", "o_proj"], None), (["gate_proj", "up_proj", "down_proj"], None)],
    "ernie4_5_moe-tiny": [(["q_proj", "k_proj", "o_proj"], ["experts.gate_up_proj", "experts.down_proj"]),
                          (["shared_experts.up_proj"], ["experts.down_proj"])],
    "phimoe-tiny": [(["q_proj", "o_proj"], ["experts.gate_up_proj"]), (["v_proj"], ["experts.down_proj"])],
}


@pytest.fixture(scope="module", params=list(TARGETS))
def served(request, tmp_path_factory):
    """(checkpoint, {name: adapter dir}) with two random adapters of different ranks."""
    root = tmp_path_factory.mktemp(request.param)
    path = new_checkpoint(request.param, root / "base", seed=0)
    adapters = {}
    for i, (modules, params) in enumerate(TARGETS[request.param]):
        model = AutoModelForCausalLM.from_pretrained(path, fast=False)
        config = LoraConfig(r=4 + 4 * i, lora_alpha=8, target_modules=modules, target_parameters=params,
                            init_lora_weights=False)
        torch.manual_seed(10 + i)
        apply_lora(model, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.5)
        adapters[f"a{i}"] = str(save_adapter(model, root / f"a{i}", config))
    return path, adapters


def merged(path, adapter):
    model = AutoModelForCausalLM.from_pretrained(path)
    if adapter is not None:
        load_adapter(model, adapter)
        merge_lora(model)
    return model


def test_each_row_answers_as_its_adapter_merged(served):
    path, dirs = served
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t)["input_ids"] for t in ("Hello there", "def f(x):", "Once upon a time, in a land")]
    jobs = [(p, name) for p in prompts for name in (None, "a0", "a1")]
    want = []
    for prompt, name in jobs:
        model = merged(path, None if name is None else dirs[name])
        want.append(model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=None)[0, len(prompt):].tolist())
    assert len({tuple(w) for w in want}) > 3  # the adapters change the answers
    model = AutoModelForCausalLM.from_pretrained(path)
    adapters = Adapters.load(model, dirs)
    with Engine(model, tokenizer, max_num_seqs=9, max_model_len=64, adapters=adapters,
                max_num_batched_tokens=24).start() as engine:
        requests = [engine.submit(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                    adapter=adapters.id(name) if name else 0)) for p, name in jobs]
        got = [[t for out in r for t in out.token_ids] for r in requests]
        assert got == want
        # the same prompt again under each adapter: its own prefix only
        again = [engine.submit(prompts[2], SamplingParams(max_tokens=2, temperature=0, adapter=a)) for a in (0, 1, 2)]
        for r in again:
            list(r)
        assert [r.cached_tokens for r in again] == [(len(prompts[2]) - 1) // 16 * 16] * 3
        with pytest.raises(RequestError, match="no LoRA adapter 7"):
            engine.submit(prompts[0], SamplingParams(adapter=7))


def test_bad_adapters_are_named(served, tmp_path):
    path, dirs = served
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match=r"LoRA adapter x \(.*nowhere\).*not found"):
        Adapters.load(model, {"x": str(tmp_path / "nowhere")})
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((__import__("pathlib").Path(dirs["a0"]) / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    (broken / "adapter_model.safetensors").write_bytes(
        (__import__("pathlib").Path(dirs["a0"]) / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="LoRA adapter b .*has shape"):
        Adapters.load(model, {"b": str(broken)})


def test_server_lists_and_serves_adapters(served):
    pytest.importorskip("fastapi")
    import httpx

    from serve_fixtures import running_server

    path, dirs = served
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    alone = merged(path, dirs["a1"])
    prompt = tokenizer("Hello there")["input_ids"]
    want = tokenizer.decode(alone.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                           eos_token_id=None)[0, len(prompt):])
    with running_server(path, max_model_len=64, lora_modules=dirs) as (url, engine, _):
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("a0", "tiny"), ("a1", "tiny")]
        r = httpx.post(url + "/v1/completions", json={"model": "a1", "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["model"] == "a1" and r.json()["choices"][0]["text"] == want
        r = httpx.post(url + "/v1/completions", json={"model": "a9", "prompt": prompt})
        assert r.status_code == 404
    del model


def test_cli_lora_modules_errors_are_one_line(tmp_path, capsys):
    from moelm.cli import main

    path = new_checkpoint("ernie4_5-tiny", tmp_path, seed=0)
    r = subprocess.run([sys.executable, "-m", "moelm.cli", "serve", str(path), "--lora-modules", "nameonly"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--lora-modules nameonly: give NAME=PATH" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert main(["serve", str(path), "--lora-modules", "x=/no/such/adapter"]) == 1  # the same path, in this process
    err = capsys.readouterr().err
    assert "LoRA adapter x (/no/such/adapter)" in err and "Traceback" not in err and err.count("\n") == 1, err
