"""Fine-tuning on torch.distributed (gloo, processes spawned here): FSDP2 over 2 ranks, EP over 2 ranks (dense
weights FSDP-sharded over the same 2), and FSDP2 x EP over 4 ranks (each rank's experts FSDP-sharded over the 2
ranks holding them) give the same losses and the same final weights as one process; the final checkpoint written
under sharding holds every expert; resuming a sharded run continues exactly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from moelm import AutoModelForCausalLM
from moelm.io.weights import SafetensorsCheckpoint
from moelm.models.scaffold import new_checkpoint
from moelm.train.recipe import build_recipe
from moelm.train.trainer import Trainer
from test_parallel import launch

# name -> (world, distributed section, variant: fp32 full fine-tune, LoRA, or bf16 weights with fp32 routers)
LAYOUTS = {"fsdp2": (2, {"ep": 1}, "full"), "ep2": (2, {"ep": 2}, "full"), "fsdp4-ep2": (4, {"ep": 2}, "full"),
           "fsdp4-ep2-lora": (4, {"ep": 2}, "lora"), "ep2-bf16": (2, {"ep": 2}, "bf16")}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}


def write_hellaswag(path: Path, n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    words = "the cat sat on a mat and then it ran to the dog who was happy with a red ball".split()

    def text(k):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"ctx": text(6), "endings": [text(int(torch.randint(2, 6, (1,), generator=g)))
                                                              for _ in range(4)],
                                "label": int(torch.randint(4, (1,), generator=g))}) + "\n")


def recipe_dict(ckpt: str, data: str, out: str, steps: int = 4, variant: str = "full", **distributed) -> dict:
    return {**({"peft": LORA} if variant == "lora" else {}),
        "seed": 3, "model": {"name_or_path": ckpt, "dtype": "bfloat16" if variant == "bf16" else "float32"},
        "dataset": {"kind": "hellaswag", "path": data, "seq_length": 64},
        "step": {"global_batch_size": 8, "local_batch_size": 2, "max_steps": steps},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 0.5},
        "lr_scheduler": {"warmup_steps": 1, "decay": "cosine"},
        "moe": {"aux_loss_coef": 0.01, "gate_bias_update_factor": 0.01},
        "distributed": distributed, "checkpoint": {"dir": out, "every_steps": 2, "keep_last": 3},
    }


def tiny_moe_run(root):
    """root with model/ (the tiny ERNIE-MoE, every weight randomised) and train.jsonl (HellaSwag records)."""
    from reference import randomise

    path = new_checkpoint("ernie4_5_moe-tiny", root / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, fast=False)
    randomise(model, seed=1)
    model.save_pretrained(path)
    write_hellaswag(root / "train.jsonl")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tiny_moe_run(tmp_path_factory.mktemp("finetune_dist"))
    path = root / "model"
    losses = {}
    for variant in ("full", "lora", "bf16"):
        out = root / f"one-{variant}"
        history = Trainer(build_recipe(recipe_dict(str(path), str(root / "train.jsonl"), str(out), variant=variant)),
                          progress=False).train()
        losses[variant] = [r["loss"] for r in history]
    return root, str(path), losses


def train_worker(rank, world, port, recipe: dict, resume, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    history = Trainer(build_recipe(recipe), resume=resume, progress=False).train()
    Path(out, f"rank{rank}.json").write_text(json.dumps([r["loss"] for r in history if "loss" in r]))


def assert_same_weights(a: Path, b: Path, atol: float = 2e-5):
    """The same tensor names and values in two checkpoints (hub model or PEFT adapter)."""
    x, y = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    try:
        assert sorted(x.keys()) == sorted(y.keys())
        for key in y.keys():
            torch.testing.assert_close(x.get(key), y.get(key), rtol=1e-4, atol=atol, msg=key)
    finally:
        x.close()
        y.close()


@pytest.fixture(autouse=True)
def one_thread_per_worker(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_training_matches_one_process(layout, setup, tmp_path):
    root, ckpt, losses = setup
    world, distributed, variant = LAYOUTS[layout]
    recipe = recipe_dict(ckpt, str(root / "train.jsonl"), str(tmp_path / "out"), variant=variant, **distributed)
    launch(train_worker, world, recipe, None, str(tmp_path))
    bf16 = variant == "bf16"  # bf16 sums in another order round differently: close, not equal
    for rank in range(world):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(found), torch.tensor(losses[variant]), rtol=2e-2 if bf16 else 1e-5,
                                   atol=1e-6)
    # written under sharding: every expert (or every expert's adapter), the correction biases, as one process did
    one = root / f"one-{variant}"
    for name in ("final", "step_2"):
        assert_same_weights(tmp_path / "out" / name, one / name, atol=2e-2 if bf16 else 2e-5)
    if variant == "lora":  # peft's packing of every expert: A [E * r, in], B [out, r * E]
        experts = json.loads(Path(ckpt, "config.json").read_text())["moe_num_experts"] * LORA["r"]
        with SafetensorsCheckpoint(tmp_path / "out" / "final") as adapter:
            shapes = {k: adapter.shape(k) for k in adapter.keys() if ".experts." in k}
        assert shapes and all(s[0 if ".lora_A." in k else 1] == experts for k, s in shapes.items()), shapes


def test_sharded_resume_continues_exactly(setup, tmp_path):
    """Steps 3-4 resumed from an EP x FSDP checkpoint of step 2 equal the uninterrupted run's."""
    root, ckpt, _ = setup
    first = recipe_dict(ckpt, str(root / "train.jsonl"), str(tmp_path / "out"), ep=2)
    first["step"]["max_steps"] = 4
    first["checkpoint"]["every_steps"] = 2
    launch(train_worker, 2, first, None, str(tmp_path))
    full = json.loads((tmp_path / "rank0.json").read_text())
    launch(train_worker, 2, dict(first, checkpoint=dict(first["checkpoint"], dir=str(tmp_path / "again"))),
           str(tmp_path / "out" / "step_2"), str(tmp_path))
    resumed = json.loads((tmp_path / "rank0.json").read_text())
    assert resumed == full[2:]
    assert_same_weights(tmp_path / "again" / "final", tmp_path / "out" / "final", atol=0)
