"""Edges of the CPU decode paths (decode_layer / decode_layers / moe_block) that an adversarial pass over issue 21
(points 3-4 and the bf16 PhiMoE layer) found wrong, and quick checks that held: a hook on a decoder layer's parts or a
global module hook fires at every decoding step (the step leaves the C call), a bf16 bias edited in place through
`.data` is seen (the C call reads the model's own tensor); the bf16 PhiMoE layer in one call against the layers op
by op with a sliding window, padding, speculative decoding and odd shapes, and served beside other requests; fp32
against transformers at head_dim 96; 16 and 17 rows."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

import moelm
from moelm.inference import kernels
from reference import random_checkpoint, randomise
from test_fast import _one_thread  # noqa: F401 (one thread for the module, as test_fast's)
from test_fast import kernels_forced as forced

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(not kernels.available(), reason="csrc/gemv.c kernels not available")]

ONE_CALL = "gemv"  # decode_layer / decode_layers / moe_block in C
PER_OP = "gemv,decode_layer=torch,moe_block=torch"  # the layers op by op, on the same projection kernels
_TMP = tempfile.TemporaryDirectory(prefix="moelm-decode-edges-")

CASES = {
    "ernie": ("ernie4_5-tiny", {"use_bias": True, "tie_word_embeddings": False}),
    "ernie-moe": ("ernie4_5_moe-tiny", {"moe_k": 3, "moe_num_shared_experts": 2, "use_bias": True}),
    "phimoe": ("phimoe-tiny", {"sliding_window": 8, "attention_bias": True, "lm_head_bias": True}),
    # head_dim 96, hidden 192 (a multiple of 32 and 64, not 128), one kv head, vocab 499, a window of 5
    "phimoe-hd96": ("phimoe-tiny", {"hidden_size": 192, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "intermediate_size": 96, "vocab_size": 499, "sliding_window": 5,
                                    "attention_bias": True}),
}


@functools.cache
def checkpoint(case: str) -> Path:
    return random_checkpoint(*CASES[case], Path(_TMP.name) / case)


def load(case: str, dtype=torch.float32):
    return moelm.AutoModelForCausalLM.from_pretrained(checkpoint(case), dtype=dtype).eval()


def prompts(batch: int, length: int = 6, vocab: int = 499, seed: int = 3):
    """Random prompts, rows after the first left-padded by 3, 1, 5, 2, ... tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        n = min((3, 1, 5, 2)[row % 4], length - 1)
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


@torch.no_grad()
def greedy(model, ids, mask, new: int = 6, **kwargs):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.scores).float()


def counting(monkeypatch) -> list:
    """Records each decoder layer run in one C call (by itself or in a whole step)."""
    calls = []
    one, whole = kernels.decode_layer, kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layer", lambda *a: calls.append(1) or one(*a))
    monkeypatch.setattr(kernels, "decode_layers", lambda specs, *a: calls.extend([1] * specs.count)
                        or whole(specs, *a))
    return calls


def close(a, b, rel: float, what: str):
    scale = float(b.abs().max())
    torch.testing.assert_close(a.float(), b.float(), rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ defects

def _hooked_decode(case: str, dtype, part: str, spec: str):
    """Greedy decode with a forward hook on layer 1's `part` that scales its output by 1.5; (hook calls, tokens,
    scores)."""
    model = load(case, dtype)
    target = model.model.layers[1].get_submodule(part)
    calls = []

    def hook(module, args, out):
        calls.append(1)
        return (out[0] * 1.5, *out[1:]) if isinstance(out, tuple) else out * 1.5

    target.register_forward_hook(hook)
    ids, mask = prompts(3)
    with forced(spec):
        tokens, scores = greedy(model, ids, mask)
    return len(calls), tokens, scores


@pytest.mark.parametrize("case,dtype,part", [
    ("ernie", torch.float32, "self_attn.o_proj"),
    ("ernie", torch.float32, "mlp"),
    ("ernie-moe", torch.float32, "input_layernorm"),
    ("phimoe", torch.bfloat16, "post_attention_layernorm"),
    ("phimoe", torch.float32, "self_attn"),
    ("ernie", torch.float32, "self_attn.q_proj"),  # fused with k/v: called alone only while it has a hook
    ("ernie", torch.bfloat16, "mlp.up_proj"),  # fused with gate_proj
    ("ernie-moe", torch.float32, "mlp.gate"),  # the routers: modules called on the hidden states (their logits)
    ("phimoe", torch.bfloat16, "block_sparse_moe.gate"),
])
def test_hook_on_a_layer_part_fires_at_every_step(case, dtype, part):
    """A forward hook on a part of a decoder layer runs at the prefill and at each of the 5 decoding steps, and the
    decode equals the layers op by op with the same hook; a projection fused with others (q/k/v, gate/up) is then
    called by itself."""
    calls, tokens, _ = _hooked_decode(case, dtype, part, ONE_CALL)
    want_calls, want_tokens, _ = _hooked_decode(case, dtype, part, PER_OP)
    assert want_calls == 6
    assert calls == want_calls, f"{case} {part}: the hook ran {calls} times, op by op {want_calls}"
    assert torch.equal(tokens, want_tokens)


def test_global_module_hook_sees_every_decoding_step():
    """torch.nn.modules.module.register_module_forward_hook: the norms of a 2-layer model are seen at the prefill
    and at every decoding step (2 layers x 2 norms + the final norm = 5 a forward), as op by op."""
    model = load("ernie")
    ids, mask = prompts(3)
    seen = {}
    for spec in (ONE_CALL, PER_OP):
        names = []

        def hook(mod, args, out, names=names):
            if type(mod).__name__.endswith("RMSNorm"):
                names.append(1)

        handle = torch_module.register_module_forward_hook(hook)
        try:
            with forced(spec):
                greedy(model, ids, mask, new=5)
        finally:
            handle.remove()
        seen[spec] = len(names)
    assert seen[PER_OP] == 5 * 5
    assert seen[ONE_CALL] == seen[PER_OP]


@pytest.mark.parametrize("case,part", [("phimoe", "post_attention_layernorm"), ("phimoe", "input_layernorm"),
                                       ("ernie", "self_attn.o_proj"), ("ernie", "mlp.down_proj")])
def test_bf16_bias_edited_through_data_is_seen(case, part):
    """A bf16 model decoded once (plans made), then a bias of layer 1 changed in place through `.data`: the next
    decode in one call equals the op-by-op one (which reads the bias itself)."""
    ids, mask = prompts(3)
    got = {}
    for spec in (ONE_CALL, PER_OP):
        model = load(case, torch.bfloat16)
        with forced(spec):
            greedy(model, ids, mask, new=2)
            model.model.layers[1].get_submodule(part).bias.data.add_(0.5)
            got[spec] = greedy(model, ids, mask)
    assert torch.equal(got[ONE_CALL][0], got[PER_OP][0])
    close(got[ONE_CALL][1], got[PER_OP][1], 2e-2, f"{case} {part}: logits")


def test_served_bf16_phimoe_equals_generate(tmp_path):
    """A bf16 PhiMoE (every weight random, a window of 6) in the serving engine: four requests at once, prompts
    prefilled beside decoding rows, give each prompt's own greedy `generate` tokens (the decoding steps' layers in
    one C call over the SlotCache). (int8/int4 models are exempt by design: docs/serving.md, a step's rows choose the
    kernel, so near ties may flip.)"""
    from moelm import AutoTokenizer
    from moelm.models.scaffold import new_checkpoint
    from moelm.serve.engine import Engine, SamplingParams

    path = new_checkpoint("phimoe-tiny", tmp_path, seed=0)
    model = moelm.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, sliding_window=6).eval()
    randomise(model, seed=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts_ = [tokenizer(t)["input_ids"] for t in ("Hello world", "The quick brown fox jumps over the lazy dog",
                                                     "a", "def add(a, b):")]
    want = [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None)[0, len(p):]
            .tolist() for p in prompts_]
    with Engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64).start() as engine:
        requests = [engine.submit(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)) for p in prompts_]
        got = [[t for out in r for t in out.token_ids] for r in requests]
    assert got == want


# ------------------------------------------------------------------ checks that hold

@pytest.mark.parametrize("case", ("phimoe", "phimoe-hd96"))
def test_bf16_phimoe_one_call_matches_op_by_op(case, monkeypatch):
    """A bf16 PhiMoE (LayerNorms, half-split rotation in bf16, sparsemixer in bf16) decoding past its sliding
    window with left padding: the one-call layers (counted) give the op-by-op tokens and logits. Several tokens a row
    (an assistant's check) are checked one step at a time from the same cache: there the attention of the op-by-op
    layers is PyTorch's over several queries, whose sums round differently from the one-call step's (1-2 bf16 steps
    of a logit; both as far from the whole sequence's forward), so logits within 2e-2 of the largest, not bit for bit,
    and whole assisted generations may part at a near tie of the router (seen on an AVX2-only CPU)."""
    from moelm.inference.cache import StaticCache

    model = load(case, torch.bfloat16)
    ids, mask = prompts(3, vocab=model.config.vocab_size)
    calls = counting(monkeypatch)
    with forced(ONE_CALL):
        fast = greedy(model, ids, mask, new=8)
        assert len(calls) == model.config.num_hidden_layers * 7  # every layer of the 7 decoding steps
    calls.clear()
    with forced(PER_OP):
        slow = greedy(model, ids, mask, new=8)
    assert not calls
    assert torch.equal(fast[0], slow[0]), f"{case}: tokens"
    assert torch.isfinite(fast[1][torch.isfinite(slow[1])]).all()
    close(fast[1], slow[1], 2e-2, f"{case}: logits")
    g = torch.Generator().manual_seed(1)
    for prompt, chunk in ((6, 2), (6, 3), (9, 4), (3, 3)):  # past the window (5 or 8) and within it
        seq = torch.randint(3, model.config.vocab_size, (2, prompt + chunk), generator=g)
        logits = {}
        for mode in (ONE_CALL, PER_OP):
            calls.clear()
            with forced(mode), torch.no_grad():
                cache = StaticCache(model.config, 2, 32, torch.bfloat16, torch.device("cpu"))
                cache = model(input_ids=seq[:, :prompt], past_key_values=cache, use_cache=True).past_key_values
                logits[mode] = model(input_ids=seq[:, prompt:], past_key_values=cache, use_cache=True).logits.float()
            assert bool(calls) == (mode == ONE_CALL)
        close(logits[ONE_CALL], logits[PER_OP], 2e-2, f"{case}: {chunk} tokens a row after {prompt}")


@pytest.mark.parametrize("batch,one_call", [(16, True), (17, False)])
def test_rows_up_to_max_rows_in_one_call(batch, one_call, monkeypatch):
    """16 padded rows decode in one call, 17 op by op; either way the tokens and logits (fp32, 1e-5) of the layers op
    by op, with a prompt of one token."""
    model = load("ernie-moe")
    ids, mask = prompts(batch, length=5, vocab=512)
    calls = counting(monkeypatch)
    with forced(ONE_CALL):
        got = greedy(model, ids, mask, new=4)
        assert bool(calls) == one_call
        single = greedy(model, ids[:1, -1:], mask[:1, -1:], new=4)
    with forced(PER_OP):
        want = greedy(model, ids, mask, new=4)
        want_single = greedy(model, ids[:1, -1:], mask[:1, -1:], new=4)
    for a, b in ((got, want), (single, want_single)):
        assert torch.equal(a[0], b[0])
        close(a[1], b[1], 1e-5, f"{batch} rows")


def test_fp32_head_dim_96_matches_transformers():
    """fp32 PhiMoE with head_dim 96, one kv head, vocab 499 and a window of 5, left-padded: the one-call decode
    gives transformers' tokens, scores to 1e-4."""
    transformers = pytest.importorskip("transformers")
    model = load("phimoe-hd96")
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("phimoe-hd96"), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ids, mask = prompts(3)
    with forced(ONE_CALL):
        ours = greedy(model, ids, mask, new=8)
    theirs = greedy(ref, ids, mask, new=8)
    assert torch.equal(ours[0], theirs[0])
    close(ours[1], theirs[1], 1e-4, "scores vs transformers")
