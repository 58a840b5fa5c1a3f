"""NeMo AutoModel's load-balance metrics in the finetune loop (recipe section moe_metrics), on tiny MoE checkpoints
whose routers are set by hand so that the loads are known: ERNIE MoE with a zero router (uniform probabilities) and
a correction bias choosing two experts for every token; PhiMoE with every token's router input made one vector
(post-attention LayerNorm weight 0, bias a unit vector) and router rows giving the logits [30, 10, 10, -30], so the
sparsemixer always picks expert 0 first and samples experts 1 or 2 second (argmax, the inference routing, would
take expert 1 every time), never expert 3. lr 0 keeps the routers as set. The metrics are checked against values
computed here from their formulas, and the loads handed to them (spied) against the tokens of the step: padding
excluded, every micro-batch, every rank (EP over 2 processes), an activation-checkpointing recomputation not
counted twice."""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

import moelm.train.trainer as trainer_module
from moelm import AutoModelForCausalLM
from moelm.models.scaffold import new_checkpoint
from moelm.train.recipe import build_recipe
from moelm.train.trainer import Trainer
from test_finetune import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_finetune_dist import recipe_dict, write_hellaswag
from test_parallel import launch

ERNIE_CHOICE = {1: (0, 1), 2: (0, 5)}  # MoE layer -> the two experts its bias chooses (of 8)
PHI_LOGITS = [30.0, 10.0, 10.0, -30.0]


@pytest.fixture(autouse=True)
def one_thread_per_worker(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    write_hellaswag(root / "train.jsonl")
    path = new_checkpoint("ernie4_5_moe-tiny", root / "ernie", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, fast=False)
    assert model.config.moe_layers() == sorted(ERNIE_CHOICE)
    with torch.no_grad():
        for i, chosen in ERNIE_CHOICE.items():
            block = model.model.layers[i].mlp
            block.gate.weight.zero_()
            bias = torch.zeros(8)
            bias[list(chosen)] = torch.tensor([0.3, 0.2])
            bias[3] = -1.0
            block.moe_statics.e_score_correction_bias.copy_(bias[None])
    model.save_pretrained(path)
    path = new_checkpoint("phimoe-tiny", root / "phimoe", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, fast=False)
    model.config.input_jitter_noise, model.config.router_jitter_noise = 0.0, 0.01
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.zero_()
            layer.post_attention_layernorm.bias.zero_()
            layer.post_attention_layernorm.bias[0] = 1.0
            layer.block_sparse_moe.gate.weight.zero_()
            layer.block_sparse_moe.gate.weight[:, 0] = torch.tensor(PHI_LOGITS)
    model.save_pretrained(path)
    new_checkpoint("ernie4_5-tiny", root / "dense", seed=0)
    return root


def make_recipe(root: Path, family: str, out: Path, steps: int = 3, **moe_metrics) -> dict:
    recipe = recipe_dict(str(root / family), str(root / "train.jsonl"), str(out), steps=steps)
    recipe["optimizer"]["lr"] = 0.0
    recipe["moe"] = {"aux_loss_coef": 0.01, "gate_bias_update_factor": 0.0} if family != "dense" else {}
    recipe["checkpoint"]["every_steps"] = 0
    if moe_metrics:
        recipe["moe_metrics"] = moe_metrics
    return recipe


class Spy:
    """The loads the trainer hands balance_metrics, per call."""

    def __init__(self, monkeypatch):
        self.calls: list[list[torch.Tensor]] = []
        real = trainer_module.balance_metrics

        def spy(loads, **kwargs):
            self.calls.append([load.clone() for load in loads])
            return real(loads, **kwargs)
        monkeypatch.setattr(trainer_module, "balance_metrics", spy)


def run(recipe: dict) -> tuple[list[dict], Trainer]:
    trainer = Trainer(build_recipe(copy.deepcopy(recipe)), progress=False)
    return trainer.train(), trainer


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def padded_positions(trainer: Trainer, step: int) -> int:
    """Positions (tokens and padding) of the micro-batches of step `step` (1-based)."""
    return sum(b["attention_mask"].numel() for b in trainer.micro_batches(trainer.global_batch(step - 1)))


def by_hand(loads: list[list[float]], layers: list[int]) -> dict[str, float]:
    """The brief metrics from NeMo's definitions: cv = unbiased std / mean per layer; utilization = load / (sum /
    E); dead = the share of experts with no token; diversity = exp(entropy of load / sum) / E."""
    cvs = [statistics.stdev(x) / statistics.mean(x) for x in loads]
    util = sorted(v / (sum(x) / len(x)) for x in loads for v in x)
    dead = [sum(v == 0 for v in x) / len(x) for x in loads]
    div = [math.exp(-sum(v / sum(x) * math.log(v / sum(x)) for v in x if v)) / len(x) for x in loads]
    n = len(util)
    out = {"moe/cv_mean": sum(cvs) / len(cvs), "moe/cv_max": max(cvs), "moe/cv_min": min(cvs),
           "moe/expert_utilization_min": util[0], "moe/expert_utilization_max": util[-1],
           "moe/expert_utilization_median": statistics.median(util), "moe/expert_utilization_p25": util[n // 4],
           "moe/expert_utilization_p75": util[3 * n // 4], "moe/dead_expert_frac_mean": sum(dead) / len(dead),
           "moe/expert_diversity_mean": sum(div) / len(div), "moe/expert_diversity_min": min(div)}
    for i, x in zip(layers, loads):
        for j, v in enumerate(x):
            out[f"util/{i}/{j}"] = v / (sum(x) / len(x))
    return out


def assert_metrics(record: dict, expected: dict):
    for key, value in expected.items():
        if not key.startswith("util/"):
            assert record[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    for key, value in record.items():  # the experts logged one by one
        if key.startswith("moe_expert_utilization/layer_"):
            layer, expert = key.removeprefix("moe_expert_utilization/layer_").split("_expert_")
            assert value == pytest.approx(expected[f"util/{layer}/{expert}"], rel=1e-12), key


def test_ernie_brief_metrics_equal_the_hand_computed(root, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    recipe = make_recipe(root, "ernie", tmp_path / "out")
    recipe["step"]["log_every_steps"] = 2
    history, trainer = run(recipe)
    assert [r["step"] for r in history] == [1, 2, 3]
    assert not any(k.startswith("moe") for k in history[0])  # step 1 is not logged
    records = logged(tmp_path / "out")
    assert [r["step"] for r in records] == [2, 3]
    assert len(spy.calls) == 2
    for record, loads in zip(records, spy.calls):
        n = record["tokens"]  # the global batch's tokens: every micro-batch, no padding
        assert n < padded_positions(trainer, record["step"])  # there was padding to leave out
        expected = []
        for layer, chosen in ERNIE_CHOICE.items():
            expected.append([float(n) if e in chosen else 0.0 for e in range(8)])
        assert [x.tolist() for x in loads] == expected
        hand = by_hand(expected, list(ERNIE_CHOICE))
        assert hand["moe/dead_expert_frac_mean"] == 0.75 and hand["moe/expert_diversity_mean"] == 0.25
        assert hand["moe/cv_mean"] == pytest.approx(4 * math.sqrt(3 / 14))
        assert_metrics(record, hand)
        assert record["moe_expert_utilization/layer_1_expert_0"] == 4.0  # the most used, and expert 3 unused
        assert record["moe_expert_utilization/layer_1_expert_3"] == 0.0
        assert not any(k.startswith("moe/layer_") for k in record)  # brief


def test_detailed_mode_top_k_and_off(root, tmp_path, monkeypatch):
    detailed = make_recipe(root, "ernie", tmp_path / "detailed", mode="detailed", detailed_every_steps=2,
                           top_k_experts=0)
    records = run(detailed)[0]
    assert [("moe/layer_1/cv" in r, "moe/cv_mean" in r) for r in records] == [(False, True), (True, True),
                                                                              (False, True)]
    step2 = records[1]
    for i in ERNIE_CHOICE:
        assert step2[f"moe/layer_{i}/cv"] == pytest.approx(4 * math.sqrt(3 / 14), rel=1e-12)
        assert step2[f"moe/layer_{i}/dead_expert_frac"] == 0.75
        assert step2[f"moe/layer_{i}/expert_diversity"] == pytest.approx(0.25, rel=1e-12)
        assert step2[f"moe/layer_{i}/utilization_mean"] == pytest.approx(1.0, rel=1e-12)
    assert "moe/layer_0/cv" not in step2  # layer 0 is dense
    assert not any(k.startswith("moe_expert_utilization/") for r in records for k in r)  # top_k_experts 0
    off = run(make_recipe(root, "ernie", tmp_path / "off", enabled=False))[0]
    assert off and not any(k.startswith("moe") for r in off for k in r)
    assert not any(k.startswith("moe") for r in logged(tmp_path / "off") for k in r)


def test_dense_model_logs_no_balance_metrics(root, tmp_path):
    records = run(make_recipe(root, "dense", tmp_path / "out", steps=2, mode="detailed"))[0]
    assert [r["step"] for r in records] == [1, 2]
    assert not any(k.startswith("moe") for r in records for k in r)


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_phimoe_logs_the_sampled_choice(activation_checkpointing, root, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    recipe = make_recipe(root, "phimoe", tmp_path / "out", steps=2)
    recipe["distributed"] = {"activation_checkpointing": activation_checkpointing}
    records = run(recipe)[0]
    assert len(spy.calls) == 2
    for record, loads in zip(records, spy.calls):
        n = record["tokens"]
        assert len(loads) == 2
        for load in loads:  # first pick expert 0; second expert 1 or 2 as sampled, both seen; never expert 3
            first, one, two, dead = load.tolist()
            assert (first, one + two, dead) == (n, n, 0.0)  # not twice that with the recomputation
            assert one > 0 and two > 0
        hand = by_hand([x.tolist() for x in loads], [0, 1])
        assert hand["moe/dead_expert_frac_mean"] == 0.25  # inference routing (argmax) would leave 2 of 4
        assert_metrics(record, hand)


def ep_worker(rank, world, port, recipe: dict, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    calls = []
    real = trainer_module.balance_metrics

    def spy(loads, **kwargs):
        calls.append([load.tolist() for load in loads])
        return real(loads, **kwargs)
    trainer_module.balance_metrics = spy
    history = Trainer(build_recipe(recipe), progress=False).train()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"history": history, "loads": calls}))


def test_expert_parallel_loads_are_summed_over_ranks(root, tmp_path):
    recipe = make_recipe(root, "ernie", tmp_path / "out", steps=2)
    recipe["distributed"] = {"ep": 2}
    launch(ep_worker, 2, recipe, str(tmp_path))
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    records = logged(tmp_path / "out")
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes
    for rank in found:
        for record, loads in zip(rank["history"], rank["loads"]):
            n = record["tokens"]  # the global batch: both ranks' micro-batches
            assert loads == [[float(n) if e in chosen else 0.0 for e in range(8)] for chosen in ERNIE_CHOICE.values()]
    for record, written in zip(found[0]["history"], records):
        assert {k: v for k, v in written.items() if k.startswith("moe")} == \
            {k: v for k, v in record.items() if k.startswith("moe")}
        assert_metrics(written, by_hand(found[0]["loads"][written["step"] - 1], list(ERNIE_CHOICE)))
