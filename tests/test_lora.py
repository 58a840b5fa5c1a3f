"""Native LoRA (moelm.train.lora) in fp32 on tiny models with every weight randomised: adapters on Linears and
per expert on the stacked experts, against a per-expert loop, peft 0.21 on the transformers 5 models, merging,
saving and loading, int8/int4 bases (QLoRA), expert parallelism on two gloo ranks, and the errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moelm
from moelm.config import named_config
from moelm.inference.quantization import QuantizedExperts, QuantizedLinear, dequantize
from moelm.nn.moe import Experts
from moelm.parallel.config import DistributedConfig
from moelm.train.lora import (
    LoraConfig,
    apply_lora,
    is_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from reference import assert_close, randomise

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.utils.logging.set_verbosity_error()

from test_fast import kernels_forced  # noqa: E402
from test_parity import build, tokens  # noqa: E402  (the reference checkpoints, saved by transformers)

FAMILIES = ("ernie4_5", "ernie4_5_moe", "phimoe")
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def config_for(family: str, **kwargs) -> LoraConfig:
    """Every Linear of the decoder and, on MoE families, both expert projections."""
    if family == "phimoe":  # its MLP is the experts only: gate/up/down_proj name nothing
        kwargs.setdefault("target_modules", "all-linear")
    kwargs.setdefault("target_modules", LINEARS)
    if family != "ernie4_5":
        kwargs.setdefault("target_parameters", EXPERTS)
    return LoraConfig(r=4, **kwargs)


@pytest.fixture(scope="module")
def paths() -> dict[str, Path]:
    return {family: build(family)[2] for family in FAMILIES}


def ours(path, **kwargs):
    return moelm.AutoModelForCausalLM.from_pretrained(path, fast=kwargs.pop("fast", False), **kwargs).eval()


def theirs(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()


def tiny(family: str):
    model = moelm.AutoModelForCausalLM.from_config(named_config(f"{family}-tiny"), seed=0, fast=False)
    return randomise(model).eval()


@torch.no_grad()
def randomise_adapters(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    for p in lora_parameters(model):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------ forward and gradients

@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_leaves_the_model_unchanged(family):
    model = tiny(family)
    ids = tokens()
    before = logits(model, ids)
    apply_lora(model, config_for(family))
    assert torch.equal(logits(model, ids), before)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    assert all(p.requires_grad for p in lora_parameters(model))
    randomise_adapters(model)
    assert (logits(model, ids) - before).abs().max() > 1e-2, "the adapters change nothing"


def test_same_seed_same_adapters():
    a, b = tiny("ernie4_5_moe"), tiny("ernie4_5_moe")
    for model in (a, b):
        torch.manual_seed(7)
        apply_lora(model, config_for("ernie4_5_moe"))
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(a), lora_parameters(b)))
    experts = a.model.layers[1].mlp.experts
    assert experts.lora_A["gate_up_proj"].shape == (experts.num_experts, 4, a.config.hidden_size)
    bound = 1 / a.config.hidden_size**0.5  # kaiming-uniform(a=sqrt(5)) over the inputs, as nn.Linear / peft
    assert 0.5 * bound < experts.lora_A["gate_up_proj"].abs().max() <= bound
    assert not experts.lora_B["gate_up_proj"].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_adapters_get_gradients(family):
    model = tiny(family)
    apply_lora(model, config_for(family, use_rslora=True))
    randomise_adapters(model)
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_expert_gradients_match_a_loop_over_experts():
    torch.manual_seed(0)
    e, h, inter, t, k, r = 5, 32, 24, 13, 2, 3
    holder = nn.Module()
    holder.experts = Experts(e, h, inter)
    nn.init.normal_(holder.experts.gate_up_proj, std=0.2)
    nn.init.normal_(holder.experts.down_proj, std=0.2)
    apply_lora(holder, LoraConfig(r=r, lora_alpha=6, target_parameters=EXPERTS, init_lora_weights=False))
    experts = holder.experts
    x = torch.randn(t, h, requires_grad=True)
    index = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    index[:, 0] = torch.where(index[:, 0] == 4, 3, index[:, 0])  # expert 4 gets few rows; some none at all
    weights = torch.rand(t, k, requires_grad=True)
    out = experts(x, index, weights)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    # the oracle: each (token, choice) pair through its own expert, LoRA written out
    leaves = {n: p.detach().clone().requires_grad_() for n, p in experts.named_parameters()}
    x2, w2 = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    scale = 6 / r
    want = torch.zeros(t, h)
    for i in range(t):
        for j in range(k):
            ex = int(index[i, j])

            def proj(name, v):
                a, b = leaves[f"lora_A.{name}"][ex], leaves[f"lora_B.{name}"][ex]
                return v @ leaves[name][ex].T + scale * (v @ a.T) @ b.T

            gate, up = proj("gate_up_proj", x2[i]).chunk(2)
            want = want.index_add(0, torch.tensor([i]), (w2[i, j] * proj("down_proj", F.silu(gate) * up))[None])
    want.backward(grad_out)
    assert_close(out, want, atol=1e-5, msg="output")
    assert_close(x.grad, x2.grad, atol=1e-5, msg="x grad")
    assert_close(weights.grad, w2.grad, atol=1e-5, msg="weights grad")
    for name, p in experts.named_parameters():
        if "lora_" in name:
            assert_close(p.grad, leaves[name].grad, atol=1e-5, msg=f"{name} grad")
        else:
            assert p.grad is None, name


def test_fast_model_applies_the_adapters(paths):
    """from_pretrained's inference fast paths (fused q/k/v and gate/up, experts one at a time) step aside where
    adapters are."""
    path = paths["ernie4_5_moe"]
    plain, fast = ours(path), ours(path, fast=True)
    for model in (plain, fast):
        apply_lora(model, config_for("ernie4_5_moe"))
        randomise_adapters(model)
    ids = tokens()
    assert_close(logits(fast, ids), logits(plain, ids), atol=1e-5, msg="fast model with adapters")
    assert_close(logits(fast, ids[:, :1]), logits(plain, ids[:, :1]), atol=1e-5, msg="one token")
    greedy = [m.generate(ids, max_new_tokens=6, do_sample=False) for m in (fast, plain)]  # the decoding kernels
    assert torch.equal(*greedy)


# ------------------------------------------------------------------ peft

@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_adapter(family, paths, tmp_path):
    model = ours(paths[family])
    config = config_for(family, lora_alpha=8, use_rslora=family == "phimoe")
    apply_lora(model, config)
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", config, base_model_name_or_path=str(paths[family]))
    ref = theirs(paths[family])
    ids = tokens()
    base = logits(ref, ids)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    loaded = peft.get_peft_model_state_dict(peft_model)
    saved = lora_state_dict(model)
    assert sorted(loaded) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    got = logits(peft_model, ids)
    assert (got - base).abs().max() > 1e-2, "the adapter changes nothing in peft"
    assert_close(logits(model, ids), got, msg=f"{family} logits, moelm vs peft")


@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_written_by_peft(family, paths, tmp_path):
    ref = theirs(paths[family])
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    if family != "ernie4_5":
        settings["target_parameters"] = EXPERTS
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(init_lora_weights=False, **settings))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = ours(paths[family])
    config = load_adapter(model, tmp_path / "adapter")
    assert (config.r, config.lora_alpha) == (4, 8)
    assert sorted(config.target_parameters or []) == sorted(settings.get("target_parameters", []))
    ids = tokens()
    assert_close(logits(model, ids), logits(peft_model.eval(), ids), msg=f"{family} logits, peft's adapter")


@pytest.mark.parametrize("family", ["ernie4_5", "phimoe"])
def test_load_peft_adapter_on_the_lm_head(family, paths, tmp_path):
    """peft saves an adapted lm_head's base weights too (as an embedding layer's, base_layer.weight); moelm loads
    them as peft does."""
    from safetensors.torch import load_file

    peft_model = peft.get_peft_model(theirs(paths[family]), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    model = ours(paths[family])
    load_adapter(model, tmp_path / "adapter")
    ids = tokens()
    assert_close(logits(model, ids), logits(peft_model.eval(), ids), msg=f"{family} logits, peft's lm_head adapter")


def test_peft_layout_of_expert_adapters():
    """ParamWrapper's: lora_A [E*r, in] expert-slowest, lora_B [out, r*E] expert-fastest; the first registered
    parameter (gate_up_proj) under the inner wrapper (base_layer)."""
    model = tiny("ernie4_5_moe")
    apply_lora(model, config_for("ernie4_5_moe", target_modules=None))
    randomise_adapters(model)
    experts = model.model.layers[1].mlp.experts
    state = lora_state_dict(model)
    key = "base_model.model.model.layers.1.mlp.experts."
    e, r = experts.num_experts, 4
    a, b = state[key + "base_layer.lora_A.weight"], state[key + "base_layer.lora_B.weight"]
    for ex in (0, e - 1):
        assert torch.equal(a[ex * r:(ex + 1) * r], experts.lora_A["gate_up_proj"][ex])
        assert torch.equal(b[:, ex::e], experts.lora_B["gate_up_proj"][ex])
    assert torch.equal(state[key + "lora_A.weight"], experts.lora_A["down_proj"].reshape(e * r, -1))


# ------------------------------------------------------------------ merging, saving, loading

@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_the_adapters(family, tmp_path):
    model = tiny(family)
    apply_lora(model, config_for(family))
    randomise_adapters(model)
    ids = tokens()
    want = logits(model, ids)
    merge_lora(model)
    assert not is_lora(model) and not any("lora" in n for n in model.state_dict())
    assert {type(m).__name__ for m in model.modules()} >= {"Linear"}
    assert not any(type(m).__name__.startswith("Lora") for m in model.modules())
    assert_close(logits(model, ids), want, msg="merged")
    model.save_pretrained(tmp_path / "merged")
    assert_close(logits(ours(tmp_path / "merged"), ids), want, msg="merged, saved and loaded")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_adapter(family, tmp_path):
    model = tiny(family)
    config = config_for(family, lora_alpha=32)
    apply_lora(model, config)
    randomise_adapters(model)
    ids = tokens()
    save_adapter(model, tmp_path / "a", config)
    save_adapter(model, tmp_path / "a", config)  # over an existing one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    fresh = tiny(family)
    loaded = load_adapter(fresh, tmp_path / "a")
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora) == (4, 32, False)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_load_adapter_errors(tmp_path):
    model = tiny("ernie4_5")
    config = config_for("ernie4_5", target_modules=["q_proj"])
    apply_lora(model, config)
    save_adapter(model, tmp_path / "a", config)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=re.escape(key)):
        load_adapter(tiny("ernie4_5"), tmp_path / "a")
    save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(tiny("ernie4_5"), tmp_path / "a")
    settings = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(settings, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(tiny("ernie4_5"), tmp_path / "a")


# ------------------------------------------------------------------ int8 / int4 bases (QLoRA)

def dequantized_twin(path, quantized):
    """The fp32 model whose weights are `quantized`'s, dequantized."""
    twin = ours(path)
    twin.lm_head.weight = nn.Parameter(twin.lm_head.weight.detach().clone())  # a tied head's: not the embedding's
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, QuantizedExperts):
                for p in ("gate_up_proj", "down_proj"):
                    q, s = m.stacked(p)
                    getattr(twin.get_submodule(name), p).copy_(dequantize(q, s, m.group_size))
            elif isinstance(m, QuantizedLinear) and not name.endswith((".gate_up", ".down")):
                twin.get_submodule(name).weight.copy_(dequantize(m.qweight, m.scale, m.group_size))
    return twin


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora(mode, paths):
    path = paths["ernie4_5_moe"]
    model = ours(path, quantization=mode, fast=True)
    ids = tokens()
    # PyTorch's products on the dequantized weights, as the adapters compute them, on both sides of each comparison:
    # where the gemv kernel is measured faster (the AMD Zen 5) it rounds activations to int16 per group, and the
    # integer prefill paths round them to int8 per block (bounded in test_fast and test_intgemm, not here)
    with kernels_forced("torch"):
        base = logits(model, ids)
        apply_lora(model, config_for("ernie4_5_moe"))
        assert_close(logits(model, ids), base, msg="zero B")
    twin = dequantized_twin(path, model)
    apply_lora(twin, config_for("ernie4_5_moe"))
    for m in (model, twin):
        randomise_adapters(m)
        m(input_ids=ids, labels=ids).loss.backward()
    with kernels_forced("torch"):
        assert_close(logits(model, ids), logits(twin, ids), msg="adapters on the quantized model")
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if ".lora_" in name:  # those of layer 0 pass through the int8/int4 experts and lm_head
            assert_close(p.grad, grads[name].grad, msg=f"{name} grad")
        else:
            assert p.grad is None, name
    with pytest.raises(ValueError, match="unquantized"):
        merge_lora(model)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=["q_proj", "nope"]), "'nope' matches no module"),
    (dict(target_modules=["experts"]), "target_parameters"),
    (dict(target_modules=["input_layernorm"]), "not a Linear"),
    (dict(target_modules=None, target_parameters=["experts.up_proj"]), "'experts.up_proj' matches no parameter"),
    (dict(target_modules=None, target_parameters=["input_layernorm.weight"]), "input_layernorm.weight"),
])
def test_targets_that_cannot_be_adapted(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_lora(tiny("ernie4_5_moe"), LoraConfig(**kwargs))


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=["q_proj"], bias="all"), "bias='all'"),
    (dict(target_modules=["q_proj"], r=0), "r must be"),
    (dict(target_modules=["q_proj"], init_lora_weights="gaussian"), "init_lora_weights='gaussian'"),
    (dict(target_modules=["q_proj"], lora_dropout=1.0), "lora_dropout"),
    (dict(), "target_modules or target_parameters"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("option", [{"layers_to_transform": 0}, {"layers_to_transform": [1]},
                                    {"modules_to_save": ["lm_head"]}, {"lora_bias": True}])
def test_peft_options_moelm_lacks_are_refused_by_name(option):
    """0 is a value, not an option turned off: layers_to_transform=0 adapts layer 0 only."""
    (key, value), = option.items()
    settings = dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=None,
                    rank_pattern={}, use_dora=False)
    with pytest.raises(ValueError, match=re.escape(key)):
        LoraConfig.from_peft({**settings, key: value})


def test_applied_twice_is_an_error():
    model = apply_lora(tiny("ernie4_5"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoraConfig(target_modules=["k_proj"]))


@pytest.mark.parametrize("config", [LoraConfig(target_modules=["q_proj"], lora_dropout=0.5),
                                    LoraConfig(target_parameters=EXPERTS, lora_dropout=0.5)])
def test_dropout(config, tmp_path):
    model = apply_lora(tiny("ernie4_5_moe"), config)
    randomise_adapters(model)
    ids = tokens()
    want = logits(model, ids)
    model.train()
    a, b = logits(model, ids), logits(model, ids)
    assert not torch.equal(a, b) and not torch.equal(a, want)
    model.eval()
    assert torch.equal(logits(model, ids), want)
    if config.target_parameters:  # peft's ParamWrapper refuses dropout
        with pytest.warns(UserWarning, match="lora_dropout=0"):
            save_adapter(model, tmp_path / "a", config)


# ------------------------------------------------------------------ expert parallelism (two gloo ranks)

def test_expert_parallel_matches_one_process(paths, tmp_path, monkeypatch):
    """ExpertsEP (ep 2): each rank's adapters are its slice of one process's (same seed), and logits, gradients,
    the gathered state dict and save/load agree with one process."""
    from test_parallel import launch, reports

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    moe = {f: str(paths[f]) for f in ("ernie4_5_moe", "phimoe")}
    launch(ep_worker, 2, moe, str(tmp_path))
    for rank, found in enumerate(reports(tmp_path, 2)):
        assert not found["failures"], f"rank {rank}: " + "\n".join(found["failures"][:10])
        assert len(found["checked"]) == 2 * 5 + 1, found["checked"]


def ep_worker(rank: int, world: int, port: int, paths: dict[str, str], out: str) -> None:
    from test_parallel import Report, join_world, leave_world

    join_world(rank, world, port)
    report = Report()
    for family, path in paths.items():
        check_expert_parallel(family, path, rank, Path(out), report)
    tensor_parallel = moelm.AutoModelForCausalLM.from_pretrained(
        paths["ernie4_5_moe"], fast=False, distributed_config=DistributedConfig(tp_size=2))
    for config, message in ((LoraConfig(target_parameters=EXPERTS), "ExpertsTP"),
                            (LoraConfig(target_modules=["q_proj"]), "tensor-parallel (DTensor) Linear")):
        try:
            apply_lora(tensor_parallel, config)
            report.true("tp error", False, f"{config} applied")
        except NotImplementedError as e:
            report.true("tp error", message in str(e), str(e))
    report.done("tp error")
    report.write(out, rank)
    leave_world()


def check_expert_parallel(family: str, path: str, rank: int, out: Path, report) -> None:
    import torch.distributed as dist

    def sharded():
        return moelm.AutoModelForCausalLM.from_pretrained(
            path, fast=False, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2)).eval()

    def grads(model, ids):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    config = config_for(family, init_lora_weights=False)
    one, model = ours(path), sharded()
    for m in (one, model):
        torch.manual_seed(0)
        apply_lora(m, config)
    whole = dict(one.named_parameters())

    def mine(name, t):  # this rank's slice of an expert adapter, the whole of another
        local = dict(model.named_parameters())[name].shape[0]
        return t[rank * local:(rank + 1) * local] if ".experts." in name else t

    for name, p in model.named_parameters():
        if ".lora_" in name:
            report.close(f"{family}/init {name}", p, mine(name, whole[name]), atol=0, rtol=0)
    report.done(f"{family}/init")

    batches = [tokens(seed=10 + b) for b in (0, 1)]  # each rank its own; the experts see both
    report.close(f"{family}/logits", logits(model, batches[rank]), logits(one, batches[rank]))
    report.done(f"{family}/logits")

    expected = [grads(one, ids) for ids in batches]
    got = grads(model, batches[rank])
    report.true(f"{family}/grads", sorted(got) == sorted(n for n in whole if ".lora_" in n), str(sorted(got)))
    for name, g in got.items():
        want = mine(name, expected[0][name] + expected[1][name]) if ".experts." in name else expected[rank][name]
        report.close(f"{family}/grads {name}", g, want)
    report.done(f"{family}/grads")

    state, want = lora_state_dict(model), lora_state_dict(one)
    report.true(f"{family}/state_dict", sorted(state) == sorted(want), "keys")
    for key in want:
        report.close(f"{family}/state_dict {key}", state[key], want[key], atol=0, rtol=0)
    report.done(f"{family}/state_dict")

    save_adapter(model, out / f"adapter-{family}", config)
    dist.barrier()
    fresh = sharded()
    load_adapter(fresh, out / f"adapter-{family}")
    report.close(f"{family}/load_adapter", logits(fresh, batches[rank]), logits(one, batches[rank]))
    report.done(f"{family}/load_adapter")


def test_an_adapter_of_the_mtp_head_loads_onto_a_fresh_model(tmp_path):
    """A fine-tune that trains the MTP loss adapts the MTP block's Linears too (model.mtp is built before LoRA).
    from_pretrained leaves the head to its first use; load_adapter, read_adapter (the server's) and a resume build
    it when the adapter names it, and the adapted model equals the trained one, MTP logits included."""
    from moelm.serve.lora import Adapters
    from moelm.train.state import attach_lora
    from reference import randomise_scaled

    base = randomise_scaled(moelm.AutoModelForCausalLM.from_config(named_config("ernie4_5_moe-tiny"), seed=0,
                                                                   fast=False), 0, 1.0, mtp=True)
    base.save_pretrained(tmp_path / "base")
    trained = moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "base", fast=False)
    assert trained.mtp is not None
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    apply_lora(trained, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(trained):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    assert any(n.startswith("model.mtp_block.") and "lora_" in n for n, _ in trained.named_parameters())
    save_adapter(trained, tmp_path / "adapter", config)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, trained.config.vocab_size, (2, 7), generator=g)
    hidden = torch.randn(2, 7, trained.config.hidden_size, generator=g)  # the head's input, fixed

    def outputs(m):
        with torch.no_grad():
            return m(ids).logits, m.mtp.sequence_logits(ids, hidden, torch.ones_like(ids))

    want = outputs(trained)
    fresh = moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "base", fast=False)
    load_adapter(fresh, tmp_path / "adapter")
    for got, expected in zip(outputs(fresh), want):
        assert_close(got, expected, atol=1e-5)
    served = moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "base", fast=False)
    Adapters.load(served, {"a": str(tmp_path / "adapter")})
    assert served.__dict__.get("build_mtp") is None and hasattr(served.model, "mtp_block")
    resumed = moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "base", fast=False)
    section = type("Peft", (), dict(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "down_proj"],
                                    target_parameters=(), use_rslora=False))()
    attach_lora(resumed, section, tmp_path / "adapter")
    for got, expected in zip(outputs(resumed), want):
        assert_close(got, expected, atol=1e-5)
