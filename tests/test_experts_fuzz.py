"""moelm experts / moelm prune on config branches the hand-set tests do not reach (no shared expert, two, top-1,
top-E, MoE layers from 0 or every other layer, PhiMoE's jitter masking more or fewer experts): the report against
an oracle from the router logits the model returns, and a pruned model against the original with the dropped
experts' router logits at -inf (ERNIE: the correction bias chooses among the kept experts' probabilities)."""
from __future__ import annotations

import math

import pytest
import torch

from moelm import AutoModelForCausalLM
from moelm.config.named import NAMED_CONFIGS
from moelm.experts import prune as pr
from moelm.experts import report as rp
from moelm.models.modeling import moe_blocks
from moelm.train.data import collate
from reference import randomise
from test_experts import examples, expert_out

CONFIGS = [
    ("ernie4_5_moe-tiny", dict(moe_num_experts=5, moe_k=1, moe_num_shared_experts=0, moe_layer_start_index=0,
                               moe_layer_interval=2)),
    ("ernie4_5_moe-tiny", dict(moe_num_experts=4, moe_k=4, moe_num_shared_experts=2)),
    ("ernie4_5_moe-tiny", dict(moe_num_experts=6, moe_k=3, num_hidden_layers=2, moe_layer_end_index=0,
                               moe_layer_start_index=0)),
    ("phimoe-tiny", dict(num_local_experts=3, num_hidden_layers=1, router_jitter_noise=0.3)),
    ("phimoe-tiny", dict(num_local_experts=6, num_hidden_layers=2, router_jitter_noise=0.0)),
]


def model_of(name, over, seed=0):
    cls, kwargs = NAMED_CONFIGS[name]
    model = AutoModelForCausalLM.from_config(cls(**{**kwargs, **over}), seed=seed, fast=False)
    randomise(model, seed)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            if hasattr(block, "moe_statics"):  # a bias large enough to change choices, different per expert
                block.moe_statics.e_score_correction_bias.mul_(4)
    return model.eval()


def sparsemixer_oracle(logits, eps):
    """Per token: two picks, each of the largest score left, weighted by its softmax over the scores not further
    below it than 2 eps (relatively)."""
    index, weights = [], []
    for row in logits.tolist():
        left, picks = list(row), []
        for _ in range(2):
            top = max(left)
            j = left.index(top)
            near = [s for s in left if s > -math.inf and (top - s) / max(abs(s), top) <= 2 * eps]
            picks.append((j, math.exp(top) / sum(math.exp(s) for s in near)))
            left[j] = -math.inf
        index.append([j for j, _ in picks])
        weights.append([w for _, w in picks])
    return torch.tensor(weights), torch.tensor(index)


def route(block, logits, dropped=()):
    """weights [T, K], index [T, K] from router logits [T, E], the dropped experts' logits at -inf."""
    logits = logits.float().clone()
    logits[:, list(dropped)] = -math.inf
    if not hasattr(block, "moe_statics"):
        return sparsemixer_oracle(logits, block.config.router_jitter_noise)
    probs = logits.softmax(-1)
    score = probs + block.moe_statics.e_score_correction_bias.reshape(-1)
    score[:, list(dropped)] = -math.inf
    index = score.topk(block.config.moe_k, -1).indices
    weights = probs.gather(-1, index)
    return weights / weights.sum(-1, keepdim=True), index


@pytest.mark.parametrize("name,over", CONFIGS)
def test_report_against_router_logits(name, over):
    model = model_of(name, over)
    data = examples([9, 2, 6, 1, 7], model.config.vocab_size, seed=3)
    report = rp.build(rp.record(model, data, batch_size=3, pad_id=0), model, name,
                      {"path": "-", "kind": "text", "examples": 5})
    blocks = moe_blocks(model)
    e, layers = blocks[0][1].experts.num_experts, {x["layer"]: x for x in report["layers"]}
    assert sorted(layers) == [i for i, _ in blocks] and report["data"]["tokens"] == 25
    stats = {i: dict(tokens=torch.zeros(e), gate=torch.zeros(e), reap=torch.zeros(e), norm=torch.zeros(e),
                     coact=torch.zeros(e, e), overlap=0.0) for i, _ in blocks}
    for start in (0, 3):
        batch = collate(data[start:start + 3], 0)
        inputs = {}
        hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in blocks]
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True)
        for h in hooks:
            h.remove()
        mask = batch["attention_mask"].bool()
        for (i, block), logits in zip(blocks, out.router_logits):
            weights, index = route(block, logits)
            x, s = inputs[i].reshape(-1, inputs[i].shape[-1]), stats[i]
            hot = torch.zeros(len(x), e).scatter_(1, index, 1) * mask.reshape(-1, 1)
            for t in mask.reshape(-1).nonzero().flatten().tolist():
                for j, w in zip(index[t].tolist(), weights[t].tolist()):
                    with torch.no_grad():
                        n = float(expert_out(block, j, x[t]).norm())
                    s["tokens"][j] += 1
                    s["gate"][j] += w
                    s["norm"][j] += n
                    s["reap"][j] += w * n
            s["coact"] += hot.T @ hot
            rows = hot.reshape(*mask.shape, e)
            s["overlap"] += float((rows[:, 1:] * rows[:, :-1]).sum())
    for i, s in stats.items():
        x, t = layers[i], s["tokens"]
        assert x["tokens"] == t.long().tolist() and x["coactivation"] == s["coact"].long().tolist()
        close = dict(rtol=1e-4, atol=1e-5, check_dtype=False)
        torch.testing.assert_close(torch.tensor(x["gate_mass"]), s["gate"], **close)
        for key, total in (("mean_gate", "gate"), ("mean_output_norm", "norm"), ("reap", "reap")):
            torch.testing.assert_close(torch.tensor(x[key]), s[total] / t.clamp(min=1), **close)
        share = t / t.sum()
        torch.testing.assert_close(torch.tensor(x["load_share"]), share, **close)
        assert x["cv"] == pytest.approx(float(t.std() / t.mean()), rel=1e-6)
        assert x["dead_expert_frac"] == pytest.approx(float((t == 0).float().mean()))
        entropy = -sum(p * math.log(p) for p in share.tolist() if p > 0)
        assert x["expert_diversity"] == pytest.approx(math.exp(entropy) / e, rel=1e-6)
        assert x["adjacent_overlap"] == pytest.approx(s["overlap"] / 20)  # adjacent real pairs: 8+1+5+0+6


@pytest.mark.parametrize("name,over", [CONFIGS[0], CONFIGS[2], CONFIGS[4]])
def test_pruned_equals_original_with_dropped_logits_masked(name, over):
    """Each pruned MoE block, on the inputs the original's got, routes and outputs as the original block with the
    dropped experts' router logits at -inf before the choice (ERNIE: the bias added to the kept probabilities)."""
    model = model_of(name, over, seed=2)
    data = examples([12, 8], model.config.vocab_size, seed=4)
    report = rp.build(rp.record(model, data, 2), model, name, {"path": "-", "kind": "text", "examples": 2})
    keep = pr.chosen(report, 0.5, "reap")
    inputs, want = {}, {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, b in moe_blocks(model)]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([data[0].input_ids]), output_router_logits=True)
        for h in hooks:
            h.remove()
        for (i, block), logits in zip(moe_blocks(model), out.router_logits):
            weights, index = route(block, logits, [j for j in range(report["num_experts"]) if j not in keep[i]])
            x = inputs[i]
            expected = torch.stack([sum(w * expert_out(block, j, x[t]) for j, w in zip(index[t].tolist(), weights[t]))
                                    for t in range(len(x))])
            if getattr(block, "shared_experts", None) is not None:
                expected = expected + block.shared_experts(x)
            want[i] = ([[keep[i].index(j) for j in row] for row in index.tolist()], expected)
        pr.prune(model, keep)
        for i, block in moe_blocks(model):
            _, index = block.routed(torch.nn.functional.linear(inputs[i], block.gate.weight))
            assert index.tolist() == want[i][0]
            torch.testing.assert_close(block(inputs[i][None])[0][0], want[i][1], rtol=1e-4, atol=1e-5)
