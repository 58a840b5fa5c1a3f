"""Fine-tuning on torch.distributed where test_finetune_dist.py does not go: PhiMoE's sampled routing (random numbers
per micro-batch, whichever rank runs it), and an ERNIE-MoE run with every awkward edge at once (dense and MoE layers
interleaved, untied embeddings, a dataset that is no multiple of the batch, truncated records, epochs reshuffled,
validation, experts that get no token) resumed past an epoch boundary: the same figures as one process."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from moelm import AutoModelForCausalLM
from moelm.config import named_config
from moelm.models.scaffold import new_checkpoint
from moelm.train.recipe import build_recipe
from moelm.train.trainer import Trainer
from test_finetune_dist import assert_same_weights, recipe_dict, write_hellaswag
from test_parallel import launch


def random_model(root: Path, name: str, **overrides) -> str:
    """A tiny checkpoint (with its tokenizer) of the named config changed by `overrides`, every weight random."""
    from reference import randomise

    path = new_checkpoint(name, root / "model", seed=0)
    config = named_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = randomise(AutoModelForCausalLM.from_config(config, fast=False), seed=1)
    with torch.no_grad():  # ERNIE: every token to experts 0 and 1 (rank 0's under ep 2): rank 1's get none
        for n, p in model.named_parameters():
            if n.endswith("e_score_correction_bias"):
                p.copy_(torch.tensor([10.0, 10.0] + [0.0] * (p.shape[-1] - 2)).expand_as(p))
    model.save_pretrained(path)
    return str(path)


def records(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in history]


def history_worker(rank, world, port, recipe: dict, resume, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    history = Trainer(build_recipe(recipe), resume=resume, progress=False).train()
    Path(out, f"rank{rank}.json").write_text(json.dumps(records(history)))


def assert_same_records(found: list[dict], expected: list[dict]):
    assert [sorted(r) for r in found] == [sorted(r) for r in expected]
    for a, b in zip(found, expected):
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (b["step"], key)


def run_both(recipe: dict, tmp_path: Path, world: int = 2) -> list[dict]:
    """One process's history; the sharded run's, checked equal on every rank, and the same final weights."""
    one = records(Trainer(build_recipe(dict(recipe, distributed={})), progress=False).train())
    sharded = dict(recipe, checkpoint=dict(recipe["checkpoint"], dir=str(tmp_path / "sharded")))
    launch(history_worker, world, sharded, None, str(tmp_path))
    for rank in range(world):
        assert_same_records(json.loads((tmp_path / f"rank{rank}.json").read_text()), one)
    assert_same_weights(tmp_path / "sharded" / "final", Path(recipe["checkpoint"]["dir"]) / "final")
    return one


@pytest.fixture(autouse=True)
def one_thread_per_worker(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_phimoe_sampled_routing_matches_one_process(tmp_path):
    """PhiMoE trains with the sparsemixer's sampled picks and input jitter: under ep 2 (and fsdp 2) each rank draws
    the random numbers one process draws for the same micro-batches."""
    ckpt = random_model(tmp_path, "phimoe-tiny", input_jitter_noise=0.05)
    write_hellaswag(tmp_path / "train.jsonl", n=8)
    recipe = recipe_dict(ckpt, str(tmp_path / "train.jsonl"), str(tmp_path / "one"), steps=2, ep=2)
    recipe["moe"] = {"aux_loss_coef": 0.01}
    recipe["peft"] = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3, "target_modules": ["q_proj", "v_proj"]}
    run_both(recipe, tmp_path)


def test_uneven_data_validation_idle_experts_and_resume_match_one_process(tmp_path):
    """ERNIE-MoE, layer 1 MoE and layers 0, 2 dense, untied, a shared expert; 13 records (3 global batches of 4 an
    epoch, one left out, reshuffled each epoch) cut to 16 tokens from the left; validated every 2 steps; rank 1's
    experts get no token; then steps 5-6 resumed from step 4 (past the epoch boundary) under ep 2 continue exactly."""
    ckpt = random_model(tmp_path, "ernie4_5_moe-tiny", moe_layer_start_index=0, moe_layer_interval=2,
                        tie_word_embeddings=False)
    write_hellaswag(tmp_path / "train.jsonl", n=13)
    write_hellaswag(tmp_path / "val.jsonl", n=3, seed=1)
    recipe = recipe_dict(ckpt, str(tmp_path / "train.jsonl"), str(tmp_path / "one"), steps=6, ep=2)
    recipe["step"].update(global_batch_size=4, local_batch_size=1, val_every_steps=2)
    recipe["dataset"].update(seq_length=16, truncation="left")
    recipe["validation_dataset"] = {"kind": "hellaswag", "path": str(tmp_path / "val.jsonl")}
    recipe["checkpoint"]["every_steps"] = 4
    one = run_both(recipe, tmp_path)
    assert [r["step"] for r in one if "val_loss" in r] == [2, 4, 6]
    assert [r for r in one if "loss" in r][-1]["moe/dead_expert_frac_mean"] == 0.75  # experts 2-7 idle
    again = dict(recipe, checkpoint=dict(recipe["checkpoint"], dir=str(tmp_path / "again")))
    launch(history_worker, 2, again, str(tmp_path / "sharded" / "step_4"), str(tmp_path))
    assert_same_records(json.loads((tmp_path / "rank0.json").read_text()), one[4:])
    assert_same_weights(tmp_path / "again" / "final", tmp_path / "sharded" / "final", atol=0)
