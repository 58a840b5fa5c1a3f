"""Usage-aware mixed-bit experts: quantization={"experts": "int4", "hot_experts": "int8", "report": DIR,
"hot_fraction": f} stores each MoE layer's most-used routed experts (from an expert report) and the shared experts
in int8, the other routed experts in int4; logits are those of the float model with each weight quantized in its
chosen mode; a report of another model, unknown keys and a hot_fraction outside (0, 1] are errors."""
from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

import moelm
from moelm.inference import cpu, decode, kernels
from moelm.inference.mixed import MixedExperts
from moelm.inference.quantization import QuantizedExperts, dequantize, quantize
from moelm.inference.quantize import resolve
from moelm.nn.moe import Experts
from reference import randomise
from test_fast import kernels_forced as forced

# family -> (named config, {MoE decoder layer: its hot experts at hot_fraction 0.25}, tokens per expert)
CASES = {"ernie4_5_moe": ("ernie4_5_moe-tiny", {1: [0, 5], 2: [2, 6]}, 8),
         "phimoe": ("phimoe-tiny", {0: [2], 1: [1]}, 4)}
IDS = torch.tensor([[1, 5, 9, 2, 77, 3, 300, 41, 8, 200, 17, 9], [4, 4, 100, 8, 0, 12, 55, 61, 499, 7, 3, 250]])
SPEC = {"experts": "int4", "hot_experts": "int8", "hot_fraction": 0.25}
BOUND = 1e-5  # fp32 logits of the same dequantized weights, summed in another order
_TMP = tempfile.TemporaryDirectory(prefix="moelm-mixed-")


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    """PyTorch's ops for the quantized layers (dequantize + matmul), so logits are those of the dequantized weights
    (the gemv kernels round activations to int16 per group)."""
    monkeypatch.setenv("MOELM_KERNELS", "torch")
    cpu.reset()
    yield
    cpu.reset()


@functools.cache
def checkpoint(family: str) -> Path:
    model = moelm.AutoModelForCausalLM.from_config(moelm.named_config(CASES[family][0]), seed=0, fast=False)
    randomise(model, seed=1)
    path = Path(_TMP.name) / family
    model.save_pretrained(path)
    return path


def write_report(path: Path, model_type: str | None, tokens: dict[int, list[int]]) -> Path:
    """A report.json as `moelm experts` writes it (the fields read here, and a few others)."""
    path.mkdir(parents=True, exist_ok=True)
    layers = [{"layer": layer, "num_experts": len(t), "top_k": 2, "tokens": t, "cv": 0.5} for layer, t in
              tokens.items()]
    data = {"schema": "moelm.experts/1", "model_type": model_type, "layers": layers}
    (path / "report.json").write_text(json.dumps(data))
    return path


def report(tmp_path: Path, family: str) -> Path:
    """The hot experts of CASES get the most tokens (the others fewer, one tie)."""
    _, hot, e = CASES[family]
    tokens = {layer: [50 + 10 * i if i in ids else (i % 3) for i in range(e)] for layer, ids in hot.items()}
    return write_report(tmp_path / "report", family, tokens)


def mixed(family: str, tmp_path: Path, **kwargs):
    return moelm.AutoModelForCausalLM.from_pretrained(checkpoint(family), quantization={
        **SPEC, "report": str(report(tmp_path, family))}, **kwargs)


def int4_group(h: int, i: int) -> int:
    return 64 if h % 64 == 0 and i % 64 == 0 else 32


def roundtrip(w: torch.Tensor, mode: str, group: int) -> torch.Tensor:
    return dequantize(*quantize(w, mode, group), group)


@torch.no_grad()
def reference(family: str):
    """The float model with every Linear (shared experts and the tied LM head included) through int8, and each
    routed expert through int8 (hot) or int4 (the others)."""
    ref = moelm.AutoModelForCausalLM.from_pretrained(checkpoint(family), fast=False)
    hot = CASES[family][1]
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(roundtrip(m.weight, "int8", 0))  # unties the LM head from the embedding
        elif isinstance(m, Experts):
            layer = int(name.split(".")[2])
            h, i = m.down_proj.shape[1:]
            for e in range(m.num_experts):
                mode, group = ("int8", 0) if e in hot[layer] else ("int4", int4_group(h, i))
                m.gate_up_proj[e] = roundtrip(m.gate_up_proj[e], mode, group)
                m.down_proj[e] = roundtrip(m.down_proj[e], mode, group)
    return ref


def routed(model, ids) -> dict[int, set[int]]:
    """MoE layer -> the experts the model's routers chose for ids."""
    seen, hooks = {}, []
    for layer, block in enumerate(model.model.layers):
        experts = getattr(getattr(block, block.mlp_name), "experts", None)
        if experts is not None:
            hooks.append(experts.register_forward_hook(
                lambda m, args, out, layer=layer: seen.setdefault(layer, set()).update(args[1].reshape(-1).tolist())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", CASES)
def test_hot_experts_int8_the_others_int4(family, tmp_path):
    model = mixed(family, tmp_path)
    float_model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint(family), fast=False)
    _, hot, e = CASES[family]
    for layer, ids in hot.items():
        block = getattr(model.model.layers[layer], model.model.layers[layer].mlp_name)
        experts, want = block.experts, getattr(float_model.model.layers[layer], model.model.layers[layer].mlp_name)
        assert isinstance(experts, MixedExperts) and experts.hot_ids == tuple(ids)
        cold = [i for i in range(e) if i not in ids]
        assert (experts.hot.num_experts, experts.cold.num_experts) == (len(ids), len(cold))
        for stack, chosen, mode in ((experts.hot, ids, "int8"), (experts.cold, cold, "int4")):
            assert stack.mode == mode
            assert stack.gate_up.qweight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
            for name in ("gate_up_proj", "down_proj"):
                q, s = stack.stacked(name)
                w = getattr(want.experts, name)[chosen]
                wq, ws = quantize(w, mode, stack.group_size)
                assert torch.equal(q, wq) and torch.equal(s.float(), ws.float()), (layer, mode, name)
        shared = getattr(block, "shared_experts", None)
        if shared is not None:  # hot: int8
            assert {p.mode for p in (shared.gate_proj, shared.up_proj, shared.down_proj)} == {"int8"}
    assert model.model.layers[0].self_attn.q_proj.mode == "int8" and model.lm_head.mode == "int8"
    from moelm.bench.runner import bytes_per_token

    before = bytes_per_token(model, model.config)["bytes_per_token"]
    for m in model.modules():  # each layer's two stacks count as k of its E experts, not k of each stack's
        if isinstance(m, MixedExperts):
            m.hot.num_experts = m.cold.num_experts = 1
    assert bytes_per_token(model, model.config)["bytes_per_token"] == before


@pytest.mark.parametrize("family", CASES)
def test_logits_of_each_expert_quantized_in_its_mode(family, tmp_path):
    model = mixed(family, tmp_path)
    chosen = routed(model, IDS)
    for layer, ids in CASES[family][1].items():  # hot and cold experts both take part
        assert chosen[layer] & set(ids) and chosen[layer] - set(ids), (layer, chosen[layer])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(family)(IDS).logits, atol=BOUND, rtol=0)


@pytest.mark.skipif(not kernels.available(), reason="csrc kernels not available")
@pytest.mark.parametrize("family", CASES)
def test_kernels_decline_the_mixed_block_and_agree(family, tmp_path):
    """The C MoE block reads one mode per block: it declines a mixed one (each stack then runs its own gemv
    kernels), and takes a uniform one."""
    model = mixed(family, tmp_path)
    uniform = moelm.AutoModelForCausalLM.from_pretrained(checkpoint(family), quantization="int4")
    layer = next(iter(CASES[family][1]))
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        block = getattr(model.model.layers[layer], model.model.layers[layer].mlp_name)
        assert decode._moe_plan(block, x) is None
        assert decode._moe_plan(getattr(uniform.model.layers[layer], uniform.model.layers[layer].mlp_name),
                                x) is not None
        want = model(IDS).logits
        with forced("gemv"):
            got = model(IDS).logits
            steps = model.generate(IDS[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert steps.shape == (1, 7)


def test_hot_fraction_one_and_experts_alone(tmp_path):
    """hot_fraction 1: every routed expert hot, one int8 QuantizedExperts per block; "experts" alone: routed experts
    int4, the rest int8, saved and read back as they were."""
    every = moelm.AutoModelForCausalLM.from_pretrained(checkpoint("phimoe"), quantization={
        **SPEC, "hot_fraction": 1, "report": str(report(tmp_path, "phimoe"))}, fast=False)
    experts = every.model.layers[0].block_sparse_moe.experts
    assert type(experts) is QuantizedExperts and experts.mode == "int8"
    model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint("ernie4_5_moe"), quantization={"experts": "int4"})
    block = model.model.layers[1].mlp
    assert block.experts.mode == "int4" and block.shared_experts.down_proj.mode == "int8"
    model.save_pretrained(tmp_path / "q")
    again = moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.model.layers[1].mlp.experts.mode == "int4"
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_save_is_refused(tmp_path):
    model = mixed("ernie4_5_moe", tmp_path, fast=False)
    with pytest.raises(NotImplementedError, match="two modes"):
        model.save_pretrained(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors")) and not (tmp_path / "out" / "config.json").exists()
    from moelm.loading.quantized import quantize_checkpoint
    from moelm.models.auto import AutoModelForCausalLM

    config = resolve({"experts": "int4", "hot_experts": "int8", "report": str(report(tmp_path, "ernie4_5_moe"))})
    with pytest.raises(ValueError, match="two modes in one layer"):
        quantize_checkpoint(AutoModelForCausalLM.class_for, checkpoint("ernie4_5_moe"), tmp_path / "q", config)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("tokens,model_type,match", [
    ({0: [1] * 4, 1: [1] * 4}, "phimoe", "is of a phimoe model, not ernie4_5_moe"),
    ({0: [1] * 8, 1: [1] * 8}, None, r"covers MoE layers \[0, 1\], but this model's MoE layers are \[1, 2\]"),
    ({1: [1] * 8}, "ernie4_5_moe", r"covers MoE layers \[1\]"),
    ({1: [1] * 8, 2: [1] * 6}, "ernie4_5_moe", "layer 2 has 6 experts, this model's has 8"),
])
def test_report_of_another_model(tmp_path, tokens, model_type, match):
    path = write_report(tmp_path / "r", model_type, tokens)
    with pytest.raises(ValueError, match=match) as info:
        moelm.AutoModelForCausalLM.from_pretrained(checkpoint("ernie4_5_moe"), quantization={
            **SPEC, "report": str(path)})
    assert str(path / "report.json") in str(info.value)


def test_report_file_checked(tmp_path):
    spec = {**SPEC, "report": str(tmp_path / "missing")}
    with pytest.raises(FileNotFoundError, match="missing"):
        moelm.AutoModelForCausalLM.from_pretrained(checkpoint("phimoe"), quantization=spec)
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other", "layers": []}))
    with pytest.raises(ValueError, match="not an expert report"):
        moelm.AutoModelForCausalLM.from_pretrained(checkpoint("phimoe"), quantization={
            **SPEC, "report": str(tmp_path / "bad.json")})


@pytest.mark.parametrize("spec,error,match", [
    ({"experts": "int4", "hot_experts": "int8", "report": "r", "hot_fractoin": 0.2}, ValueError, "'hot_fractoin'"),
    ({"experts": "int4", "load_in_4bit": True}, ValueError, "'load_in_4bit'"),
    ({"experts": "int3"}, ValueError, "experts must be one of int8, int4, got 'int3'"),
    ({"hot_experts": "int8", "experts": "int4"}, ValueError, "hot_experts needs report"),
    ({"experts": "int4", "report": "r"}, ValueError, "report is given without hot_experts"),
    *[({**SPEC, "report": "r", "hot_fraction": f}, ValueError, r"hot_fraction must be in \(0, 1\]")
      for f in (0, -0.5, 1.5, math.nan, True)],
])
def test_spec_errors(spec, error, match):
    with pytest.raises(error, match=match):
        resolve(spec)


def test_bitsandbytes_dict_still_read():
    config = resolve({"load_in_4bit": True, "quant_method": "bitsandbytes"})
    assert config.mode == "int4" and config.experts is None
    assert resolve({**SPEC, "report": "r"}).hot_fraction == 0.25
    assert resolve({"experts": "int4", "hot_experts": "int8", "report": "r"}).hot_fraction == 0.2


def test_refused_where_not_implemented(tmp_path):
    with pytest.raises(NotImplementedError, match="GGUF"):
        moelm.PhimoeForCausalLM.from_pretrained(tmp_path, gguf_file="x.gguf", quantization={"experts": "int4"})
    stored = moelm.AutoModelForCausalLM.from_pretrained(checkpoint("phimoe"), quantization="int8", fast=False)
    stored.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="stored quantized"):
        moelm.AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization={
            **SPEC, "report": str(report(tmp_path, "phimoe"))})
