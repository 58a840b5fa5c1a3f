"""Nothing silently ignored: from_pretrained's and pipeline()'s keyword arguments are config fields, loader options
that are honoured, or a TypeError naming them; and the small newcomer fixes (moelm new --force, generate -v,
bench names)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from moelm import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, Ernie4_5_MoeForCausalLM, pipeline
from moelm.config import Ernie4_5Config
from moelm.inference.quantize import resolve
from moelm.io.weights import CheckpointError
from moelm.loading.pretrained import place
from moelm.models.scaffold import new_checkpoint

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("opts"), seed=0)


def test_unknown_keyword_is_a_type_error_naming_it(tiny):
    with pytest.raises(TypeError, match="'devce'.*not a loader option nor a field of Ernie4_5_MoeConfig"):
        AutoModelForCausalLM.from_pretrained(tiny, devce="cpu")
    with pytest.raises(TypeError, match="'bogus', 'devce'"):
        AutoModelForCausalLM.from_pretrained(tiny, devce="cpu", bogus=1)


def test_config_fields_and_accepted_options(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny, use_cache=False, num_experts_per_tok=1,
                                                 low_cpu_mem_usage=True, trust_remote_code=True)
    assert model.config.use_cache is False and model.config.moe_k == 1  # an alias sets its field
    assert model.hf_device_map == {"": "cpu"}


def test_device_map(tiny):
    cpu = AutoModelForCausalLM.from_pretrained(tiny, device_map="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    if not torch.cuda.is_available():
        auto = AutoModelForCausalLM.from_pretrained(tiny, device_map="auto")
        assert auto.device.type == "cpu" and auto.hf_device_map == {"": "cpu"}
        torch.testing.assert_close(auto(ids).logits, cpu(ids).logits)
        with pytest.raises(ValueError, match="device_map='cuda': no such CUDA device here"):
            AutoModelForCausalLM.from_pretrained(tiny, device_map="cuda")
    placed = AutoModelForCausalLM.from_pretrained(tiny, device_map={"model": "cpu", "lm_head": "cpu"})
    torch.testing.assert_close(placed(ids).logits, cpu(ids).logits)
    with pytest.raises(NotImplementedError, match=r"places modules on \['cpu', 'disk'\]"):
        place({"model.layers.0": "cpu", "model.layers.1": "disk"})
    with pytest.raises(NotImplementedError, match="offloading"):
        place("disk")
    with pytest.raises(ValueError, match="device_map='nowhere' is not a device"):
        place("nowhere")
    with pytest.raises(ValueError, match="disagree"):
        place("cpu", "meta")


@pytest.mark.parametrize("kwargs", [dict(tp_plan="auto"), dict(tp_size=2), dict(distributed_config={"tp_size": 2})])
def test_parallelism_outside_torchrun_says_how_to_launch(tiny, kwargs, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="launched by torchrun.*RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"):
        AutoModelForCausalLM.from_pretrained(tiny, **kwargs)


def test_parallelism_arguments_that_cannot_go_together(tiny):
    with pytest.raises(ValueError, match="tp_size=2 with device_map='cpu'"):
        AutoModelForCausalLM.from_pretrained(tiny, tp_size=2, device_map="cpu")
    with pytest.raises(ValueError, match="disagrees with distributed_config.tp_size=2"):
        AutoModelForCausalLM.from_pretrained(tiny, tp_size=4, distributed_config={"tp_size": 2})
    with pytest.raises(NotImplementedError, match="quantized weights under tensor/expert parallelism"):
        AutoModelForCausalLM.from_pretrained(tiny, tp_size=1, quantization="int8")


def test_load_in_8bit_maps_to_the_quantization_config(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny, load_in_8bit=True)
    assert type(model.lm_head).__name__ == "QuantizedLinear"
    with pytest.raises(ValueError, match="not both"):
        AutoModelForCausalLM.from_pretrained(tiny, load_in_4bit=True, quantization="int8")


def test_hub_arguments_as_transformers(tiny, tmp_path, monkeypatch):
    """cache_dir, local_files_only, token, force_download and revision reach the hub resolution of the model, its
    config, generation config and tokenizer (the tokenizer used to drop them: revision= loaded the default)."""
    from moelm import AutoTokenizer, GenerationConfig
    from moelm.io.hub import ModelNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    cache = tmp_path / "own"
    repo = cache / "models--baidu--tiny-moe"
    shutil.copytree(tiny, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "dev").write_text("a" * 40)
    hub = dict(cache_dir=cache, local_files_only=True, token="hf_unused")
    model = AutoModelForCausalLM.from_pretrained("baidu/tiny-moe", **hub)
    assert model.config.model_type == "ernie4_5_moe"
    assert AutoConfig.from_pretrained("baidu/tiny-moe", **hub).model_type == "ernie4_5_moe"
    assert AutoConfig.from_pretrained("baidu/tiny-moe", revision="dev", **hub).model_type == "ernie4_5_moe"
    assert GenerationConfig.from_pretrained("baidu/tiny-moe", **hub).eos_token_id is not None
    tokenizer = AutoTokenizer.from_pretrained("baidu/tiny-moe", revision="dev", **hub)
    assert tokenizer("Hello")["input_ids"] == AutoTokenizer.from_pretrained(tiny)("Hello")["input_ids"]
    for load in (AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ModelNotFoundError, match="local_files_only=True, so no download was tried"):
            load("baidu/tiny-moe", revision="v2", **hub)
        with pytest.raises(ModelNotFoundError, match="local_files_only=True"):
            load("baidu/not-cached", local_files_only=True)
    with pytest.raises(TypeError, match="local_files_only must be True or False, got 'yes'"):
        AutoModelForCausalLM.from_pretrained("baidu/tiny-moe", local_files_only="yes")


def test_revision(tiny, tmp_path, monkeypatch):
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="revision='main' applies to hub ids"):
            load(tiny, revision="main")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = cache / "models--baidu--tiny-moe"
    shutil.copytree(tiny, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "dev").write_text("a" * 40)
    model = AutoModelForCausalLM.from_pretrained("baidu/tiny-moe", revision="dev")
    assert model.name_or_path == "baidu/tiny-moe@dev"
    with pytest.raises(Exception, match="v2"):
        AutoModelForCausalLM.from_pretrained("baidu/tiny-moe", revision="v2")


def test_pipeline_honours_and_refuses_arguments(tiny):
    pipe = pipeline("text-generation", model=str(tiny), max_new_tokens=5, do_sample=False,
                    model_kwargs={"attn_implementation": "eager"})
    assert pipe.model.config.attn_implementation == "eager"
    enc = pipe.tokenizer("Hello", return_tensors="pt")
    want = pipe.model.generate(**enc, max_new_tokens=5, do_sample=False)
    text = pipe("Hello", return_full_text=False)[0]["generated_text"]
    assert text == pipe.tokenizer.decode(want[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    longer = pipe.model.generate(**enc, max_new_tokens=7, do_sample=False)
    assert pipe("Hello", max_new_tokens=7)[0]["generated_text"] == "Hello" + pipe.tokenizer.decode(
        longer[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(TypeError, match="pipeline\\(\\) got unexpected keyword argument\\(s\\) 'bogus_arg'"):
        pipeline("text-generation", model=str(tiny), bogus_arg=123)
    with pytest.raises(TypeError, match="'bogus'"):
        pipe("Hello", bogus=1)
    with pytest.raises(TypeError, match="'devce'"):
        pipeline("text-generation", model=str(tiny), model_kwargs={"devce": "cpu"})
    with pytest.raises(ValueError, match="already loaded"):
        pipeline("text-generation", model=pipe.model, tokenizer=pipe.tokenizer, model_kwargs={"use_cache": False})


def moelm(*args):
    return subprocess.run([sys.executable, "-m", "moelm.cli", *args], capture_output=True, text=True, timeout=300,
                          env=ENV)


def test_new_refuses_a_directory_in_use_and_lists_the_names(tmp_path, capsys):
    from moelm.cli import main

    out = tmp_path / "m"
    assert main(["new", "ernie4_5-tiny", str(out)]) == 0
    again = moelm("new", "ernie4_5-tiny", str(out))  # as a user runs it
    assert again.returncode == 1 and "pass --force" in again.stderr and "Traceback" not in again.stderr
    assert main(["new", "ernie4_5-tiny", str(out), "--force"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["new", "ernie4_5-tiny", str(tmp_path / "empty")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["new", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "phi-3.5-moe", "phimoe-tiny"))


def test_generate_verbose_reports_tokens_per_second(tiny, capsys):
    from moelm.cli import main

    args = ["generate", "--model", str(tiny), "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*args, "-v"]) == 0
    err = capsys.readouterr().err
    assert "generated in" in err and "tokens/s" in err
    assert main(args) == 0 and "tokens/s" not in capsys.readouterr().err


def test_bench_knows_the_named_configs_and_phimoe():
    from moelm.bench.runner import BENCH_MODELS, bench_config

    for name in ("ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny", "phi-3.5-moe-1l", "ernie-tiny"):
        assert name in BENCH_MODELS
    assert bench_config("phi-3.5-moe-1l").model_type == "phimoe"
    assert bench_config("phi-3.5-moe-1l").num_hidden_layers == 1


def test_config_argument_replaces_config_json(tiny):
    """from_pretrained(path, config=...) as transformers: the given config (or one read from a path) is used instead
    of config.json's, on a copy; the weights must fit it."""
    config = AutoConfig.from_pretrained(tiny)
    config.moe_k = 1
    model = AutoModelForCausalLM.from_pretrained(tiny, config=config)
    assert model.config.moe_k == 1 and model.config is not config
    default = AutoModelForCausalLM.from_pretrained(tiny, config=str(tiny))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, default(ids).logits)  # top-1 routing: the config is used
    assert type(Ernie4_5_MoeForCausalLM.from_pretrained(tiny, config=config)) is Ernie4_5_MoeForCausalLM
    config.num_hidden_layers += 1
    with pytest.raises(Exception, match="does not match"):
        AutoModelForCausalLM.from_pretrained(tiny, config=config)
    with pytest.raises(TypeError, match="takes a Ernie4_5_MoeConfig, got Ernie4_5Config"):
        Ernie4_5_MoeForCausalLM.from_pretrained(tiny, config=Ernie4_5Config())


def test_subfolder(tiny, tmp_path, monkeypatch):
    """subfolder= as transformers: the checkpoint in that folder of a directory or of a (cached) hub repository."""
    shutil.copytree(tiny, tmp_path / "repo" / "sub")
    want = AutoModelForCausalLM.from_pretrained(tiny)
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="sub"),
                  Ernie4_5_MoeForCausalLM.from_pretrained(tmp_path / "repo", subfolder="sub")):
        assert torch.equal(model.lm_head.weight, want.lm_head.weight)
    with pytest.raises(Exception, match="has no subfolder 'nope'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="nope")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = cache / "models--baidu--tiny-sub"
    shutil.copytree(tmp_path / "repo", repo / "snapshots" / ("b" * 40))  # no config.json at the top
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    model = AutoModelForCausalLM.from_pretrained("baidu/tiny-sub", subfolder="sub")
    assert torch.equal(model.lm_head.weight, want.lm_head.weight)


def test_pipeline_with_a_loaded_model_moves_it_and_refuses_a_dtype(tiny):
    """As transformers: device moves a loaded model there (-1 is the CPU); a dtype other than the loaded model's is
    an error (it applies when pipeline() loads the model)."""
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert pipeline("text-generation", model=model, device=-1).model.device.type == "cpu"
    assert pipeline("text-generation", model=str(tiny), device=-1).model.device.type == "cpu"
    assert pipeline("text-generation", model=model, dtype=torch.float32).model is model
    with pytest.raises(ValueError, match="dtype=torch.bfloat16 applies when pipeline\\(\\) loads the model"):
        pipeline("text-generation", model=model, dtype=torch.bfloat16)
    other = AutoModelForCausalLM.from_pretrained(tiny)
    assert pipeline("text-generation", model=other, tokenizer=str(tiny), device="meta").model.device.type == "meta"


def test_pipeline_empty_prompt_generates_from_bos_as_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    ours = pipeline("text-generation", model=str(tiny), max_new_tokens=4, do_sample=False)
    theirs = transformers.pipeline("text-generation", model=str(tiny), device=-1, max_new_tokens=4, do_sample=False)
    for prompt in ("", ["", "Hello"]):
        assert ours(prompt) == theirs(prompt)
    assert ours("")[0]["generated_text"]


def test_quantization_config_dict_keys_are_checked(tiny):
    with pytest.raises(ValueError, match="unknown quantization_config key\\(s\\) 'bnb_4bit_quant_typ'"):
        AutoModelForCausalLM.from_pretrained(tiny, quantization_config={"load_in_4bit": True,
                                                                        "bnb_4bit_quant_typ": "nf4"})
    with pytest.raises(ValueError, match="quant_method='gptq' is not supported"):
        AutoModelForCausalLM.from_pretrained(tiny, quantization_config={"load_in_8bit": True, "quant_method": "gptq",
                                                                        "bits": 3})
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config={
        "quant_method": "bitsandbytes", "_load_in_8bit": True, "llm_int8_has_fp16_weight": False})
    assert type(model.lm_head).__name__ == "QuantizedLinear"


def test_bitsandbytes_settings_moelm_does_not_apply_are_named(capsys):
    """Without bitsandbytes (or off CUDA) a BitsAndBytesConfig gets moelm's int4 / int8; the note names each setting
    that is not applied (those at their defaults, or for the other bits, are not named)."""
    spec = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16,
            "bnb_4bit_use_double_quant": True, "llm_int8_threshold": 3.0, "bnb_4bit_quant_storage": "uint8"}
    assert resolve(quantization_config=spec, device="cpu").mode == "int4"
    err = capsys.readouterr().err
    assert "moelm int4 weights" in err and "not applied: bnb_4bit_quant_type='nf4', " \
        "bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True" in err
    assert "llm_int8_threshold" not in err and "quant_storage" not in err
    assert resolve(quantization_config={"load_in_8bit": True, "llm_int8_threshold": 3.0}).mode == "int8"
    assert "not applied: llm_int8_threshold=3.0" in capsys.readouterr().err
    resolve(quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert "not applied" not in capsys.readouterr().err


def test_loading_info_and_mismatched_sizes_as_transformers(tiny, tmp_path):
    """output_loading_info=True gives transformers' dict (the other head's tensors unexpected, a new head missing);
    ignore_mismatched_sizes=True starts a classifier of another num_labels from random weights (reported as
    mismatched), without it the error says so; use_safetensors=False is refused."""
    import transformers

    import moelm

    phimoe = new_checkpoint("phimoe-tiny", tmp_path / "p", seed=0)
    cases = [(phimoe, "AutoModelForCausalLM"), (phimoe, "AutoModelForSequenceClassification"), (phimoe, "AutoModel"),
             (tiny, "AutoModel")]
    for path, cls in cases:
        _, ours = getattr(moelm, cls).from_pretrained(path, output_loading_info=True)
        _, theirs = getattr(transformers, cls).from_pretrained(path, output_loading_info=True)
        assert ours == theirs, (path.name, cls, ours, theirs)
    three = tmp_path / "three"
    transformers.AutoModelForSequenceClassification.from_pretrained(phimoe, num_labels=3).save_pretrained(three)
    with pytest.raises(CheckpointError, match=r"score.weight: checkpoint \[3, 64\] vs model \[5, 64\].*"
                                              "ignore_mismatched_sizes=True"):
        moelm.AutoModelForSequenceClassification.from_pretrained(three, num_labels=5)
    kw = dict(num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    ours, info = moelm.AutoModelForSequenceClassification.from_pretrained(three, **kw)
    theirs, expected = transformers.AutoModelForSequenceClassification.from_pretrained(three, **kw)
    assert info == expected and ours.score.weight.shape == (5, 64)
    assert 0.01 < ours.score.weight.std() < 0.03  # normal(0, initializer_range), not the empty tensor's bytes
    with torch.no_grad():
        ours.score.weight.copy_(theirs.score.weight)  # the rest was read from the checkpoint
        ids = torch.tensor([[3, 1, 4, 1, 5]])
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="use_safetensors=False"):
        AutoModelForCausalLM.from_pretrained(tiny, use_safetensors=False)
    AutoModelForCausalLM.from_pretrained(tiny, use_safetensors=True)


def test_device_map_dict_with_gpu_indices_and_bad_dtypes_name_the_fault(tiny):
    """{"": 0} is GPU 0, as accelerate's maps write it (here: no such GPU, not 'not a device'); a dtype per submodule
    or a dtype that is not floating point is one error naming it."""
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device_map='cuda:0': no such CUDA device here"):
            place({"": 0})
    else:
        assert place({"model": 0, "lm_head": "cuda:0"}) == torch.device("cuda:0")
    with pytest.raises(NotImplementedError, match="dtype=.*a dtype per submodule"):
        AutoModelForCausalLM.from_pretrained(tiny, dtype={"": torch.bfloat16})
    with pytest.raises(ValueError, match="dtype=torch.int8: the model's weights need a floating-point dtype"):
        AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.int8)


def test_a_checkpoint_that_does_not_fit_the_overridden_config_names_the_override(tiny):
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*from_pretrained\(num_hidden_layers=1\) changed "
                                              "config.json's config"):
        AutoModelForCausalLM.from_pretrained(tiny, num_hidden_layers=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_one_error(tiny):
    """device="cuda" / device=0 (from_pretrained, from_config, pipeline) where there is no GPU: a ValueError naming
    it, as device_map= gives (they were torch's 'Torch not compiled with CUDA enabled' AssertionError)."""
    calls = [lambda: AutoModelForCausalLM.from_pretrained(tiny, device="cuda"),
             lambda: AutoModelForCausalLM.from_pretrained(tiny, device=0),
             lambda: AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny), device="cuda:1"),
             lambda: pipeline("text-generation", model=str(tiny), device=0)]
    for call in calls:
        with pytest.raises(ValueError, match=r"device='cuda(:\d)?': no such CUDA device here \(0 GPUs\)"):
            call()
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        AutoModelForCausalLM.from_pretrained(tiny, device="gpu")


def test_output_switches_as_from_pretrained_arguments(tiny, tmp_path):
    """from_pretrained(path, output_hidden_states=True, output_attentions=True) as transformers: the config's
    switches (saved in config.json), so a plain forward returns hidden states and attentions equal to transformers'."""
    transformers = pytest.importorskip("transformers")
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    ours = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager", **kwargs)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager", **kwargs)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        a, b = ours(ids), ref(ids)
    assert len(a.hidden_states) == len(b.hidden_states) and len(a.attentions) == len(b.attentions)
    for x, y in zip(a.hidden_states + a.attentions, b.hidden_states + b.attentions):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    ours.save_pretrained(tmp_path / "saved")
    assert AutoConfig.from_pretrained(tmp_path / "saved").output_hidden_states is True


def test_generation_settings_of_config_json_without_generation_config(tiny, tmp_path):
    """A checkpoint whose config.json carries generation settings and has no generation_config.json: the model's
    generation config takes them, as transformers' from_model_config (they were ignored)."""
    import json

    transformers = pytest.importorskip("transformers")
    path = tmp_path / "m"
    shutil.copytree(tiny, path)
    (path / "generation_config.json").unlink(missing_ok=True)
    data = json.loads((path / "config.json").read_text())
    data.update(temperature=0.3, top_k=7, top_p=0.9, do_sample=True, max_length=50, repetition_penalty=1.2)
    (path / "config.json").write_text(json.dumps(data))
    ours = AutoModelForCausalLM.from_pretrained(path).generation_config
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).generation_config
    for key in ("temperature", "top_k", "top_p", "do_sample", "max_length", "repetition_penalty", "eos_token_id",
                "bos_token_id", "pad_token_id"):
        assert getattr(ours, key) == getattr(ref, key), key
