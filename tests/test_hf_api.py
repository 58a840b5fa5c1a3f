"""What HF Trainer, TRL and peft call on a model, on moelm's own: peft.get_peft_model wrapping a moelm model
(CAUSAL_LM: forward, loss, gradients, generate, the adapter it saves loading into transformers, merge), the
decoding-step inputs of prepare_inputs_for_generation, activation checkpointing and input gradients, the memory
footprint; each against transformers where it has the same."""
from __future__ import annotations

import pytest
import torch

import moelm
from moelm.nn import moe
from test_parity import build, tokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = ("ernie4_5", "ernie4_5_moe", "phimoe")


def lora_config():
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                           init_lora_weights=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_wraps_a_moelm_model_as_a_transformers_one(family, tmp_path):
    """peft's CAUSAL_LM wrapper around moelm and around transformers, with the same adapter weights: the same
    logits, loss and adapter gradients, the same greedy generate; peft's save of moelm's adapter loads into
    transformers with the same logits; merge_and_unload gives a moelm model with those logits."""
    _, _, path = build(family)
    torch.manual_seed(0)
    ours = peft.get_peft_model(moelm.AutoModelForCausalLM.from_pretrained(path, fast=False), lora_config())
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager").float(), lora_config())
    peft.set_peft_model_state_dict(theirs, peft.get_peft_model_state_dict(ours))
    ids = tokens()
    a, b = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    trained = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert trained.keys() == grads.keys() and all("lora_" in n for n in trained)
    for name, grad in trained.items():
        torch.testing.assert_close(grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    ours.eval()
    theirs.eval()
    prompt = ids[:1, :5]
    generated = ours.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, theirs.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
    ours.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager").float(), tmp_path / "adapter").eval()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        merged = ours.merge_and_unload()
        assert isinstance(merged, moelm.AutoModelForCausalLM.class_for(merged.config))
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_prepare_inputs_for_generation_as_transformers():
    ref, ours, _ = build("ernie4_5_moe")
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    embeds = ref.get_input_embeddings()(ids).detach()
    cache = transformers.DynamicCache(config=ref.config)
    calls = [dict(), dict(attention_mask=mask, position_ids=position_ids, next_sequence_length=1, use_cache=True),
             dict(past_key_values=cache, attention_mask=mask, next_sequence_length=2, labels=ids, logits_to_keep=1),
             dict(inputs_embeds=embeds, is_first_iteration=True, attention_mask=mask, position_ids=position_ids),
             dict(inputs_embeds=embeds, is_first_iteration=False, next_sequence_length=1)]
    for kwargs in calls:
        want, got = ref.prepare_inputs_for_generation(ids, **kwargs), ours.prepare_inputs_for_generation(ids, **kwargs)
        assert got.keys() == want.keys(), (kwargs, got.keys(), want.keys())
        for key, value in want.items():
            assert got[key] is value if key == "past_key_values" else \
                (torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value), key
    step = ours.prepare_inputs_for_generation(ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(**step).logits, ref(**step).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["ernie4_5_moe", "phimoe"])
def test_activation_checkpointing_keeps_the_gradients(family):
    """gradient_checkpointing_enable (every layer, or every n-th) gives the gradients of the plain backward (PhiMoE
    with its router jitter: the recompute draws the same noise), and the same as transformers' checkpointed model;
    disable restores the plain layers; eval and no_grad forwards never recompute."""
    ref, _, path = build(family, cache=False)
    ours = moelm.AutoModelForCausalLM.from_pretrained(path, fast=False, router_jitter_noise=0.1) \
        if family == "phimoe" else moelm.AutoModelForCausalLM.from_pretrained(path, fast=False)
    ids = tokens()

    def grads(model, seed=0):
        model.zero_grad()
        torch.manual_seed(seed)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    for i, layer in enumerate(ours.model.layers):  # attention runs again in the backward of a checkpointed layer
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.append(i))
    ours.train()
    plain_loss, plain = grads(ours)
    layers = list(range(len(ours.model.layers)))
    assert not ours.is_gradient_checkpointing and sorted(calls) == layers
    every, second = sorted(layers * 2), sorted(layers + layers[::2])
    for kwargs, again in ((dict(), every), (dict(every_n_layers=2), second),
                          (dict(gradient_checkpointing_kwargs={"use_reentrant": True}), every)):
        ours.gradient_checkpointing_enable(**kwargs)
        assert ours.is_gradient_checkpointing and ours.is_activation_checkpointing
        moe._GROUPED_MM_OK.clear()  # the first forward probes torch._grouped_mm, its recompute does not
        calls.clear()
        loss, got = grads(ours)
        assert sorted(calls) == again, kwargs
        torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)
        assert got.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    if family != "phimoe":  # (transformers' own jitter is not the same draw)
        ref.train()
        ref.gradient_checkpointing_enable()
        _, want = grads(ref)
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    ours.gradient_checkpointing_enable()
    ours.eval()
    calls.clear()
    ours(input_ids=ids).logits.sum().backward()
    assert sorted(calls) == layers  # eval: never recomputed
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing and "input_grads_hook" not in ours.__dict__
    assert all("forward" not in layer.__dict__ for layer in ours.model.layers)
    with pytest.raises(ValueError, match="every_n_layers must be a positive integer, got 0"):
        ours.activation_checkpointing_enable(every_n_layers=0)


def test_input_require_grads_and_memory_footprint():
    ref, ours, _ = build("ernie4_5", cache=False)
    ours.requires_grad_(False)
    ours.enable_input_require_grads()
    assert ours(input_ids=tokens()).logits.requires_grad
    ours.disable_input_require_grads()
    assert not ours(input_ids=tokens()).logits.requires_grad
    fp32 = moelm.AutoModelForCausalLM.from_pretrained(build("ernie4_5")[2], fast=False)
    params = sum(p.numel() * 4 for p in fp32.parameters())
    assert fp32.get_memory_footprint(return_buffers=False) == params == ref.get_memory_footprint(return_buffers=False)


def test_transformers_trainer_trains_it_as_the_transformers_model(tmp_path):
    """transformers.Trainer with gradient checkpointing, two steps on the same data: the losses and the trained
    weights of transformers' model."""
    ref, _, path = build("ernie4_5_moe", cache=False)
    ours = moelm.AutoModelForCausalLM.from_pretrained(path, fast=False)
    ids = tokens(batch=4, seq=10)
    data = [{"input_ids": row, "labels": row} for row in ids]
    results = []
    for model in (ours, ref):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / type(model).__module__), max_steps=2,
                                              per_device_train_batch_size=2, logging_steps=1, report_to=[],
                                              gradient_checkpointing=True, save_strategy="no", use_cpu=True,
                                              disable_tqdm=True, seed=0, data_seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        results.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    assert len(results[0]) == 2 and results[0] == pytest.approx(results[1], rel=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
