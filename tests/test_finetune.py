"""Fine-tuning on one process, in fp32, against transformers 5.23.0 + torch.optim as the reference.

Each family's tiny checkpoint has every weight randomised (norms, biases, ERNIE's correction bias; see reference.py)
and is trained by moelm's Trainer from a recipe and, in this file, by an independent loop over the transformers
model loaded from the same directory (AdamW, clip_grad_norm_, transformers' lr schedules, the aux loss the model
adds, ERNIE's aux-free bias update computed here from the router logits). Both see the same batches: the examples
come from moelm.train.data (load_examples + collate), in the trainer's documented order. PhiMoE draws random
numbers in training (input jitter, the sparsemixer's Gumbel samples and Heun masks): the trainer seeds the global
generator with recipe.seed in its constructor and nothing random happens before the first forward, so the
reference seeds it the same way before its first forward and both draw the same numbers, forward for forward
(as test_parity seeds both models).

Also: exact resume (RNG state included), activation checkpointing, bf16 autocast, the aux loss reaching the
router, the lr schedules, and the `moelm finetune` / `moelm eval` command lines with their one-line errors.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from moelm import AutoModelForCausalLM
from moelm.config import named_config
from moelm.io.weights import SafetensorsCheckpoint
from moelm.models.scaffold import new_checkpoint
from moelm.text.tokenizer import AutoTokenizer
from moelm.train.data import DataConfig, batch_length, collate, load_examples
from moelm.train.lora import load_adapter
from moelm.train.recipe import build_recipe
from moelm.train.trainer import Trainer
from reference import mtp_by_hand, randomise
from test_finetune_dist import recipe_dict, write_hellaswag

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TINY = {"ernie4_5": "ernie4_5-tiny", "ernie4_5_moe": "ernie4_5_moe-tiny", "phimoe": "phimoe-tiny"}
# every optional weight on (biases), a real aux loss, and PhiMoE's jitter on so training draws random numbers
OVERRIDES = {
    "ernie4_5": dict(use_bias=True, tie_word_embeddings=False),
    "ernie4_5_moe": dict(use_bias=True, router_aux_loss_coef=0.1),  # tied embeddings (the tiny default)
    "phimoe": dict(attention_bias=True, lm_head_bias=True, input_jitter_noise=0.05, router_jitter_noise=0.2,
                   router_aux_loss_coef=0.1),
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and the 2 shared cores are not spun on."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    write_hellaswag(root / "train.jsonl", n=32, seed=0)
    return root


def build_checkpoint(root: Path, family: str) -> Path:
    """A checkpoint directory of the family's tiny config with OVERRIDES (tokenizer with chat template from
    new_checkpoint; every weight randomised)."""
    base = new_checkpoint(TINY[family], root / f"{family}-base", seed=0)
    config = named_config(TINY[family])
    for key, value in OVERRIDES[family].items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, seed=0)
    randomise(model, seed=1)
    path = root / family
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, path / name)
    return path


@pytest.fixture(scope="module")
def ckpt(root):
    """family -> its checkpoint directory, built once."""
    built: dict = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_checkpoint(root, family)
        return built[family]
    return get


def make_recipe(ckpt_dir, data, out, **sections) -> dict:
    """test_finetune_dist's recipe with sections updated key by key (None: the section left out)."""
    recipe = recipe_dict(str(ckpt_dir), str(data), str(out))
    for section, values in sections.items():
        if values is None:
            recipe.pop(section, None)
        elif isinstance(values, dict):
            recipe[section] = dict(recipe.get(section) or {}, **values)
        else:
            recipe[section] = values
    return recipe


def train(recipe: dict, **kwargs) -> list[dict]:
    return Trainer(build_recipe(copy.deepcopy(recipe)), progress=False, **kwargs).train()


def losses(history) -> list[float]:
    return [r["loss"] for r in history if "loss" in r]


def reference_train(recipe: dict, rng_seed: int | None = None):
    """The recipe's run, written independently over the transformers model: (records, model).

    Per optimizer step: the global batch of the epoch's order (randperm seeded with seed + epoch, or in file order),
    every micro-batch padded to its own longest example (moelm.train.data.batch_length), loss = summed CE
    / the global count of shifted label tokens + coef * aux_loss / micro-batches, clip_grad_norm_, AdamW,
    transformers' schedule, then ERNIE's bias += factor * sign(mean(load) - load)."""
    step_cfg, opt_cfg, sched = recipe["step"], recipe["optimizer"], recipe.get("lr_scheduler", {})
    moe_cfg = recipe.get("moe") or {}
    seed = recipe["seed"]
    model = transformers.AutoModelForCausalLM.from_pretrained(recipe["model"]["name_or_path"], dtype=torch.float32)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(recipe["model"]["name_or_path"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = DataConfig(**recipe["dataset"])
    examples = load_examples(data, tokenizer)
    moe = hasattr(model.config, "router_aux_loss_coef")
    coef = moe_cfg.get("aux_loss_coef")
    coef = (model.config.router_aux_loss_coef if moe else 0.0) if coef is None else coef
    factor = moe_cfg.get("gate_bias_update_factor", 0.0)
    biases = [layer.mlp.gate.moe_statics.e_score_correction_bias for layer in model.model.layers
              if hasattr(getattr(layer.mlp, "gate", None), "moe_statics")]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(opt_cfg["lr"]), betas=tuple(opt_cfg.get("betas", (0.9, 0.999))),
                            eps=float(opt_cfg.get("eps", 1e-8)), weight_decay=float(opt_cfg["weight_decay"]))
    max_steps = step_cfg["max_steps"]
    warmup, decay = sched.get("warmup_steps", 0), sched.get("decay", "constant")
    if decay == "cosine":
        scheduler = transformers.get_cosine_with_min_lr_schedule_with_warmup(
            opt, warmup, max_steps, min_lr=float(sched.get("min_lr", 0.0)))
    elif decay == "linear":
        scheduler = transformers.get_linear_schedule_with_warmup(opt, warmup, max_steps)
    else:
        scheduler = transformers.get_constant_schedule_with_warmup(opt, warmup)
    size, local = step_cfg["global_batch_size"], step_cfg["local_batch_size"]
    micro = size // local
    per_epoch = len(examples) // size
    records = []
    for step in range(max_steps):
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist() \
            if step_cfg.get("shuffle", True) else list(range(len(examples)))
        batch = [examples[i] for i in order[offset * size:(offset + 1) * size]]
        targets = sum(sum(1 for t in ex.labels[1:] if t != -100) for ex in batch)
        ce_total, aux_total, loads = 0.0, 0.0, None
        for i in range(micro):
            # as Trainer.train_step: each micro-batch's jitter and sparsemixer draws from (seed, step, its index)
            torch.manual_seed(hash((seed if rng_seed is None else rng_seed, step, i)) % 2 ** 63)
            part = batch[i * local:(i + 1) * local]
            mb = collate(part, pad, batch_length(data, part))
            if micro == 1:  # transformers' own loss: CE sum / num_items_in_batch (+ coef * aux_loss with MoE)
                out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"],
                            num_items_in_batch=targets, output_router_logits=moe, use_cache=False)
                loss = out.loss
                if moe and coef != model.router_aux_loss_coef:
                    loss = loss + (coef - model.router_aux_loss_coef) * out.aux_loss
            else:  # the share of one micro-batch: its CE sum / the global count, its aux loss / micro-batches
                out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                            output_router_logits=moe, use_cache=False)
                loss = model.loss_function(out.logits, mb["labels"], model.config.vocab_size,
                                           num_items_in_batch=targets)
                if moe:
                    loss = loss + coef * out.aux_loss / micro
            loss.backward()
            with torch.no_grad():
                ce_total += float(F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                  mb["labels"][:, 1:].flatten(), reduction="sum"))
                aux_total += float(out.aux_loss) if moe else 0.0
                if biases and factor:
                    mask = mb["attention_mask"].reshape(-1).bool()  # padding excluded
                    new = []
                    for logits, bias in zip(out.router_logits, biases):  # the choice the router made
                        chosen = torch.topk(F.softmax(logits.float(), dim=-1) + bias.reshape(-1),
                                            model.config.moe_k, dim=-1).indices
                        new.append(torch.bincount(chosen[mask].reshape(-1), minlength=logits.shape[-1]).float())
                    loads = new if loads is None else [a + b for a, b in zip(loads, new)]
        norm = torch.nn.utils.clip_grad_norm_(params, opt_cfg["max_grad_norm"]) \
            if opt_cfg.get("max_grad_norm") is not None else None
        lr = opt.param_groups[0]["lr"]
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        if loads is not None:
            with torch.no_grad():
                for bias, load in zip(biases, loads):
                    bias += (factor * torch.sign(load.mean() - load)).reshape(bias.shape)
        record = {"loss": ce_total / targets, "lr": lr, "grad_norm": None if norm is None else float(norm)}
        if moe:
            record["aux_loss"] = aux_total / micro
        records.append(record)
    return records, model


def biases_of(state: dict) -> list[str]:
    return [n for n in state if n.endswith("e_score_correction_bias")]


def final_state(directory) -> dict:
    """A checkpoint's weights as transformers loads them (so the hub format is checked too)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.state_dict()


# ------------------------------------------------------------------ 1. one AdamW step

@pytest.mark.parametrize("family", list(TINY))
def test_one_adamw_step_equals_transformers(family, ckpt, root, tmp_path):
    """max_steps 1, no accumulation, weight decay, clipping active (max_grad_norm far below the norm), the
    config's aux loss coefficient: every weight of moelm's final/ equals the reference model's after one
    transformers forward/backward (labels, num_items_in_batch, output_router_logits) + clip_grad_norm_ + AdamW."""
    path = ckpt(family)
    coef = OVERRIDES[family].get("router_aux_loss_coef")
    recipe = make_recipe(path, root / "train.jsonl", tmp_path / "out",
                         step={"global_batch_size": 4, "local_batch_size": 4, "max_steps": 1},
                         optimizer={"lr": 1e-3, "weight_decay": 0.1, "max_grad_norm": 0.05, "eps": 1e-6},
                         lr_scheduler={"warmup_steps": 0, "decay": "constant"},
                         moe={"aux_loss_coef": coef, "gate_bias_update_factor": 0.0} if coef else None,
                         checkpoint={"dir": str(tmp_path / "out"), "every_steps": 0})
    history = train(recipe)
    records, ref = reference_train(recipe)
    assert len(history) == 1 and history[0]["grad_norm"] > 10 * 0.05  # clipping is active
    torch.testing.assert_close(history[0]["loss"], records[0]["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(history[0]["grad_norm"], records[0]["grad_norm"], rtol=1e-4, atol=0)
    if coef:
        torch.testing.assert_close(history[0]["aux_loss"], records[0]["aux_loss"], rtol=1e-5, atol=0)
    ours, theirs = final_state(tmp_path / "out" / "final"), ref.state_dict()
    assert sorted(ours) == sorted(theirs)
    initial = final_state(path)
    for name, value in theirs.items():
        # AdamW's first step moves each weight by lr * g / (|g| + eps) ~ lr (1e-3) plus the decay, so a wrong or
        # missing update is an error of ~1e-3. The slope of g / (|g| + eps) at g ~ 0 is 1 / eps: the fp32 rounding
        # of a tiny gradient element (~1e-11 absolute here, both sides summing in different orders) becomes a weight
        # error of lr * 1e-11 / eps, 1e-6 at the default eps 1e-8 (seen: 7e-7 beyond rtol on ERNIE MoE's layer-0
        # k_proj.bias, at the tolerance's edge). eps 1e-6 (passed through the recipe to both) makes it 1e-8, so
        # rtol 1e-4 (the weights' own fp32 rounding, |w| ~ 0.1-1) with atol 1e-6 holds with a wide margin (the
        # largest error seen is then below the rtol part alone).
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    still = [n for n in theirs if torch.equal(theirs[n], initial[n])]
    assert still == biases_of(theirs), "weights that did not move"  # only ERNIE's correction bias (factor 0)
    if family == "phimoe":  # the agreement above needs the same random numbers: other ones give other weights
        _, other = reference_train(recipe, rng_seed=recipe["seed"] + 1)
        assert max((other.state_dict()[n] - ours[n]).abs().max() for n in ours) > 1e-4


# ------------------------------------------------------------------ 2. a 20-step loss curve

def curve_recipe(family, path, data, out, steps=20) -> dict:
    """Accumulation (global 8 = 4 micro-batches of 2), warmup + cosine to min_lr, clipping, weight decay, shuffled
    epochs (32 examples: 4 steps an epoch, so 20 steps reshuffle 4 times), the config's aux loss and, for ERNIE MoE,
    the aux-free bias update."""
    moe = {"ernie4_5": None, "ernie4_5_moe": {"aux_loss_coef": None, "gate_bias_update_factor": 0.01},
           "phimoe": {"aux_loss_coef": None, "gate_bias_update_factor": 0.0}}[family]
    return make_recipe(path, data, out,
                       step={"global_batch_size": 8, "local_batch_size": 2, "max_steps": steps, "shuffle": True},
                       optimizer={"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5},
                       lr_scheduler={"warmup_steps": 3, "decay": "cosine", "min_lr": 3e-4},
                       moe=moe, checkpoint={"dir": str(out), "every_steps": 0})


@pytest.mark.parametrize("family", list(TINY))
def test_loss_curve_equals_transformers(family, ckpt, root, tmp_path):
    recipe = curve_recipe(family, ckpt(family), root / "train.jsonl", tmp_path / "out")
    history = train(recipe)
    records, ref = reference_train(recipe)
    assert len(history) == len(records) == 20
    for step, (a, b) in enumerate(zip(history, records), 1):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=0, msg=lambda m: f"step {step} loss: {m}")
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=0), f"step {step} lr"
        torch.testing.assert_close(a["grad_norm"], b["grad_norm"], rtol=1e-4, atol=0,
                                   msg=lambda m: f"step {step} grad_norm: {m}")
        if "aux_loss" in b:
            torch.testing.assert_close(a["aux_loss"], b["aux_loss"], rtol=1e-4, atol=0,
                                       msg=lambda m: f"step {step} aux_loss: {m}")
    assert max(r["grad_norm"] for r in history) > 0.5  # clipping was active
    assert history[-1]["loss"] < history[0]["loss"]
    if family == "ernie4_5_moe":  # the aux-free balancing moved the correction biases as the reference's did
        ours, theirs, initial = final_state(tmp_path / "out" / "final"), ref.state_dict(), final_state(ckpt(family))
        for name in biases_of(theirs):
            assert not torch.equal(theirs[name], initial[name]), name
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ 3. exact resume, 4. activation checkpointing

def short_recipe(family, path, data, out, steps=6) -> dict:
    """6 steps of 2 micro-batches, warmup + cosine, a checkpoint every 2 steps (step_2, step_4 and the last, step_6,
    kept)."""
    moe = {"ernie4_5": None, "ernie4_5_moe": {"aux_loss_coef": None, "gate_bias_update_factor": 0.01},
           "phimoe": {"aux_loss_coef": None, "gate_bias_update_factor": 0.0}}[family]
    return make_recipe(path, data, out,
                       step={"global_batch_size": 4, "local_batch_size": 2, "max_steps": steps},
                       optimizer={"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5},
                       lr_scheduler={"warmup_steps": 1, "decay": "cosine", "min_lr": 1e-4}, moe=moe,
                       checkpoint={"dir": str(out), "every_steps": 2, "keep_last": 3})


@pytest.fixture(scope="module")
def full_run(ckpt, root):
    """family -> (recipe, history, out dir) of the uninterrupted 6-step run, run once."""
    done: dict = {}

    def get(family):
        if family not in done:
            out = root / f"full-{family}"
            recipe = short_recipe(family, ckpt(family), root / "train.jsonl", out)
            done[family] = (recipe, train(recipe), out)
        return done[family]
    return get


def safetensors_state(directory) -> dict:
    with SafetensorsCheckpoint(directory) as f:
        return {key: f.get(key).clone() for key in f.keys()}


@pytest.mark.parametrize("family", ["ernie4_5_moe", "phimoe"])
def test_resume_equals_uninterrupted_run_to_the_bit(family, full_run, tmp_path):
    recipe, history, out = full_run(family)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step_")) == ["step_2", "step_4", "step_6"]
    again = copy.deepcopy(recipe)
    again["checkpoint"]["dir"] = str(tmp_path / "again")
    resumed = train(again, resume=str(out / "step_4"))
    assert [r["step"] for r in resumed] == [5, 6]
    assert losses(resumed) == losses(history)[4:]  # ==: the same numbers, not close ones
    assert [r["lr"] for r in resumed] == [r["lr"] for r in history[4:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in history[4:]]
    ours, theirs = safetensors_state(tmp_path / "again" / "final"), safetensors_state(out / "final")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    if family == "phimoe":  # its draws come from the seed, the step and the micro-batch, not the global RNG state
        trainer = Trainer(build_recipe(dict(again, checkpoint={"dir": str(tmp_path / "reseeded")})),
                          resume=str(out / "step_4"), progress=False)
        torch.manual_seed(12345)
        assert losses(trainer.train()) == losses(history)[4:]


def test_lora_adapter_carries_the_balanced_biases(ckpt, root, tmp_path):
    """LoRA with ERNIE's aux-free balancing: the correction biases it moves are in the adapter (peft's
    modules_to_save), so a resumed run continues exactly and peft's model with the adapter is the trained one."""
    path = ckpt("ernie4_5_moe")
    recipe = short_recipe("ernie4_5_moe", path, root / "train.jsonl", tmp_path / "out", steps=4)
    recipe["moe"]["gate_bias_update_factor"] = 0.05
    recipe["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    history = train(recipe)
    again = copy.deepcopy(recipe)
    again["checkpoint"]["dir"] = str(tmp_path / "again")
    assert losses(train(again, resume=str(tmp_path / "out" / "step_2"))) == losses(history)[2:]
    final = tmp_path / "out" / "final"
    saved, base = safetensors_state(final), final_state(path)
    names = biases_of(saved)
    assert names and all(not torch.equal(saved[n], base[n.removeprefix("base_model.model.")]) for n in names)
    ids = torch.randint(50, (2, 7), generator=torch.Generator().manual_seed(0))
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), final).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, fast=False).eval()
    load_adapter(ours, final)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["ernie4_5_moe", "phimoe"])
def test_activation_checkpointing_gives_the_same_losses(family, full_run, tmp_path):
    """Each decoder layer recomputed in the backward: the same losses; for PhiMoE (input jitter and the sparsemixer
    on) the recomputation must replay the forward's random numbers."""
    recipe, history, _ = full_run(family)
    if family == "phimoe":
        config = json.loads(Path(recipe["model"]["name_or_path"], "config.json").read_text())
        assert config["input_jitter_noise"] > 0 and config["router_jitter_noise"] > 0
    again = copy.deepcopy(recipe)
    again["checkpoint"] = {"dir": str(tmp_path / "ac"), "every_steps": 0}
    again["distributed"] = {"activation_checkpointing": True}
    found = train(again)
    torch.testing.assert_close(torch.tensor(losses(found)), torch.tensor(losses(history)), rtol=1e-6, atol=0)
    ours = safetensors_state(tmp_path / "ac" / "final")
    theirs = safetensors_state(Path(recipe["checkpoint"]["dir"]) / "final")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


# ------------------------------------------------------------------ 5. bf16 autocast

@pytest.mark.parametrize("family", list(TINY))
def test_bf16_autocast_trains_close_to_fp32(family, ckpt, root, tmp_path):
    base = short_recipe(family, ckpt(family), root / "train.jsonl", tmp_path / "fp32", steps=3)
    base["checkpoint"]["every_steps"] = 0
    fp32 = losses(train(base))
    bf16_recipe = copy.deepcopy(base)
    bf16_recipe["checkpoint"]["dir"] = str(tmp_path / "bf16")
    bf16_recipe["model"]["autocast"] = "bfloat16"
    bf16 = losses(train(bf16_recipe))
    assert len(bf16) == 3 and all(math.isfinite(x) for x in bf16)
    assert bf16 != fp32  # the forward really ran in bf16
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=5e-2, atol=0)
    state = safetensors_state(tmp_path / "bf16" / "final")  # the weights (and so the optimizer) stay fp32
    assert {t.dtype for t in state.values()} == {torch.float32}


# ------------------------------------------------------------------ 6. the aux loss reaches the router

def router_weights(state: dict) -> dict:
    return {n: w for n, w in state.items() if n.endswith(("mlp.gate.weight", "mlp.router.weight"))}


@pytest.mark.parametrize("family", ["ernie4_5_moe", "phimoe"])
def test_aux_loss_reaches_the_router(family, ckpt, root, tmp_path):
    """moe.aux_loss_coef 0 vs 0.5, one step. eps 1 makes AdamW's first update lr * g / (|g| + 1) ~ lr * g, linear
    in the gradient (at the default eps it is ~lr * sign(g), blind to a gradient change that keeps the sign)."""
    path = ckpt(family)
    updates, records = {}, {}
    initial = router_weights(final_state(path))
    assert initial
    for coef in (0.0, 0.5):
        out = tmp_path / f"coef{coef}"
        recipe = short_recipe(family, path, root / "train.jsonl", out, steps=1)
        recipe.update(optimizer={"lr": 1.0, "eps": 1.0, "weight_decay": 0.0, "max_grad_norm": None},
                      lr_scheduler={"warmup_steps": 0, "decay": "constant"},
                      moe={"aux_loss_coef": coef, "gate_bias_update_factor": 0.0},
                      checkpoint={"dir": str(out), "every_steps": 0})
        records[coef] = train(recipe)[0]
        after = router_weights(final_state(out / "final"))
        updates[coef] = {n: after[n] - initial[n] for n in initial}
    # the same forward (same weights and random numbers): the same CE and aux loss; "loss" holds no aux loss
    assert records[0.0]["loss"] == records[0.5]["loss"]
    assert records[0.0]["aux_loss"] == records[0.5]["aux_loss"] > 0
    for name in initial:
        assert updates[0.0][name].abs().max() > 0, f"{name}: the router did not learn from the CE loss"
        change = (updates[0.5][name] - updates[0.0][name]).abs().max()
        assert change > 0.1 * updates[0.0][name].abs().max(), f"{name}: the aux loss did not reach the router"


def test_mtp_head_trains_with_ernies_loss(ckpt, root, tmp_path):
    """An ERNIE MoE checkpoint with an MTP head, one step: the logged mtp_loss is the head's cross-entropy on the
    token after the next, computed here from the formula (reference.mtp_by_hand) over the step's micro-batches;
    with moe.mtp_loss_coef 0 the head is saved as it was, with 0.3 every tensor of it moves and the main loss is
    the same."""
    base = ckpt("ernie4_5_moe")
    model = AutoModelForCausalLM.from_pretrained(base, fast=False)
    model.add_mtp()
    randomise(model, seed=2)
    path = tmp_path / "with-mtp"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, path / name)
    before = {k: v for k, v in load_file(path / "model.safetensors").items() if ".mtp_" in k}
    records, after = {}, {}
    for coef in (0.0, 0.3):
        out = tmp_path / f"mtp{coef}"
        recipe = short_recipe("ernie4_5_moe", path, root / "train.jsonl", out, steps=1)
        recipe.update(moe={"aux_loss_coef": None, "gate_bias_update_factor": 0.0, "mtp_loss_coef": coef},
                      optimizer={"lr": 1e-2, "weight_decay": 0.0, "max_grad_norm": None},
                      lr_scheduler={"warmup_steps": 0, "decay": "constant"},
                      checkpoint={"dir": str(out), "every_steps": 0})
        trainer = Trainer(build_recipe(copy.deepcopy(recipe)), progress=False)
        batches = trainer.micro_batches(trainer.global_batch(0))
        records[coef] = trainer.train()[0]
        after[coef] = {k: v for k, v in load_file(out / "final" / "model.safetensors").items() if ".mtp_" in k}
    assert all(torch.equal(after[0.0][k], v) for k, v in before.items())
    assert all(not torch.equal(after[0.3][k], v) for k, v in before.items()), "a tensor of the head did not learn"
    assert records[0.0]["loss"] == records[0.3]["loss"] and "mtp_loss" not in records[0.0]
    with torch.no_grad():
        total = count = 0
        for batch in batches:
            logits = mtp_by_hand(model, batch["input_ids"])  # right-padded: the real tokens never see the pads
            labels = batch["labels"][:, 2:]
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum")
            count += int((labels != -100).sum())
    assert abs(records[0.3]["mtp_loss"] - float(total) / count) < 1e-4, (records[0.3]["mtp_loss"], total / count)


def test_mtp_head_from_a_named_config_trains_and_validates(ckpt, root, tmp_path):
    """A named config with config_overrides num_nextn_predict_layers: 1 (as recipes/demo_pydoc.yaml): the model is
    built with the head, which trains (mtp_loss logged, every tensor of it moves from the seed's initialisation);
    validation reports the head's loss (val_mtp_loss, ERNIE's formula on the final model); final/ carries it."""
    hellaswag = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(r["endings"])}) + "\n" for r in hellaswag))
    out = tmp_path / "run"
    data = {"kind": "text", "path": str(text), "seq_length": 32}
    recipe = make_recipe(ckpt("ernie4_5_moe"), text, out, dataset=data,
                         validation_dataset=dict(data, num_samples_limit=3),
                         model={"name_or_path": "ernie4_5_moe-tiny", "tokenizer": str(ckpt("ernie4_5_moe")),
                                "config_overrides": {"num_nextn_predict_layers": 1}},
                         step={"global_batch_size": 4, "local_batch_size": 2, "max_steps": 3},
                         moe={"aux_loss_coef": 0.01, "gate_bias_update_factor": 0.0, "mtp_loss_coef": 0.3},
                         checkpoint={"dir": str(out), "every_steps": 0})
    trainer = Trainer(build_recipe(copy.deepcopy(recipe)), progress=False)
    config = named_config("ernie4_5_moe-tiny")
    config.num_nextn_predict_layers = 1
    initial = AutoModelForCausalLM.from_config(config, seed=recipe["seed"], fast=False)  # the trainer's draw
    assert trainer.mtp is not None and trainer.mtp_coef == 0.3
    assert all(torch.equal(p, initial.state_dict()[k]) for k, p in trainer.model.state_dict().items())
    history = trainer.train()
    steps, final = [r for r in history if "loss" in r], history[-1]
    assert len(steps) == 3 and all(math.isfinite(r["mtp_loss"]) and r["mtp_loss"] > 0 for r in steps)
    assert json.loads((out / "final" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    trained = load_file(out / "final" / "model.safetensors")
    head = {f"model.{k}": v for k, v in initial.model.state_dict().items() if k.startswith("mtp_")}
    assert head and all(not torch.equal(trained[k], v) for k, v in head.items()), "a tensor of the head did not learn"
    model = AutoModelForCausalLM.from_pretrained(out / "final", fast=False).eval()
    assert model.mtp is not None and not model.kept_aside
    tokenizer = AutoTokenizer.from_pretrained(ckpt("ernie4_5_moe"))
    examples = load_examples(DataConfig(**data, num_samples_limit=3), tokenizer)
    ids = torch.tensor([e.input_ids for e in examples])  # full chunks: no padding
    with torch.no_grad():
        logits = mtp_by_hand(model, ids)
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    assert abs(final["val_mtp_loss"] - float(want)) < 1e-4, (final["val_mtp_loss"], float(want))


# ------------------------------------------------------------------ 7. the command line

def write_yaml(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def cli(ckpt, root):
    """Every `moelm` command of the CLI tests, started at once (each is mostly interpreter start-up, ~2.5 s of CPU)
    and waited for: ({case: (returncode, stdout, stderr)}, {name: path used})."""
    path = ckpt("ernie4_5_moe")
    work = root / "cli"
    work.mkdir()
    data = root / "train.jsonl"
    recipe = short_recipe("ernie4_5_moe", path, data, work / "unused", steps=50)
    recipe["checkpoint"]["every_steps"] = 0
    good = write_yaml(work / "recipe.yaml", recipe)
    hellaswag = [json.loads(line) for line in data.read_text().splitlines()]
    records = [json.dumps(r) for r in hellaswag[:12]]
    bad_json = write_jsonl(work / "bad_json.jsonl", records[:2] + ['{"ctx": "a man", "endings": ["x", "y"],'] +
                           records[2:])
    bad_label = write_jsonl(work / "bad_label.jsonl", records[:4] + [json.dumps(dict(hellaswag[4], label=7))] +
                            records[4:])
    chat = write_jsonl(work / "chat.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "hello"}]})])
    plain_tok = work / "tokenizer-without-template"
    plain_tok.mkdir()
    shutil.copy(path / "tokenizer.json", plain_tok / "tokenizer.json")
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config.pop("chat_template")
    (plain_tok / "tokenizer_config.json").write_text(json.dumps(tok_config))
    text = write_jsonl(work / "text.jsonl", [json.dumps({"text": " ".join(r["endings"])}) for r in hellaswag])

    def variant(name, **sections):
        return write_yaml(work / f"{name}.yaml", make_recipe(path, data, work / name, **sections))

    cases = {
        "finetune": [good, "--step.max_steps=2", f"--checkpoint.dir={work / 'run'}"],
        "unknown_key": [variant("unknown_key", optimizer={"lr": 1e-3, "learning_rate": 1e-3})],
        "ep": [good, "--distributed.ep=3", f"--checkpoint.dir={work / 'ep'}"],
        "bad_json": [good, f"--dataset.path={bad_json}", f"--checkpoint.dir={work / 'bad_json'}"],
        "bad_label": [good, f"--dataset.path={bad_label}", f"--checkpoint.dir={work / 'bad_label'}"],
        "no_template": [variant("no_template", model={"name_or_path": str(path), "tokenizer": str(plain_tok)},
                                dataset={"kind": "chat", "path": str(chat), "seq_length": 64})],
        "missing_recipe": [work / "no_such_recipe.yaml"],
        "override_without_eq": [good, "--step.max_steps"],
        "resume_nothing": [good, f"--checkpoint.dir={work / 'empty'}", "--resume"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "moelm", "finetune", *map(str, args)], env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in cases.items()}
    procs["eval_hellaswag"] = subprocess.Popen(
        [sys.executable, "-m", "moelm", "eval", "--model", str(path), "--data", str(data), "--kind", "hellaswag",
         "--limit", "8", "--batch-size", "3"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs["eval_text"] = subprocess.Popen(
        [sys.executable, "-m", "moelm", "eval", "--model", str(path), "--data", str(text), "--kind", "text",
         "--seq-length", "16", "--batch-size", "3"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    paths = dict(ckpt=path, work=work, bad_json=bad_json, bad_label=bad_label, chat=chat, text=text, data=data)
    return results, paths


def test_cli_finetune_writes_metrics_and_a_loadable_final(cli):
    results, paths = cli
    code, out, err = results["finetune"]
    assert code == 0, err
    assert "Traceback" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    run = paths["work"] / "run"
    assert summary["steps"] == 2 and Path(summary["final"]) == run / "final"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "lr", "tokens_per_s"} <= set(m) and math.isfinite(m["loss"]) and m["tokens_per_s"] > 0
    assert summary["loss"] == metrics[-1]["loss"]
    # the overrides were applied: the same run in this process (max_steps 2 changes the cosine schedule too)
    recipe = yaml.safe_load((paths["work"] / "recipe.yaml").read_text())
    recipe["step"]["max_steps"] = 2
    recipe["checkpoint"]["dir"] = str(paths["work"] / "in-process")
    history = train(recipe)
    torch.testing.assert_close(torch.tensor([m["loss"] for m in metrics]), torch.tensor(losses(history)),
                               rtol=1e-6, atol=0)
    assert [m["lr"] for m in metrics] == [r["lr"] for r in history]
    # final/ is a hub checkpoint: transformers and moelm load it and agree
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 200, 31, 64]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    trained = final_state(run / "final")
    assert any(not torch.equal(v, trained[k]) for k, v in final_state(paths["ckpt"]).items())


ERRORS = {  # case -> what the one line must name
    "unknown_key": lambda p: ["optimizer.learning_rate"],
    "ep": lambda p: ["distributed.ep=3", "8"],
    "bad_json": lambda p: [f"{p['bad_json']}:3:"],
    "bad_label": lambda p: [f"{p['bad_label']}:5:", "label 7"],
    "no_template": lambda p: [str(p["chat"]), "chat template"],
    "missing_recipe": lambda p: ["no_such_recipe.yaml"],
    "override_without_eq": lambda p: ["--step.max_steps"],
    "resume_nothing": lambda p: ["--resume", str(p["work"] / "empty")],
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_cli_finetune_errors_are_one_line(case, cli):
    results, paths = cli
    code, out, err = results[case]
    lines = err.strip().splitlines()
    if case == "override_without_eq" and code == 2:
        pytest.fail("`moelm finetune recipe.yaml --step.max_steps` (an override without '=') exits 2 with argparse's "
                    f"usage line before the error ({len(lines)} lines on stderr: {err!r}); every finetune error is "
                    "to exit 1 with one 'moelm: error:' line (src/moelm/cli.py main: parser.error for overrides)")
    assert "Traceback" not in err, err
    assert code == 1, (code, err)
    assert len(lines) == 1 and lines[0].startswith("moelm: error: "), err
    for needle in ERRORS[case](paths):
        assert needle in lines[0], (needle, lines[0])


def reference_choices(model, path, tokenizer, limit):
    """HellaSwag accuracy as lm-evaluation-harness scores it, with the transformers model: (acc, acc_norm)."""
    from moelm.train.data import hellaswag_record, hellaswag_tokens, read_records

    correct = correct_norm = count = 0
    for where, record in read_records(path, limit):
        ctx, endings, label = hellaswag_record(record, where)
        context, ends = hellaswag_tokens(tokenizer, ctx, endings, where)
        scores = []
        for ids in ends:
            seq = torch.tensor([context + ids])
            with torch.no_grad():
                logprobs = F.log_softmax(model(input_ids=seq).logits[0, :-1].float(), dim=-1)
            scores.append(float(logprobs[len(context) - 1:].gather(1, seq[0, len(context):, None]).sum()))
        lengths = [len(e.encode("utf-8")) for e in endings]
        correct += max(range(len(scores)), key=lambda j: scores[j]) == label
        correct_norm += max(range(len(scores)), key=lambda j: scores[j] / lengths[j]) == label
        count += 1
    return correct / count, correct_norm / count


def test_cli_eval(cli):
    results, paths = cli
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["ckpt"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["ckpt"])
    code, out, err = results["eval_hellaswag"]
    assert code == 0, err
    found = json.loads(out)
    assert found["count"] == 8
    assert (found["accuracy"], found["accuracy_norm"]) == reference_choices(model, paths["data"], tokenizer, 8)
    code, out, err = results["eval_text"]
    assert code == 0, err
    found = json.loads(out)
    examples = load_examples(DataConfig(kind="text", path=str(paths["text"]), seq_length=16), tokenizer)
    batch = collate(examples, 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert found["tokens"] == tokens
    assert found["perplexity"] == pytest.approx(math.exp(float(nll) / tokens), rel=1e-4)


# ------------------------------------------------------------------ 8. lr schedules

@pytest.mark.parametrize("decay, warmup, min_lr", [("cosine", 3, 2e-4), ("cosine", 0, 0.0), ("linear", 3, 0.0),
                                                   ("constant", 3, 0.0)])
def test_lr_schedule_equals_transformers(decay, warmup, min_lr, ckpt, root, tmp_path):
    steps, lr = 10, 1e-3
    recipe = make_recipe(ckpt("ernie4_5"), root / "train.jsonl", tmp_path / "out", moe=None,
                         step={"global_batch_size": 1, "local_batch_size": 1, "max_steps": steps},
                         optimizer={"lr": lr, "weight_decay": 0.0, "max_grad_norm": 1.0},
                         lr_scheduler={"warmup_steps": warmup, "decay": decay, "min_lr": min_lr},
                         checkpoint={"dir": str(tmp_path / "out"), "every_steps": 0})
    found = [r["lr"] for r in train(recipe)]
    assert len(found) == steps
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    make = {"cosine": lambda: transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps,
                                                                                     min_lr=min_lr),
            "linear": lambda: transformers.get_linear_schedule_with_warmup(opt, warmup, steps),
            "constant": lambda: transformers.get_constant_schedule_with_warmup(opt, warmup)}[decay]
    scheduler, expected = make(), []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert found == pytest.approx(expected, rel=1e-12, abs=1e-15)
