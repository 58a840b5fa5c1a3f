"""NeMo AutoModel's face: every BackendConfig choice computes what the default modules compute (logits, loss,
gradients, generation), the choices moelm does not have are errors naming them, get_capabilities says what moelm
runs, and moe_config / moe_overrides set the config's MoE fields under NeMo's names."""
from __future__ import annotations

import pytest
import torch

import moelm
from moelm import AutoModelForCausalLM, BackendConfig, Ernie4_5_MoeForCausalLM, get_capabilities, named_config
from reference import randomise

FAMILIES = ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"]


def build(name: str, backend=None):
    model = AutoModelForCausalLM.from_config(named_config(name), fast=False, backend=backend)
    return randomise(model, seed=3).eval()


def run(model, ids, mask, backward=True):
    """Logits of the real (unpadded) positions, loss and gradients; padded rows attend to nothing, and what
    each implementation makes of them is not compared (no loss is taken there)."""
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # the token a padded position would predict
    with torch.set_grad_enabled(backward):
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    if not backward:
        return out.logits[mask.bool()], out.loss, {}
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach()[mask.bool()], out.loss.detach(), grads


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("attn,rms_norm,experts", [  # every choice at least once, with changing partners
    ("eager", "torch", "bmm"), ("flex", "torch_fp32", "torch"), ("sdpa", "torch_fp32", "bmm"),
    ("flex", "torch", "bmm")])
def test_every_choice_computes_the_same(name, attn, rms_norm, experts):
    ids = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    backward = attn != "flex"  # torch's flex_attention has no backward on CPU
    want = run(build(name), ids, mask, backward)
    model = build(name, BackendConfig(attn=attn, rms_norm=rms_norm, experts=experts))
    got = run(model, ids, mask, backward)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys() and (got[2] or not backward)
    for key in want[2]:
        torch.testing.assert_close(got[2][key], want[2][key], atol=1e-5, rtol=1e-4, msg=key)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("FlexAttention" in kinds) == (attn == "flex")
    assert ("FormulaRMSNorm" in kinds) == (rms_norm == "torch_fp32" and name != "phimoe-tiny")  # PhiMoE: LayerNorm
    assert all(m.path == ("auto" if experts == "torch" else experts) for m in model.modules() if hasattr(m, "path"))
    assert model.config.attn_implementation == ("eager" if attn == "eager" else "sdpa")


def test_flex_attention_generates_the_same_tokens():
    ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    plain, flex = build("phimoe-tiny"), build("phimoe-tiny", {"attn": "flex"})
    with torch.no_grad():
        assert torch.equal(flex.generate(ids, max_new_tokens=6, do_sample=False),
                           plain.generate(ids, max_new_tokens=6, do_sample=False))


def test_grouped_mm_trains_like_bmm_and_where_it_does_not_run_says_so():
    """torch 2.13 has _grouped_mm's backward on CPU: experts="torch_mm" trains, with bmm's gradients; float64 (no
    _grouped_mm kernel) is an error naming the alternatives, never a silent fallback."""
    ids = torch.randint(0, 500, (1, 5))
    grads = {}
    for experts in ("torch_mm", "bmm"):
        model = build("ernie4_5_moe-tiny", BackendConfig(experts=experts)).train()
        model(ids, labels=ids).loss.backward()
        grads[experts] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads["bmm"].items():
        torch.testing.assert_close(grads["torch_mm"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model = build("ernie4_5_moe-tiny", BackendConfig(experts="torch_mm")).to(torch.float64).train()
    with pytest.raises(RuntimeError, match="torch._grouped_mm does not run here.*float64.*'bmm'"):
        model(ids, labels=ids)


def test_choices_moelm_does_not_have_are_errors():
    with pytest.raises(NotImplementedError, match="attn='te'.*Transformer Engine"):
        BackendConfig(attn="te")
    with pytest.raises(NotImplementedError, match="dispatcher='deepep'.*DeepEP"):
        BackendConfig(dispatcher="deepep")
    with pytest.raises(ValueError, match=r"experts='bogus'.*\('torch', 'torch_mm', 'grouped_mm', 'bmm'\)"):
        BackendConfig(experts="bogus")
    with pytest.raises(NotImplementedError, match="fake_balanced_gate=True"):
        BackendConfig(fake_balanced_gate=True)


def test_capabilities_per_family():
    dense, moe, phi = (get_capabilities(named_config(n)) for n in FAMILIES)
    assert dense.supports_tp and not dense.supports_ep
    assert moe.supports_tp and moe.supports_ep and phi.supports_ep
    assert not (moe.supports_pp or moe.supports_cp)
    assert Ernie4_5_MoeForCausalLM.get_capabilities(named_config("ernie4_5_moe-tiny")) == moe


def test_each_model_file_names_its_model_class_as_nemo():
    from moelm.models import ernie4_5, ernie4_5_moe, phimoe

    assert ernie4_5.ModelClass is moelm.Ernie4_5ForCausalLM and phimoe.ModelClass is moelm.PhimoeForCausalLM
    assert ernie4_5_moe.ModelClass is Ernie4_5_MoeForCausalLM


def test_moe_overrides_use_nemo_names_on_a_copy():
    config = named_config("ernie4_5_moe-tiny")
    model = AutoModelForCausalLM.from_config(config, fast=False, moe_config={"n_activated_experts": 1},
                                             moe_overrides={"aux_loss_coeff": 0.5})
    assert model.config.moe_k == 1 and model.config.router_aux_loss_coef == 0.5
    assert config.moe_k == 2  # the caller's config is not changed
    with pytest.raises(TypeError, match="'route_scale' is not a MoE setting of Ernie4_5_MoeConfig"):
        AutoModelForCausalLM.from_config(config, moe_overrides={"route_scale": 2.0})
    with pytest.raises(ValueError, match="ernie4_5, which has no experts"):
        AutoModelForCausalLM.from_config(named_config("ernie4_5-tiny"), moe_overrides={"n_routed_experts": 4})


def test_nemo_0_7_names_capabilities_and_the_gmm_alias():
    """nemo_automodel 0.7.0 (its wheel): ModelCapabilities also has supports_thd, supports_mtp_cp, supports_mtp_cp_pp
    and supports_cp_vision_frame_sharding (moelm runs none of them), and BackendConfig(experts="gmm") is its
    deprecated name for torch_mm (a FutureWarning), not an error."""
    caps = get_capabilities(named_config("ernie4_5_moe-tiny"))
    assert not (caps.supports_thd or caps.supports_mtp_cp or caps.supports_mtp_cp_pp
                or caps.supports_cp_vision_frame_sharding)
    with pytest.warns(FutureWarning, match="experts='gmm' is deprecated; use experts='torch_mm'"):
        assert BackendConfig(experts="gmm").experts == "torch_mm"


def test_from_config_takes_nemos_positional_order():
    """NeMo AutoModel's from_config(config, moe_config, backend) (MoE) / (config, backend) (dense ERNIE) by position;
    anything more by position, or a name given twice, is a TypeError naming the order (it was torch's .to() error)."""
    moe = AutoModelForCausalLM.from_config(named_config("ernie4_5_moe-tiny"), None, BackendConfig(), seed=0)
    keyword = AutoModelForCausalLM.from_config(named_config("ernie4_5_moe-tiny"), backend=BackendConfig(), seed=0)
    assert type(moe) is type(keyword) and moe.backend == keyword.backend
    assert all(torch.equal(a, b) for a, b in zip(moe.state_dict().values(), keyword.state_dict().values()))
    dense = AutoModelForCausalLM.from_config(named_config("ernie4_5-tiny"), BackendConfig(attn="eager"))
    assert dense.backend.attn == "eager"
    with pytest.raises(TypeError, match=r"takes config, moe_config, backend by position .* pass dtype="):
        AutoModelForCausalLM.from_config(named_config("ernie4_5_moe-tiny"), None, BackendConfig(), torch.float32)
    with pytest.raises(TypeError, match="got backend by position and by keyword"):
        AutoModelForCausalLM.from_config(named_config("ernie4_5-tiny"), BackendConfig(), backend=BackendConfig())
