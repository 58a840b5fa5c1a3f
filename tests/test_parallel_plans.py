"""The parallel plans as data and the per-rank memory plan: layout checks naming the numbers, per-rank bytes
against the parameters of real (tiny) models, unsharded and quantized, and `moelm info --tp/--ep`."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from moelm import AutoModelForCausalLM
from moelm.config import named_config
from moelm.models.scaffold import new_checkpoint
from moelm.parallel import EP_PLANS, TP_PLANS, check_sizes, memory_plan, plan_for
from moelm.parallel.plans import parameter_styles, rule, sharded_modules

FAMILIES = ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"]


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, fast=False)


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name", FAMILIES)
def test_every_rule_names_real_modules(name):
    """Each pattern of each plan matches a parameter (or its module) of the model: no rule is dead text."""
    config = named_config(name)
    model = meta_model(config)
    names = [n for n, _ in model.named_parameters()] + ["lm_head.weight"]
    targets = {n.rpartition(".")[0] for n in names} | set(names)
    for pattern in {**TP_PLANS[config.model_type], **EP_PLANS[config.model_type]}:
        assert any(rule({pattern: "x"}, t) for t in targets), pattern


@pytest.mark.parametrize("name", FAMILIES)
def test_unsharded_plan_is_the_models_own_bytes(name):
    model = AutoModelForCausalLM.from_config(named_config(name), seed=0)
    assert memory_plan(model, dtype=torch.float32)["weights"] == tensor_bytes(model) - sum(
        b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_plan_is_the_loaded_models_bytes(name, mode, tmp_path):
    path = new_checkpoint(name, tmp_path / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, quantization=mode, fast=False)
    plain = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "e_score_correction" in n)
    whole = meta_model(model.config)
    assert memory_plan(whole, dtype=torch.float32, quantization=mode)["weights"] == tensor_bytes(model) - plain


def test_tp_halves_what_the_plan_shards():
    config = named_config("ernie4_5-tiny")
    model = AutoModelForCausalLM.from_config(config, seed=0)
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    total = memory_plan(model, dtype=torch.float32)["weights"]
    two = memory_plan(model, tp=2, dtype=torch.float32)
    assert two["weights"] == (total - norms) // 2 + norms
    assert two["kv_per_1k"] * 2 == memory_plan(model, dtype=torch.float32)["kv_per_1k"]


def test_ep_takes_the_experts_by_id():
    config = named_config("ernie4_5_moe-tiny")
    model = meta_model(config)
    one, two = memory_plan(model, dtype=torch.float32), memory_plan(model, tp=2, ep=2, dtype=torch.float32)
    assert two["experts"] * 2 == one["experts"]
    assert plan_for(config, 2, 2)["model.layers.*.mlp.experts.down_proj"] == "grouped_gemm"
    assert plan_for(config, 2, 1)["model.layers.*.mlp.experts.down_proj"] == "rowwise"
    assert plan_for(config, 1, 1) == {}


def test_one_resolver_for_the_plan_and_what_it_shards():
    """plan_for (parallelize's and memory_plan's): a dict tp_plan in place of the family's, ep_plan's rules over the
    EP plan, unknown styles refused; sharded_modules / parameter_styles: experts by their gate_up_proj's rule, down_proj
    following it, a style that does not fit its module refused."""
    config = named_config("ernie4_5_moe-tiny")
    mine = {"model.layers.*.self_attn.q_proj": "colwise"}
    assert plan_for(config, 2, 1, tp_plan=mine) == mine and plan_for(config, 2, 1, tp_plan={}) == {}
    assert plan_for(config, 2, 1, tp_plan="auto") == plan_for(config, 2, 1) == TP_PLANS["ernie4_5_moe"]
    assert plan_for(config, 1, 2, ep_plan={"lm_head": "colwise"}) == {**EP_PLANS["ernie4_5_moe"], "lm_head": "colwise"}
    with pytest.raises(ValueError, match="unknown style 'diagonal'"):
        plan_for(config, 2, 1, tp_plan={"lm_head": "diagonal"})
    model = meta_model(config)
    styles = parameter_styles(model, plan_for(config, 2, 1))
    assert styles["model.layers.1.mlp.experts.gate_up_proj"] == "packed_colwise"
    assert styles["model.layers.1.mlp.experts.down_proj"] == "rowwise"
    assert styles["model.layers.0.self_attn.o_proj.weight"] == "rowwise" and "model.norm.weight" not in styles
    assert parameter_styles(model, plan_for(config, 2, 2))["model.layers.1.mlp.experts.down_proj"] == "grouped_gemm"
    with pytest.raises(ValueError, match="'packed_colwise' does not apply to a Embedding"):
        list(sharded_modules(model, {"model.embed_tokens": "packed_colwise"}))
    with pytest.raises(ValueError, match="experts take packed_colwise"):
        list(sharded_modules(model, {"model.layers.*.mlp.experts.gate_up_proj": "colwise"}))


@pytest.mark.parametrize("tp,ep,message", [
    (3, 1, r"tp=3 must divide the attention heads \(20\) and the key/value heads \(4\)"),
    (8, 1, r"tp=8 must divide the attention heads \(20\) and the key/value heads \(4\)"),
    (1, 3, r"ep=3 must divide the experts \(64\)"),
    (4, 2, "ep=2 must be a multiple of tp=4"),
    (0, 1, "at least 1"),
])
def test_bad_layouts_name_the_numbers(tp, ep, message):
    with pytest.raises(ValueError, match=message):
        check_sizes(named_config("ernie-4.5-21b-a3b"), tp, ep)


def test_dense_model_has_no_experts_to_shard():
    with pytest.raises(ValueError, match="ernie4_5 has no experts"):
        check_sizes(named_config("ernie-4.5-0.3b"), 1, 2)


def test_info_prints_the_per_rank_plan():
    r = subprocess.run([sys.executable, "-m", "moelm.cli", "info", "--model", "ernie-4.5-300b-a47b", "--dtype",
                        "bfloat16", "--tp", "8", "--ep", "8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tp 8 x ep 8 on 8 ranks" in r.stdout and "weights 74.71 GB" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "moelm.cli", "info", "--model", "ernie-4.5-21b-a3b", "--tp", "3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "tp=3 must divide the attention heads (20)" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_narrower_than_grouped_mm_rows(dtype):
    """An expert sliced over tp ranks can be narrower than torch._grouped_mm's 16-byte rows (24 wide at tp=4: 6
    fp32, 24 bytes): the stacked experts still run, forward and backward, as the padded bmm computes them."""
    from moelm.nn.moe import Experts

    torch.manual_seed(0)
    auto, bmm = Experts(4, 32, 6), Experts(4, 32, 6)
    with torch.no_grad():
        for p in auto.parameters():
            p.normal_(0, 0.1)
    bmm.load_state_dict(auto.state_dict())
    auto, bmm = auto.to(dtype), bmm.to(dtype)
    bmm.path = "bmm"
    x = torch.randn(10, 32, dtype=dtype)
    index, weights = torch.randint(0, 4, (10, 2)), torch.rand(10, 2, dtype=dtype)
    for experts in (auto, bmm):
        experts(x, index, weights).float().square().sum().backward()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}
    with torch.no_grad():
        torch.testing.assert_close(auto(x, index, weights), bmm(x, index, weights), **tol)
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(getattr(auto, name).grad, getattr(bmm, name).grad, **tol)


def test_plans_one_process_would_not_compute_alike():
    """check_plan (parallelize's and memory_plan's): the family's plans pass; a block sharded in part, an end sharded
    otherwise, one of two tied ends, a module moelm does not shard, or a width tp does not divide is a ValueError
    naming it."""
    from moelm.parallel.plans import check_plan

    config = named_config("ernie4_5_moe-tiny")
    model = meta_model(config)
    check_plan(model, plan_for(config, 2, 2), 2)
    check_plan(model, {}, 3)
    check_plan(model, plan_for(config, 4, 8), 4)  # whole experts: their width need not divide
    bad = {
        "plan for model.layers.0.mlp: gate_proj colwise, up_proj unsharded": {
            "model.layers.*.mlp.gate_proj": "colwise"},
        r"plan for model.layers.1.mlp.shared_experts: .* down_proj colwise; moelm shards it as .* down_proj rowwise": {
            f"model.layers.*.mlp.shared_experts.{p}_proj": "colwise" for p in ("gate", "up", "down")},
        "plan for model.embed_tokens: 'rowwise'": {"model.embed_tokens": "rowwise", "lm_head": "colwise_gather_output"},
        "are tied": {"model.embed_tokens": "vocab_parallel"},
    }
    for message, plan in bad.items():
        with pytest.raises(ValueError, match=message):
            check_plan(model, plan, 2)
    with pytest.raises(ValueError, match=r"tp=3 must divide the intermediate size of model.layers.1.mlp.experts \("):
        check_plan(model, plan_for(config, 3, 1), 3)
    dense = {f"model.layers.*.mlp.{p}_proj": "rowwise" if p == "down" else "colwise" for p in ("gate", "up", "down")}
    with pytest.raises(ValueError, match=r"tp=3 must divide the intermediate size of model.layers.0.mlp \(128\)"):
        check_plan(model, dense, 3)


def test_a_users_rule_must_name_a_module():
    from moelm.parallel.plans import check_rules_match

    model = meta_model(named_config("phimoe-tiny"))
    check_rules_match(model, {"model.layers.*.block_sparse_moe.experts.gate_up_proj": "grouped_gemm", "lm_head": "x"})
    config = named_config("ernie4_5_moe-tiny")
    config.moe_layer_start_index, config.moe_num_shared_experts = 0, 0  # no dense MLP, no shared experts
    check_rules_match(meta_model(config), TP_PLANS["ernie4_5_moe"])  # the family's own rules
    for typo in ("model.layers.*.block_sparse_moe.experts.w1", "layers.*.self_attn.q_proj", "model.lm_head"):
        with pytest.raises(ValueError, match=f"plan rule '{re.escape(typo)}' names no module of PhimoeForCausalLM"):
            check_rules_match(model, {typo: "colwise"})
