"""The shipped recipes: each parses, and each runs two steps (on a tiny checkpoint standing in for the model it
names) through to its final directory: a hub checkpoint, or a PEFT adapter plus the merged checkpoint."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from moelm import AutoModelForCausalLM
from moelm.config import named_config
from moelm.models.scaffold import new_checkpoint
from moelm.train.recipe import RecipeError, build_recipe, load_recipe
from moelm.train.trainer import Trainer

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("recipes")
    moe = new_checkpoint("ernie4_5_moe-tiny", root / "moe")
    shutil.copytree(moe, root / "moe-mtp")  # the tokenizer; the weights with an MTP head (for moe.mtp_loss_coef)
    config = named_config("ernie4_5_moe-tiny")
    config.num_nextn_predict_layers = 1
    AutoModelForCausalLM.from_config(config, seed=0, fast=False).save_pretrained(root / "moe-mtp")
    return {"ernie4_5_moe": str(moe), "ernie4_5_moe_mtp": str(root / "moe-mtp"),
            "ernie4_5": str(new_checkpoint("ernie4_5-tiny", root / "dense"))}


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"ernie4_5_moe_tiny_hellaswag.yaml", "ernie4_5_0p3b_hellaswag.yaml", "chat_sft_lora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_two_steps(path, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their data relative to the repository
    recipe = load_recipe(path)
    if recipe.dataset.kind == "text" and not Path(recipe.dataset.path).exists():
        pytest.skip(f"{recipe.dataset.path} is made by the demo's script")
    family = "ernie4_5" if "0p3b" in path.name else "ernie4_5_moe_mtp" if recipe.moe.mtp_loss_coef else "ernie4_5_moe"
    overrides = [f"--model.name_or_path={tiny[family]}", "--model.tokenizer=null", "--model.config_overrides={}",
                 "--step.max_steps=2", f"--checkpoint.dir={tmp_path}", "--step.val_every_steps=0"]
    if recipe.validation_dataset is not None:
        overrides.append("--validation_dataset.num_samples_limit=4")
    recipe = load_recipe(path, overrides)
    history = Trainer(recipe, progress=False).train()
    assert [r["step"] for r in history if "loss" in r] == [1, 2]
    assert all(("mtp_loss" in r) == bool(recipe.moe.mtp_loss_coef) for r in history if "loss" in r)
    final = tmp_path / "final"
    if recipe.peft is None:
        loaded = AutoModelForCausalLM.from_pretrained(final)
        assert (getattr(loaded, "mtp", None) is not None) == (family == "ernie4_5_moe_mtp")
    else:
        assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
        if recipe.checkpoint.merge:
            AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.betas", [0.9], "optimizer.betas must be 2 values"),
    ("optimizer.betas", ["a", 0.9], "optimizer.betas must be float, got 'a'"),
    ("optimizer.betas", [1.5, 0.9], "optimizer.betas must be in [0, 1)"),
    ("optimizer.lr", -1, "optimizer.lr must be >= 0"),
    ("optimizer.lr", "nan", "optimizer.lr must be >= 0"),
    ("optimizer.max_grad_norm", 0, "optimizer.max_grad_norm must be > 0 or null"),  # 0 would zero every gradient
    ("step.num_epochs", 0, "step.num_epochs must be >= 1 or null"),
    ("step.val_every_steps", -2, "step.val_every_steps must be >= 0"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps must be >= 0"),
    ("checkpoint.dir", "", "checkpoint.dir"),
    ("lr_scheduler.warmup_steps", -3, "lr_scheduler.warmup_steps must be >= 0"),
    ("lr_scheduler.min_lr", 1e-4, "lr_scheduler.min_lr applies to decay cosine, not linear"),
    ("moe_metrics.detailed_every_steps", 2, "moe_metrics.detailed_every_steps applies to mode detailed"),
    ("distributed.fsdp", 0, "distributed.fsdp must be >= 1 or null"),
    ("seed", 2 ** 64, "seed must be in [0, 2**63)"),
])
def test_values_out_of_range_are_errors_naming_the_key(key, value, message):
    """Refused when the recipe is read, not left to a run that silently does something else (no clipping, no
    training, a checkpoint every step, min_lr ignored) or to torch's error without the key."""
    data = {"model": {"name_or_path": "x"}, "dataset": {"kind": "text", "path": "x.txt"},
            "lr_scheduler": {"decay": "linear"}}
    section, _, name = key.rpartition(".")
    (data.setdefault(section, {}) if section else data)[name] = value
    with pytest.raises(RecipeError, match=re.escape(message)):
        build_recipe(data)


@pytest.mark.parametrize("text, message", [
    ("optimizer:\n  lr: 1.0e-3\n  lr: 1.0e-5\n", "line 5: key 'lr' is given twice"),
    ("optimizer: {lr: 1.0e-3}\nstep: {max_steps: 3}\noptimizer: {lr: 2.0e-3}\n",
     "line 5: key 'optimizer' is given twice"),
])
def test_a_key_given_twice_is_an_error(text, message, tmp_path):
    """YAML itself keeps the last value silently; a recipe names the repeated key."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name_or_path: x}\ndataset: {kind: text, path: x.txt}\n" + text)
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)


# NeMo AutoModel's own ERNIE recipe (NVIDIA-NeMo/Automodel examples/llm_finetune/ernie4_5/
# ernie4_5_21b_a3b_hellaswag.yaml, its ci section left out), the data paths made local ones.
NEMO_RECIPE = """
recipe: TrainFinetuneRecipeForNextTokenPrediction
step_scheduler: {global_batch_size: 8, local_batch_size: 1, ckpt_every_steps: 25, val_every_steps: 100,
                 max_steps: 100, num_epochs: 1}
dist_env: {backend: nccl, timeout_minutes: 60}
rng: {_target_: nemo_automodel.components.training.rng.StatefulRNG, seed: 1111, ranked: true}
model:
  _target_: nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: demo/pydoc-moe
  torch_dtype: bfloat16
  backend: {_target_: nemo_automodel.components.models.common.BackendConfig, attn: te, experts: torch_mm}
checkpoint: {enabled: true, checkpoint_dir: checkpoints/x/, model_save_format: safetensors, save_consolidated: false}
distributed: {strategy: fsdp2, tp_size: 1, cp_size: 1, pp_size: 1, ep_size: 8, sequence_parallel: false,
              activation_checkpointing: true}
loss_fn: {_target_: nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy}
dataset: {_target_: nemo_automodel.components.datasets.llm.hellaswag.HellaSwag,
          path_or_dataset: recipes/data/hellaswag_train.jsonl, split: train}
packed_sequence: {packed_sequence_size: 0}
dataloader: {_target_: torchdata.stateful_dataloader.StatefulDataLoader, shuffle: true}
validation_dataset: {_target_: nemo_automodel.components.datasets.llm.hellaswag.HellaSwag,
                     path_or_dataset: recipes/data/hellaswag_val.jsonl, split: validation, num_samples_limit: 64}
optimizer: {_target_: torch.optim.Adam, betas: [0.9, 0.95], eps: 1e-7, lr: 1.0e-5, weight_decay: 0.0}
moe_metrics: {enabled: true, mode: detailed, detailed_every_steps: 10, top_k_experts: 3}
"""


def test_a_nemo_recipe_is_one_error_naming_every_key_moelm_does_not_take(tmp_path):
    path = tmp_path / "nemo.yaml"
    path.write_text(NEMO_RECIPE)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert "\n" not in message
    unsupported = ["recipe", "step_scheduler", "dist_env", "rng", "loss_fn", "packed_sequence", "dataloader",
                   "model._target_", "model.pretrained_model_name_or_path", "model.torch_dtype", "model.backend",
                   "checkpoint.enabled", "checkpoint.checkpoint_dir", "checkpoint.model_save_format",
                   "distributed.strategy", "distributed.cp_size", "distributed.ep_size",
                   "distributed.sequence_parallel", "dataset._target_", "dataset.path_or_dataset", "dataset.split",
                   "validation_dataset.split", "optimizer._target_"]
    assert all(f"'{key}'" in message for key in unsupported), message
    for key in ("'optimizer.lr'", "'optimizer.betas'", "'moe_metrics", "'validation_dataset.num_samples_limit'",
                "'distributed.activation_checkpointing'", "'model.backend.", "'step_scheduler."):
        assert key not in message  # moelm's own keys, and the keys under a section it does not take at all
    assert "step_scheduler is step" in message and "checkpoint.checkpoint_dir is checkpoint.dir" in message
