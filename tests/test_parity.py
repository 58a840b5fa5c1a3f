"""Numerical parity of moelm with transformers 5.23.0 (the reference) in fp32, on tiny random models.

Every reference model has all of its weights randomised (norms, biases and the router correction bias included,
see reference.py), is saved in hub format and loaded with moelm, so the loading path is exercised too. Eager is
compared with eager and sdpa with sdpa. Tolerance: atol = rtol = 1e-4 everywhere.
"""
from __future__ import annotations

import copy
import itertools
import json
import tempfile
from pathlib import Path

import pytest
import torch

import moelm
from reference import assert_close, reference_model

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 300
ERNIE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0)
MOE = dict(ERNIE, num_hidden_layers=3, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
           moe_num_shared_experts=1, moe_layer_start_index=1)
PHI = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, rope_theta=10000.0)
BASE = {"ernie4_5": ERNIE, "ernie4_5_moe": MOE, "phimoe": PHI}
MOE_FAMILIES = ("ernie4_5_moe", "phimoe")

_TMP = tempfile.TemporaryDirectory(prefix="moelm-parity-")
_CACHE: dict = {}
_COUNTER = [0]


def new_dir() -> Path:
    _COUNTER[0] += 1
    path = Path(_TMP.name) / f"m{_COUNTER[0]}"
    path.mkdir()
    return path


def build(family: str, attn: str = "eager", cls_name: str | None = None, seed: int = 0, cache: bool = True,
          edit=None, **overrides):
    """(reference model, moelm model, checkpoint dir). `edit(ref)` may change the reference's weights before saving.

    Cached by arguments unless cache=False (tests that change a model's state must not share it)."""
    key = (family, attn, cls_name, seed, repr(sorted(overrides.items())))
    if cache and edit is None and key in _CACHE:
        return _CACHE[key]
    kwargs = dict(BASE[family], **overrides)
    ref = reference_model(family, seed=seed, cls_name=cls_name, attn=attn, **kwargs)
    if edit is not None:
        with torch.no_grad():
            edit(ref)
    path = new_dir()
    ref.save_pretrained(path)
    auto = moelm.AutoModelForSequenceClassification if cls_name and "SequenceClassification" in cls_name \
        else moelm.AutoModelForCausalLM
    ours = auto.from_pretrained(path, attn_implementation=attn)
    assert ours.config.attn_implementation == attn
    result = (ref, ours, path)
    if cache and edit is None:
        _CACHE[key] = result
    return result


def tokens(batch: int = 2, seq: int = 10, seed: int = 1, low: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, seq), generator=g)


def labels_for(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :3] = -100
    labels[-1, -2:] = -100
    return labels


def close(a, b, what: str):
    assert a is not None and b is not None, f"{what}: missing (reference {a is None}, moelm {b is None})"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} (reference) vs {tuple(b.shape)} (moelm)"
    assert_close(b, a, msg=what)


def close_seq(a, b, what: str):
    assert a is not None and b is not None, f"{what}: missing (reference {a is None}, moelm {b is None})"
    assert len(a) == len(b), f"{what}: {len(a)} entries (reference) vs {len(b)} (moelm)"
    for i, (x, y) in enumerate(zip(a, b)):
        close(x, y, f"{what}[{i}]")


def forward_kwargs(family: str, **kwargs) -> dict:
    """Forward arguments, with the router logits (and so aux_loss) asked for on MoE families."""
    return dict(kwargs, output_router_logits=True) if family in MOE_FAMILIES else kwargs


def run_both(ref, ours, **kwargs):
    with torch.no_grad():
        return ref(**kwargs), ours(**kwargs)


def moe_layers(family: str, model) -> list:
    """moelm's MoE blocks in layer order."""
    name = "block_sparse_moe" if family == "phimoe" else "mlp"
    return [getattr(layer, name) for layer in model.model.layers if hasattr(getattr(layer, name), "experts")]


# ------------------------------------------------------------------ forward outputs over config branches

VARIANTS = [
    ("ernie4_5", "base", {}),
    ("ernie4_5", "bias-untied", dict(use_bias=True, tie_word_embeddings=False)),
    ("ernie4_5", "nobias-tied", dict(use_bias=False, tie_word_embeddings=True)),
    ("ernie4_5", "bias-tied", dict(use_bias=True, tie_word_embeddings=True)),
    ("ernie4_5", "head_dim24", dict(head_dim=24)),
    ("ernie4_5", "kv1", dict(num_key_value_heads=1)),
    ("ernie4_5", "kv4", dict(num_key_value_heads=4)),
    ("ernie4_5", "4layers", dict(num_hidden_layers=4)),
    ("ernie4_5", "eps0.1", dict(rms_norm_eps=0.1)),
    ("ernie4_5_moe", "base", {}),
    ("ernie4_5_moe", "start0-end1-interval2", dict(num_hidden_layers=4, moe_layer_start_index=0,
                                                   moe_layer_end_index=1, moe_layer_interval=2)),
    ("ernie4_5_moe", "start0-interval2-to-end", dict(num_hidden_layers=4, moe_layer_start_index=0,
                                                     moe_layer_interval=2)),
    ("ernie4_5_moe", "all-moe", dict(moe_layer_start_index=0)),
    ("ernie4_5_moe", "shared0", dict(moe_num_shared_experts=0)),
    ("ernie4_5_moe", "shared2", dict(moe_num_shared_experts=2)),
    ("ernie4_5_moe", "use_bias-untied", dict(use_bias=True, tie_word_embeddings=False)),
    ("ernie4_5_moe", "use_bias-tied", dict(use_bias=True, tie_word_embeddings=True)),
    ("ernie4_5_moe", "k1", dict(moe_k=1)),
    ("ernie4_5_moe", "k-all", dict(moe_k=4)),
    ("ernie4_5_moe", "head_dim24-kv1", dict(head_dim=24, num_key_value_heads=1)),
    ("ernie4_5_moe", "experts8-k3-coef0.5", dict(moe_num_experts=8, moe_k=3, router_aux_loss_coef=0.5)),
    ("ernie4_5_moe", "norm_min0.9", dict(moe_norm_min=0.9)),  # the renormalisation's clamp is active
    ("ernie4_5_moe", "eps0.1", dict(rms_norm_eps=0.1)),
    ("phimoe", "base", {}),
    ("phimoe", "attn_bias", dict(attention_bias=True)),
    ("phimoe", "lm_head_bias", dict(lm_head_bias=True)),
    ("phimoe", "both_bias", dict(attention_bias=True, lm_head_bias=True)),
    ("phimoe", "experts8", dict(num_local_experts=8)),
    ("phimoe", "sliding4", dict(sliding_window=4)),
    ("phimoe", "kv4-tied", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    ("phimoe", "eps0.1", dict(rms_norm_eps=0.1)),  # LayerNorm eps
    ("phimoe", "kv1-coef0.5-jitter0.2", dict(num_key_value_heads=1, router_aux_loss_coef=0.5, router_jitter_noise=0.2)),
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,name,overrides", VARIANTS, ids=[f"{f}-{n}" for f, n, _ in VARIANTS])
def test_forward_outputs(family, name, overrides, attn):
    ref, ours, _ = build(family, attn, **overrides)
    ids = tokens()
    labels = labels_for(ids)
    moe = family in MOE_FAMILIES
    kwargs = forward_kwargs(family, input_ids=ids, labels=labels, output_hidden_states=True,
                            output_attentions=attn == "eager")
    a, b = run_both(ref, ours, **kwargs)
    close(a.logits, b.logits, "logits")
    close(a.loss, b.loss, "loss")
    close_seq(a.hidden_states, b.hidden_states, "hidden_states")
    assert len(b.hidden_states) == ours.config.num_hidden_layers + 1
    if attn == "eager":
        close_seq(a.attentions, b.attentions, "attentions")
        assert len(b.attentions) == ours.config.num_hidden_layers
    if moe:
        close(a.aux_loss, b.aux_loss, "aux_loss")
        close_seq(a.router_logits, b.router_logits, "router_logits")
        assert len(b.router_logits) == len(moe_layers(family, ours)) > 0
    # the structure follows the config: the same parameters, an lm_head bias where the reference has one
    assert (ref.lm_head.bias is None) == (ours.lm_head.bias is None), "lm_head bias"
    if ours.lm_head.bias is not None:
        close(ref.lm_head.bias, ours.lm_head.bias, "lm_head.bias")
    assert sum(p.numel() for p in ref.parameters()) == ours.num_parameters(), "parameter count"


@pytest.mark.parametrize("family", list(BASE))
def test_outputs_off_by_default(family):
    ref, ours, _ = build(family)
    a, b = run_both(ref, ours, input_ids=tokens())
    close(a.logits, b.logits, "logits")
    for field in ("loss", "aux_loss", "hidden_states", "attentions", "router_logits"):
        assert getattr(a, field, None) is None and getattr(b, field, None) is None, field


@pytest.mark.parametrize("family", list(BASE))
def test_inputs_embeds(family):
    ref, ours, _ = build(family)
    ids = tokens()
    embeds = ref.get_input_embeddings()(ids).detach() + 0.01 * torch.randn(2, 10, 64,
                                                                           generator=torch.Generator().manual_seed(3))
    kwargs = forward_kwargs(family, inputs_embeds=embeds, labels=labels_for(ids), output_hidden_states=True)
    a, b = run_both(ref, ours, **kwargs)
    close(a.logits, b.logits, "logits")
    close(a.loss, b.loss, "loss")
    close_seq(a.hidden_states, b.hidden_states, "hidden_states")
    if family in MOE_FAMILIES:
        close(a.aux_loss, b.aux_loss, "aux_loss")
    # inputs_embeds of the token embeddings == input_ids
    with torch.no_grad():
        c = ours(inputs_embeds=ours.get_input_embeddings()(ids)).logits
        d = ours(input_ids=ids).logits
    close(d, c, "inputs_embeds of the embeddings vs input_ids")
    with pytest.raises(ValueError):
        ours(input_ids=ids, inputs_embeds=embeds)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(BASE))
def test_explicit_position_ids(family, attn):
    ref, ours, _ = build(family, attn)
    ids = tokens()
    positions = torch.stack([torch.arange(5, 15), torch.tensor([0, 1, 2, 3, 3, 4, 7, 8, 20, 21])])
    a, b = run_both(ref, ours, input_ids=ids, position_ids=positions)
    close(a.logits, b.logits, "logits with explicit position_ids")
    default = ours(input_ids=ids).logits
    assert not torch.allclose(default, b.logits, atol=1e-3), "position_ids had no effect"
    # an explicit arange equals the default
    a2, b2 = run_both(ref, ours, input_ids=ids, position_ids=torch.arange(10)[None])
    close(a2.logits, b2.logits, "logits with arange position_ids")
    close(default.detach(), b2.logits, "arange position_ids vs default")


@pytest.mark.parametrize("family", list(BASE))
def test_logits_to_keep(family):
    ref, ours, _ = build(family)
    ids = tokens()
    full = ours(input_ids=ids).logits.detach()
    for keep in (1, 3, 10, 0):
        a, b = run_both(ref, ours, input_ids=ids, logits_to_keep=keep)
        close(a.logits, b.logits, f"logits_to_keep={keep}")
        close(full[:, -keep:] if keep else full, b.logits, f"logits_to_keep={keep} vs full")
    for keep in (torch.tensor([0, 4, 9]), torch.tensor([7])):
        a, b = run_both(ref, ours, input_ids=ids, logits_to_keep=keep)
        close(a.logits, b.logits, f"logits_to_keep={keep.tolist()}")
        close(full[:, keep], b.logits, f"logits_to_keep={keep.tolist()} vs full")


@pytest.mark.parametrize("family", list(BASE))
def test_last_layer_feed_forward_runs_on_the_kept_positions_only(family):
    """With logits_to_keep, the last layer's MLP / MoE block sees the kept positions only (as llama.cpp computes
    its last layer); the logits, the cache it fills (the next step's logits) and, when asked for, the hidden states
    and router logits of every position equal the reference's."""
    ref, ours, _ = build(family)
    ids = tokens()
    last = ours.model.layers[-1]
    block = getattr(last, last.mlp_name)
    seen = []
    hook = block.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1]))
    try:
        for keep, rows in ((1, (2, 1)), (3, (2, 3)), (torch.tensor([0, 4, 9]), (2, 3)), (10, (2, 10)), (0, (2, 10)),
                           (torch.tensor([], dtype=torch.long), (2, 0))):  # a server step that samples no row
            seen.clear()
            a, b = run_both(ref, ours, input_ids=ids, logits_to_keep=keep)
            close(a.logits, b.logits, f"logits_to_keep={keep}")
            assert seen == [rows], (keep, seen)
        for asked in (dict(output_hidden_states=True), forward_kwargs(family)):
            if not asked:
                continue
            seen.clear()
            a, b = run_both(ref, ours, input_ids=ids, logits_to_keep=1, **asked)
            assert seen == [(2, 10)], (asked, seen)
            close(a.logits, b.logits, f"logits with {asked}")
            for name in asked:
                what = name.removeprefix("output_")
                for x, y in zip(getattr(a, what), getattr(b, what)):
                    close(x, y, what)
        # a prefill that keeps one position, then a step from its cache
        a, b = run_both(ref, ours, input_ids=ids[:, :6], use_cache=True, logits_to_keep=1)
        with torch.no_grad():
            a = ref(input_ids=ids[:, 6:7], past_key_values=a.past_key_values, use_cache=True)
            b = ours(input_ids=ids[:, 6:7], past_key_values=b.past_key_values, use_cache=True)
        close(a.logits, b.logits, "the step after a prefill that kept one position")
    finally:
        hook.remove()


@pytest.mark.parametrize("family", list(BASE))
def test_return_dict_false(family):
    ref, ours, _ = build(family)
    ids = tokens()
    kwargs = dict(input_ids=ids, labels=labels_for(ids), use_cache=False)
    a, b = run_both(ref, ours, return_dict=False, **kwargs)
    assert isinstance(b, tuple) and len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        close(x, y, f"tuple[{i}]")


@pytest.mark.parametrize("family", list(BASE))
def test_output_flags_from_the_config_as_transformers(family):
    """With the config's output_attentions / output_hidden_states / output_router_logits on: a flag not given is
    the config's, one given as None (as peft passes them) is off (router logits of a causal LM: the config's),
    return_dict=None is a dict; output_hidden_states as indices selects hidden states; the causal LM and the base
    model alike, as transformers 5."""
    import transformers

    ref, ours, _ = build(family, cache=False)  # its configs change
    moe = family in MOE_FAMILIES
    ids = tokens()
    for config in (ref.config, ours.config):
        config.output_attentions = config.output_hidden_states = config.output_router_logits = True
    base = getattr(transformers, type(ref.model).__name__)(ref.config).eval()
    base.load_state_dict(ref.model.state_dict())
    fields = ("hidden_states", "attentions", "router_logits", "last_hidden_state", "logits")
    none = dict(output_attentions=None, output_hidden_states=None, return_dict=None)
    calls = [{}, none, {**none, "output_router_logits": None}, dict(output_hidden_states=[0, -1, 99]),
             dict(output_hidden_states=-2), dict(output_hidden_states=0), dict(output_hidden_states=[])]
    for (theirs, mine), kwargs in itertools.product(((ref, ours), (base, ours.model)), calls):
        if not moe:
            kwargs = {k: v for k, v in kwargs.items() if k != "output_router_logits"}
        a, b = run_both(theirs, mine, input_ids=ids, **kwargs)
        for field in fields:
            x, y = getattr(a, field, None), getattr(b, field, None)
            assert (x is None) == (y is None), (field, kwargs, type(mine).__name__)
            if isinstance(x, tuple):
                assert [t is None for t in x] == [t is None for t in y], (field, kwargs)
                close_seq([t for t in x if t is not None], [t for t in y if t is not None], field)
            elif x is not None:
                close(x, y, field)
    a, b = run_both(base, ours.model, input_ids=ids, use_cache=False, return_dict=False, output_attentions=False,
                    output_hidden_states=False, output_router_logits=False)
    assert isinstance(b, tuple) and len(a) == len(b)
    close(a[0], b[0], "tuple[0]")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_output_router_logits_from_config(family):
    """output_router_logits=True in config.json turns the aux loss on (and into the loss) without the argument."""
    ref, ours, _ = build(family, output_router_logits=True, router_aux_loss_coef=0.3)
    assert ours.config.output_router_logits is True
    ids = tokens()
    a, b = run_both(ref, ours, input_ids=ids, labels=labels_for(ids))
    close(a.aux_loss, b.aux_loss, "aux_loss")
    close(a.loss, b.loss, "loss incl. 0.3 * aux_loss")
    close_seq(a.router_logits, b.router_logits, "router_logits")
    a, b = run_both(ref, ours, input_ids=ids, labels=labels_for(ids), output_router_logits=False)
    assert a.aux_loss is None and b.aux_loss is None and b.router_logits is None
    close(a.loss, b.loss, "loss without aux")


@pytest.mark.parametrize("family", list(BASE))
def test_loss_num_items_in_batch(family):
    ref, ours, _ = build(family)
    ids = tokens()
    kwargs = forward_kwargs(family, input_ids=ids, labels=labels_for(ids), num_items_in_batch=torch.tensor(7))
    a, b = run_both(ref, ours, **kwargs)
    close(a.loss, b.loss, "loss with num_items_in_batch")


@pytest.mark.parametrize("family,overrides", [("ernie4_5_moe", dict(moe_num_experts=8, moe_k=1)),
                                              ("ernie4_5_moe", {}), ("phimoe", dict(num_local_experts=8))],
                         ids=["ernie4_5_moe-e8k1", "ernie4_5_moe", "phimoe-e8"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 1)])
def test_moe_few_tokens(family, overrides, shape):
    """Most experts get no token at all."""
    ref, ours, _ = build(family, **overrides)
    ids = tokens(*shape, seed=4)
    a, b = run_both(ref, ours, input_ids=ids, output_router_logits=True)
    close(a.logits, b.logits, "logits")
    close(a.aux_loss, b.aux_loss, "aux_loss")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_aux_loss_of_a_cached_step(family):
    """A forward after a cache, with the 2D mask of past + new tokens (what generate passes): the aux loss covers
    this forward's tokens, the mask's last columns, as the reference's load_balancing_loss_func computes it for them.
    (The reference model itself raises a shape error here: it hands the whole mask to that function.)"""
    import importlib

    ref, ours, _ = build(family)
    ids, mask = tokens(2, 7, seed=5), torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, 5] = 0  # a hole among the new tokens, so that taking the wrong columns shows
    with torch.no_grad():
        out = ours(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        step = ours(ids[:, 4:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                    output_router_logits=True)
    hf = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    want = hf.load_balancing_loss_func(step.router_logits, ours.config.num_experts, ours.config.num_experts_per_tok,
                                       mask[:, 4:])
    close(want, step.aux_loss, "aux_loss of a cached step")
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 2\)"):
        moelm.nn.moe.load_balancing_loss(step.router_logits, 8, 2, mask[:, :2])


# ------------------------------------------------------------------ ERNIE MoE specifics

def test_ernie_moe_layer_placement():
    for overrides, expected in [
        (dict(num_hidden_layers=4, moe_layer_start_index=0, moe_layer_end_index=1, moe_layer_interval=2),
         [False, True, False, False]),
        (dict(num_hidden_layers=4, moe_layer_start_index=0, moe_layer_interval=2), [False, True, False, True]),
        (dict(num_hidden_layers=4, moe_layer_start_index=2, moe_layer_end_index=-1), [False, False, True, True]),
        (dict(num_hidden_layers=3), [False, True, True]),
    ]:
        ref, ours, _ = build("ernie4_5_moe", **overrides)
        got = [hasattr(layer.mlp, "experts") for layer in ours.model.layers]
        want = [hasattr(layer.mlp, "experts") for layer in ref.model.layers]
        assert got == want == expected, (overrides, got, want)


def test_ernie_moe_without_a_moe_layer_has_no_aux_loss():
    """A layer range that holds no MoE layer (one layer, MoE from layer 1): router logits asked for give none, an
    aux loss of 0 and the plain loss (transformers fails there: its loss indexes the first layer's logits)."""
    ref, ours, _ = build("ernie4_5_moe", num_hidden_layers=1, moe_layer_start_index=1)
    assert not hasattr(ours.model.layers[0].mlp, "experts")
    ids = tokens(seq=5)
    with torch.no_grad():
        out = ours(ids, labels=ids, output_router_logits=True)
        want = ref(ids, labels=ids)
    assert not out.router_logits and float(out.aux_loss) == 0.0
    close(out.loss, want.loss, "loss")


def test_ernie_moe_list_valued_layer_indices():
    """Hub configs of the multimodal ERNIE give per-modality lists; the text layers span min(start)..max(end).

    transformers 5.23.0 rejects lists, so the reference is built with the scalar span and the saved config.json is
    rewritten with lists."""
    ref, _, path = build("ernie4_5_moe", num_hidden_layers=4, moe_layer_start_index=1, moe_layer_end_index=2)
    data = json.loads((path / "config.json").read_text())
    data["moe_layer_start_index"] = [2, 1]
    data["moe_layer_end_index"] = [1, 2]
    target = new_dir()
    for f in path.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (target / "config.json").write_text(json.dumps(data))
    ours = moelm.AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager")
    assert [hasattr(layer.mlp, "experts") for layer in ours.model.layers] == [False, True, True, False]
    ids = tokens()
    a, b = run_both(ref, ours, input_ids=ids, output_router_logits=True)
    close(a.logits, b.logits, "logits")
    close(a.aux_loss, b.aux_loss, "aux_loss")


def _big_correction_bias(ref):
    g = torch.Generator().manual_seed(11)
    for layer in ref.model.layers:
        if hasattr(layer.mlp, "experts"):
            bias = layer.mlp.gate.moe_statics.e_score_correction_bias
            bias.copy_(torch.tensor([0.6, -0.6, 0.3, -0.3])[None] + 0.05 * torch.randn(bias.shape, generator=g))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("k", [1, 2])
def test_ernie_moe_correction_bias_changes_choice(k, attn):
    ref, ours, _ = build("ernie4_5_moe", attn, moe_k=k, edit=_big_correction_bias)
    ids = tokens(seq=12)
    a, b = run_both(ref, ours, input_ids=ids, labels=labels_for(ids), output_router_logits=True)
    close(a.logits, b.logits, "logits")
    close(a.loss, b.loss, "loss")
    close(a.aux_loss, b.aux_loss, "aux_loss")
    close_seq(a.router_logits, b.router_logits, "router_logits")
    changed = 0
    for logits, layer in zip(a.router_logits, [x for x in ref.model.layers if hasattr(x.mlp, "experts")]):
        probs = logits.softmax(-1)
        bias = layer.mlp.gate.moe_statics.e_score_correction_bias
        plain = probs.topk(k, dim=-1).indices.sort(-1).values
        biased = (probs + bias).topk(k, dim=-1).indices.sort(-1).values
        changed += int((plain != biased).any(-1).sum())
    assert changed > 3, "the correction bias must change the choice of experts for this test to mean anything"
    # and the model without the bias differs: the bias is not ignored
    with torch.no_grad():
        for block in moe_layers("ernie4_5_moe", ours):
            block.moe_statics.e_score_correction_bias.zero_()
        unbiased = ours(input_ids=ids).logits
    assert not torch.allclose(unbiased, b.logits, atol=1e-3)


# ------------------------------------------------------------------ RoPE variants

LONGROPE_SHORT = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8]
LONGROPE_LONG = [1.0, 1.4, 2.0, 3.0, 4.5, 6.0, 9.0, 14.0]
ERNIE_ROPES = [
    ("default", dict(rope_type="default", rope_theta=10000.0), 10),
    ("default-theta500k", dict(rope_type="default", rope_theta=500000.0), 10),
    ("linear", dict(rope_type="linear", factor=4.0, rope_theta=10000.0), 10),
    ("dynamic-short", dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0), 7),
    ("dynamic-long", dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0), 12),
    ("yarn", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, rope_theta=10000.0), 12),
    ("yarn-mscale", dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8, mscale=0.7,
                         mscale_all_dim=1.0, beta_fast=16, beta_slow=2, rope_theta=10000.0), 12),
    # original 256: the correction range (0.21, 3.22) is fractional, so truncate and beta_fast/beta_slow matter
    ("yarn-256", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256, rope_theta=10000.0), 12),
    ("yarn-256-betas", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=16,
                            beta_slow=2, rope_theta=10000.0), 12),
    ("yarn-256-notruncate", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256,
                                 truncate=False, rope_theta=10000.0), 12),
    ("yarn-attention_factor-notruncate", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                              attention_factor=1.3, truncate=False, rope_theta=10000.0), 12),
    ("llama3", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64, rope_theta=500000.0), 12),
    ("longrope-short", dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                            original_max_position_embeddings=8, rope_theta=10000.0), 7),
    ("longrope-at-original", dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                                  original_max_position_embeddings=8, rope_theta=10000.0), 8),
    ("longrope-just-past", dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                                original_max_position_embeddings=8, rope_theta=10000.0), 9),
    ("longrope-long", dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                           original_max_position_embeddings=8, rope_theta=10000.0), 12),
    ("longrope-factor", dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                             original_max_position_embeddings=8, factor=3.0, rope_theta=10000.0), 12),
    ("longrope-factor-attention_factor", dict(rope_type="longrope", short_factor=LONGROPE_SHORT,
                                              long_factor=LONGROPE_LONG, original_max_position_embeddings=8,
                                              factor=3.0, attention_factor=1.2, rope_theta=10000.0), 12),
]


# The MoE family shares ERNIE's rotary code: a sample of the rope types is enough there.
ERNIE_ROPE_CASES = [("ernie4_5", *r) for r in ERNIE_ROPES] + [
    ("ernie4_5_moe", *r) for r in ERNIE_ROPES if r[0] in ("yarn", "longrope-long", "dynamic-long", "llama3")]


@pytest.mark.parametrize("family,name,rope,seq", ERNIE_ROPE_CASES, ids=[f"{c[0]}-{c[1]}" for c in ERNIE_ROPE_CASES])
def test_ernie_rope(family, name, rope, seq):
    # max_position_embeddings 10: dynamic grows past it at seq 12; longrope/yarn scale against original 8/16
    max_pos = 64 if name.startswith("llama3") else 10
    # dynamic rope is stateful in the reference: a fresh model for every case
    ref, ours, _ = build(family, "eager", cache=False, rope_parameters=dict(rope), max_position_embeddings=max_pos)
    assert ours.config.rope_parameters["rope_type"] == rope["rope_type"]
    ids = tokens(seq=seq)
    a, b = run_both(ref, ours, input_ids=ids, output_hidden_states=True)
    close(a.logits, b.logits, f"logits ({name}, seq {seq})")
    close_seq(a.hidden_states, b.hidden_states, "hidden_states")


def test_ernie_rope_types_differ():
    """Guard: the rope variants above really change the numbers (else they would test nothing)."""
    ids = tokens(seq=12)
    results = {}
    for name, rope, _ in ERNIE_ROPES:
        if name in ("dynamic-short", "longrope-short", "longrope-at-original", "longrope-just-past"):
            continue
        max_pos = 64 if name.startswith("llama3") else 10
        _, ours, _ = build("ernie4_5", cache=False, rope_parameters=dict(rope), max_position_embeddings=max_pos)
        with torch.no_grad():
            results[name] = ours(input_ids=ids).logits
    names = list(results)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not torch.allclose(results[x], results[y], atol=1e-4), f"rope {x} and {y} give the same logits"


PHI_LONGROPE = dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                    short_mscale=1.15, long_mscale=1.45, original_max_position_embeddings=8, rope_theta=10000.0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("seq", [6, 8, 9, 12])
def test_phimoe_longrope(seq, attn):
    ref, ours, _ = build("phimoe", attn, cache=False, rope_parameters=dict(PHI_LONGROPE), max_position_embeddings=32)
    ids = tokens(seq=seq)
    a, b = run_both(ref, ours, input_ids=ids, output_router_logits=True, output_hidden_states=True)
    close(a.logits, b.logits, f"logits (seq {seq})")
    close_seq(a.router_logits, b.router_logits, "router_logits")
    close_seq(a.hidden_states, b.hidden_states, "hidden_states")


PHI_OTHER_ROPES = [
    # (the reference needs original_max_position_embeddings in the rope dict for the mscale switch)
    ("linear", dict(rope_type="linear", factor=2.0, short_mscale=1.1, long_mscale=1.3, rope_theta=10000.0,
                    original_max_position_embeddings=8)),
    ("dynamic", dict(rope_type="dynamic", factor=2.0, short_mscale=1.1, long_mscale=1.3, rope_theta=10000.0,
                     original_max_position_embeddings=8)),
    ("yarn", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, short_mscale=0.9,
                  long_mscale=1.2, rope_theta=10000.0)),
    ("longrope-attention_factor", dict(PHI_LONGROPE, attention_factor=1.7, factor=2.0)),
]


@pytest.mark.parametrize("seq", [6, 12])
@pytest.mark.parametrize("name,rope", PHI_OTHER_ROPES, ids=[r[0] for r in PHI_OTHER_ROPES])
def test_phimoe_other_ropes(name, rope, seq):
    """Any non-default rope type: the reference's frequencies at max_position_embeddings, and short/long mscale
    (against original_max_position_embeddings) instead of the rope's own attention factor."""
    ref, ours, _ = build("phimoe", cache=False, rope_parameters=dict(rope), max_position_embeddings=10)
    ids = tokens(seq=seq)
    a, b = run_both(ref, ours, input_ids=ids, output_router_logits=True)
    close(a.logits, b.logits, f"logits ({name}, seq {seq})")
    close_seq(a.router_logits, b.router_logits, "router_logits")


def test_phimoe_longrope_mscale_switches():
    """Guard: past original_max_position_embeddings the long mscale is used (the logits change)."""
    ref, ours, _ = build("phimoe", cache=False, rope_parameters=dict(PHI_LONGROPE), max_position_embeddings=32)
    ids = tokens(seq=9)
    with torch.no_grad():
        long = ours(input_ids=ids).logits[:, :8]
        short = ours(input_ids=ids[:, :8]).logits
    assert not torch.allclose(long, short, atol=1e-3)


# ------------------------------------------------------------------ config.json written by transformers 4.x / 5.x

def _as_4x(data: dict) -> dict:
    data = dict(data)
    rope = dict(data.pop("rope_parameters"))
    data["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    data["rope_scaling"] = None if kind == "default" else dict(rope, type=kind)
    data["torch_dtype"] = data.pop("dtype", "float32") or "float32"
    data["transformers_version"] = "4.56.0"
    return data


def _as_5x(data: dict) -> dict:
    data = dict(data)
    data.pop("torch_dtype", None)
    data.pop("rope_scaling", None)
    data.pop("rope_theta", None)
    data["dtype"] = data.get("dtype") or "float32"
    assert "rope_parameters" in data
    return data


FORMAT_CASES = [
    ("ernie4_5", "default", dict(rope_parameters=dict(rope_type="default", rope_theta=12345.0))),
    ("ernie4_5", "linear", dict(rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=10000.0))),
    ("ernie4_5", "yarn", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8,
                                                   rope_theta=10000.0), max_position_embeddings=32)),
    ("ernie4_5_moe", "llama3", dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=64,
                                                         rope_theta=500000.0), max_position_embeddings=256)),
    ("phimoe", "default", dict(rope_parameters=dict(rope_type="default", rope_theta=2000.0))),
    ("phimoe", "longrope", dict(rope_parameters=dict(PHI_LONGROPE), max_position_embeddings=32)),
]


@pytest.mark.parametrize("fmt", ["4.x", "5.x"])
@pytest.mark.parametrize("family,name,overrides", FORMAT_CASES, ids=[f"{f}-{n}" for f, n, _ in FORMAT_CASES])
def test_config_json_formats(family, name, overrides, fmt):
    ref, _, path = build(family, **overrides)
    data = json.loads((path / "config.json").read_text())
    data = _as_4x(data) if fmt == "4.x" else _as_5x(data)
    target = new_dir()
    for f in path.iterdir():
        if f.name != "config.json":
            (target / f.name).write_bytes(f.read_bytes())
    (target / "config.json").write_text(json.dumps(data, indent=2))
    ours = moelm.AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager").float().eval()
    rope = overrides["rope_parameters"]
    assert ours.config.rope_parameters["rope_type"] == rope["rope_type"]
    assert ours.config.rope_theta == rope["rope_theta"]
    assert theirs.config.rope_parameters["rope_type"] == rope["rope_type"]
    assert ours.dtype == torch.float32
    ids = tokens(seq=12)
    a = theirs(input_ids=ids).logits.detach()
    with torch.no_grad():
        b = ours(input_ids=ids).logits
        original = ref(input_ids=ids).logits
    close(a, b, f"logits ({fmt} config)")
    close(original, b, f"logits ({fmt} config) vs the reference before the rewrite")


TOP_LEVEL_CASES = [
    # (family, rope dict, the value transformers 5.23.0 ends up using)
    # ERNIE: the rope functions re-standardise the config at model build, where a top-level attribute wins
    ("ernie4_5", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0), 8),
    ("ernie4_5", dict(rope_type="yarn", factor=4.0, rope_theta=10000.0), 8),
    ("ernie4_5", dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                      original_max_position_embeddings=16, rope_theta=10000.0), 8),
    ("ernie4_5_moe", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64, rope_theta=10000.0), 8),
    # PhiMoE: validate_rope copies the rope dict's value (or max_position_embeddings) over the top-level one
    ("phimoe", dict(PHI_LONGROPE, original_max_position_embeddings=16), 16),
    ("phimoe", {k: v for k, v in PHI_LONGROPE.items() if k != "original_max_position_embeddings"}, 32),
]


TOP_LEVEL_IDS = ["ernie4_5-yarn", "ernie4_5-yarn-only-top", "ernie4_5-longrope", "ernie4_5_moe-llama3",
                 "phimoe-longrope", "phimoe-longrope-only-top"]


@pytest.mark.parametrize("family,rope,expected", [
    pytest.param(*case, id=name) for case, name in zip(TOP_LEVEL_CASES, TOP_LEVEL_IDS)])
def test_config_top_level_original_max_position_embeddings(family, rope, expected):
    """Phi-3 style 4.x configs give original_max_position_embeddings at the top level (here 8) besides, or instead
    of, the one in rope_scaling. Which one counts is the reference's, family by family."""
    _, _, path = build(family, rope_parameters=dict(rope, original_max_position_embeddings=16),
                       max_position_embeddings=32)
    data = _as_4x(json.loads((path / "config.json").read_text()))
    data["original_max_position_embeddings"] = 8
    if "original_max_position_embeddings" not in rope:
        del data["rope_scaling"]["original_max_position_embeddings"]
    target = new_dir()
    for f in path.iterdir():
        if f.name != "config.json":
            (target / f.name).write_bytes(f.read_bytes())
    (target / "config.json").write_text(json.dumps(data, indent=2))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(target, attn_implementation="sdpa").float().eval()
    ours = moelm.AutoModelForCausalLM.from_pretrained(target, attn_implementation="sdpa")
    assert theirs.config.rope_parameters["original_max_position_embeddings"] == expected  # the setup
    assert ours.config.rope_parameters["original_max_position_embeddings"] == expected
    for seq in (7, 12):
        ids = tokens(seq=seq)
        with torch.no_grad():
            close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, f"logits, seq {seq}")


# ------------------------------------------------------------------ left padding

def left_padded(seq: int = 10, pad_id: int = 0):
    ids = tokens(batch=3, seq=seq, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask


PAD_CASES = [("ernie4_5", {}), ("ernie4_5_moe", {}), ("phimoe", {}), ("phimoe", dict(sliding_window=4))]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,overrides", PAD_CASES, ids=["ernie4_5", "ernie4_5_moe", "phimoe", "phimoe-sliding4"])
def test_left_padding(family, overrides, attn):
    ref, ours, _ = build(family, attn, **overrides)
    ids, mask = left_padded()
    labels = labels_for(ids).masked_fill(mask == 0, -100)
    moe = family in MOE_FAMILIES
    kwargs = forward_kwargs(family, input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    a, b = run_both(ref, ours, **kwargs)
    close(a.logits, b.logits, "logits, all positions")
    close(a.loss, b.loss, "loss")
    close_seq(a.hidden_states, b.hidden_states, "hidden_states, all positions")
    if moe:
        close(a.aux_loss, b.aux_loss, "aux_loss with attention_mask")
        close_seq(a.router_logits, b.router_logits, "router_logits")
        unmasked = ours(input_ids=ids, output_router_logits=True).aux_loss
        assert not torch.allclose(unmasked, b.aux_loss), "the mask must matter to the aux loss"
    # positions from the mask, as generate() makes them
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    a2, b2 = run_both(ref, ours, input_ids=ids, attention_mask=mask, position_ids=positions)
    close(a2.logits, b2.logits, "logits with mask-derived position_ids")
    # the unpadded row equals the same row run alone
    with torch.no_grad():
        alone = ours(input_ids=ids[1:2]).logits
    close(alone, b.logits[1:2], "unpadded row vs alone")
    # a padded row, with mask-derived positions, equals its tokens run alone
    with torch.no_grad():
        alone0 = ours(input_ids=ids[0:1, 3:]).logits
    close(alone0, b2.logits[0:1, 3:], "left-padded row vs alone")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,overrides", PAD_CASES, ids=["ernie4_5", "ernie4_5_moe", "phimoe", "phimoe-sliding4"])
def test_right_padding_and_holes(family, overrides, attn):
    """Masks that are not left padding: right padding, and zeros in the middle of a row."""
    ref, ours, _ = build(family, attn, **overrides)
    ids = tokens(batch=3, seq=10, seed=6)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[1, 3:5] = 0
    mask[2, 0] = 0
    mask[2, 9] = 0
    kwargs = forward_kwargs(family, input_ids=ids, attention_mask=mask)
    a, b = run_both(ref, ours, **kwargs)
    close(a.logits, b.logits, "logits, all positions")
    if family in MOE_FAMILIES:
        close(a.aux_loss, b.aux_loss, "aux_loss")


@pytest.mark.parametrize("family", list(BASE))
def test_all_ones_mask_equals_no_mask(family):
    ref, ours, _ = build(family, "sdpa")
    ids = tokens()
    kwargs = dict(output_router_logits=True) if family in MOE_FAMILIES else {}
    a, b = run_both(ref, ours, input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    close(a.logits, b.logits, "logits")
    if kwargs:
        close(a.aux_loss, b.aux_loss, "aux_loss")
    close(ours(input_ids=ids).logits.detach(), b.logits, "no mask vs all-ones mask")


# ------------------------------------------------------------------ cached incremental decoding

LONG_ERNIE = dict(rope_parameters=dict(rope_type="longrope", short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG,
                                      original_max_position_embeddings=8, rope_theta=10000.0),
                  max_position_embeddings=32)
LONG_PHI = dict(rope_parameters=dict(PHI_LONGROPE), max_position_embeddings=32)
DECODE_CASES = [
    ("ernie4_5", "eager", {}), ("ernie4_5", "sdpa", {}),
    ("ernie4_5_moe", "eager", {}), ("ernie4_5_moe", "sdpa", {}),
    ("phimoe", "eager", {}), ("phimoe", "sdpa", {}),
    ("phimoe", "eager", dict(sliding_window=4)), ("phimoe", "sdpa", dict(sliding_window=4)),
    # longrope switches (frequencies for ERNIE, mscale for PhiMoE) once the positions pass
    # original_max_position_embeddings = 8: the cached keys keep the short rotation, so decoding is compared with
    # the reference's own decoding, not with a full forward
    ("phimoe", "sdpa", LONG_PHI), ("ernie4_5", "sdpa", LONG_ERNIE), ("ernie4_5_moe", "eager", LONG_ERNIE),
    # dynamic NTK grows its base with every step past max_position_embeddings = 8
    ("ernie4_5", "eager", dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
                               max_position_embeddings=8)),
]
DECODE_IDS = ["ernie4_5-eager", "ernie4_5-sdpa", "ernie4_5_moe-eager", "ernie4_5_moe-sdpa", "phimoe-eager",
              "phimoe-sdpa", "phimoe-sliding4-eager", "phimoe-sliding4-sdpa", "phimoe-longrope-sdpa",
              "ernie4_5-longrope-sdpa", "ernie4_5_moe-longrope-eager", "ernie4_5-dynamic-eager"]
STEPS = [5, 1, 1, 3, 1, 1]  # prefill 5, then single tokens and a chunk of 3: 12 tokens in all


def decode(model, ids, mask, steps=STEPS):
    """Logits of each step of cached decoding, checking the cache length as it goes."""
    past, start, pieces = None, 0, []
    for n in steps:
        end = start + n
        with torch.no_grad():
            out = model(input_ids=ids[:, start:end], attention_mask=None if mask is None else mask[:, :end],
                        past_key_values=past, use_cache=True)
        past = out.past_key_values
        assert past is not None and past.get_seq_length() == end, f"cache length after {end} tokens"
        pieces.append(out.logits)
        start = end
    return pieces


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family,attn,overrides", DECODE_CASES, ids=DECODE_IDS)
def test_cached_decoding(family, attn, overrides, padded):
    ref, ours, _ = build(family, attn, **overrides)
    total = sum(STEPS)
    if padded:
        ids, mask = left_padded(seq=total)
    else:
        ids, mask = tokens(batch=2, seq=total, seed=7), None
    with torch.no_grad():
        full_ref = ref(input_ids=ids, attention_mask=mask).logits
        full_ours = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
    close(full_ref, full_ours, "full forward")
    ours_steps, ref_steps = decode(ours, ids, mask), decode(ref, ids, mask)
    length_dependent = "rope_parameters" in overrides
    # padding query rows attend to nothing; their (meaningless) values depend on how many keys the step sees
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    start = 0
    for n, mine, theirs in zip(STEPS, ours_steps, ref_steps):
        end = start + n
        close(theirs, mine, f"moelm cached step {start}:{end} vs reference cached, all positions")
        if not length_dependent:
            keep = real[:, start:end]
            close(full_ours[:, start:end][keep], mine[keep], f"moelm cached step {start}:{end} vs moelm full")
            close(full_ref[:, start:end][keep], mine[keep], f"moelm cached step {start}:{end} vs reference full")
            close(full_ref[:, start:end][keep], theirs[keep], f"reference cached {start}:{end} vs reference full")
        start = end
    if length_dependent:  # guard: the switch really happens during decoding
        assert not torch.allclose(torch.cat(ours_steps, 1), full_ours, atol=1e-3)
    assert isinstance(ours(input_ids=ids[:, :2], use_cache=True).past_key_values, moelm.DynamicCache)


@pytest.mark.parametrize("family", list(BASE))
def test_cached_decoding_with_position_ids_and_embeds(family):
    """Decoding with explicit mask-derived position_ids and inputs_embeds (as generate() does with left padding)."""
    ref, ours, _ = build(family, "sdpa")
    ids, mask = left_padded(seq=9)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    embeds = ours.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        full_ref = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        past = None
        for start, end in ((0, 6), (6, 7), (7, 9)):
            out = ours(inputs_embeds=embeds[:, start:end], attention_mask=mask[:, :end],
                       position_ids=positions[:, start:end], past_key_values=past, use_cache=True)
            past = out.past_key_values
            close(full_ref[:, start:end], out.logits, f"cached {start}:{end}")
    assert past.get_seq_length() == 9


# ------------------------------------------------------------------ save round trip

ROUND_TRIP = [
    ("ernie4_5", dict(use_bias=True, tie_word_embeddings=False)),
    ("ernie4_5", dict(tie_word_embeddings=True)),
    ("ernie4_5_moe", dict(use_bias=True, tie_word_embeddings=False, moe_num_shared_experts=2)),
    ("ernie4_5_moe", dict(tie_word_embeddings=True, moe_num_shared_experts=0)),
    ("phimoe", dict(attention_bias=True, lm_head_bias=True)),
    ("phimoe", dict(sliding_window=4, rope_parameters=dict(PHI_LONGROPE), max_position_embeddings=32)),
]


@pytest.mark.parametrize("shard", [None, 20_000], ids=["single", "sharded"])
@pytest.mark.parametrize("family,overrides", ROUND_TRIP,
                         ids=["ernie4_5-bias-untied", "ernie4_5-tied", "ernie4_5_moe-bias-untied",
                              "ernie4_5_moe-tied-shared0", "phimoe-biases", "phimoe-sliding-longrope"])
def test_save_round_trip(family, overrides, shard):
    ref, ours, _ = build(family, **overrides)
    target = new_dir()
    if shard is None:
        ours.save_pretrained(target)
        assert (target / "model.safetensors").is_file()
    else:
        ours.save_pretrained(target, max_shard_size=shard)
        shards = sorted(target.glob("model-*-of-*.safetensors"))
        assert len(shards) > 2, "max_shard_size must force sharding"
        assert (target / "model.safetensors.index.json").is_file()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager").float().eval()
    again = moelm.AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager")
    assert type(theirs).__name__ == type(ref).__name__
    # every weight reloads bit for bit in transformers
    ref_state, their_state = ref.state_dict(), theirs.state_dict()
    assert sorted(ref_state) == sorted(their_state)
    for key, value in ref_state.items():
        assert torch.equal(value, their_state[key]), key
    ids = tokens(seq=12)
    ids_mask = torch.ones_like(ids)
    ids_mask[0, :2] = 0
    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=ids_mask)
        a, b, c, d = ref(**kw).logits, theirs(**kw).logits, ours(**kw).logits, again(**kw).logits
    assert torch.equal(a, b), "transformers reloading moelm's checkpoint changed the logits"
    assert torch.equal(c, d), "moelm reloading its own checkpoint changed the logits"
    close(b, d, "transformers vs moelm on moelm's checkpoint")
    for key in set(ours.config.to_dict()) & {"rope_parameters", "sliding_window", "use_bias", "tie_word_embeddings",
                                              "moe_num_shared_experts", "attention_bias", "lm_head_bias"}:
        assert getattr(again.config, key) == getattr(ours.config, key), key


# ------------------------------------------------------------------ sequence classification

@pytest.mark.parametrize("shard", [None, 20_000], ids=["single", "sharded"])
def test_sequence_classification_save_round_trip(shard):
    ref, ours, _ = build("phimoe", cls_name="PhimoeForSequenceClassification", num_labels=3, pad_token_id=5,
                         attention_bias=True)
    target = new_dir()
    ours.save_pretrained(target, **({} if shard is None else {"max_shard_size": shard}))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        target, attn_implementation="eager").float().eval()
    again = moelm.AutoModelForSequenceClassification.from_pretrained(target, attn_implementation="eager")
    assert type(theirs).__name__ == "PhimoeForSequenceClassification" and theirs.config.num_labels == 3
    for key, value in ref.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key
    ids, mask = _classification_batch()
    with torch.no_grad():
        a, b = theirs(input_ids=ids, attention_mask=mask).logits, again(input_ids=ids, attention_mask=mask).logits
        c = ref(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, c)
    close(a, b, "pooled logits after the round trip")


def _classifier(num_labels: int, attn: str = "eager", **overrides):
    return build("phimoe", attn, cls_name="PhimoeForSequenceClassification", cache=False, num_labels=num_labels,
                 pad_token_id=5, **overrides)


def _classification_batch(pad_id: int = 5):
    ids = tokens(batch=4, seq=9, seed=9, low=6)
    ids[1, 6:] = pad_id  # right padded
    ids[2, :3] = pad_id  # left padded
    ids[3, 8] = pad_id   # padded in the last position only
    mask = (ids != pad_id).long()
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sequence_classification(attn):
    ref, ours, _ = _classifier(3, attn)
    assert type(ours).__name__ == "PhimoeForSequenceClassification" and ours.num_labels == 3
    ids, mask = _classification_batch()
    labels = torch.tensor([0, 2, 1, 2])
    ref.config.problem_type = None
    ours.config.problem_type = None
    a, b = run_both(ref, ours, input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert b.logits.shape == (4, 3)
    close(a.logits, b.logits, "pooled logits")
    close(a.loss, b.loss, "single-label classification loss")
    close_seq(a.hidden_states, b.hidden_states, "hidden_states")
    assert ours.config.problem_type == ref.config.problem_type == "single_label_classification"
    # multi-label: float labels
    ref.config.problem_type = None
    ours.config.problem_type = None
    soft = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    a, b = run_both(ref, ours, input_ids=ids, attention_mask=mask, labels=soft)
    close(a.loss, b.loss, "multi-label classification loss")
    assert ours.config.problem_type == ref.config.problem_type == "multi_label_classification"
    # the pooled position is the last non-pad token
    with torch.no_grad():
        alone = ours(input_ids=ids[1:2, :6]).logits
    close(alone, b.logits[1:2], "right-padded row pools its last real token")


def test_sequence_classification_embeds_and_no_pad_token():
    """Without input_ids (or without a pad token) the last position is pooled; a batch > 1 needs a pad token."""
    ref, ours, _ = _classifier(3)
    ids, mask = _classification_batch()
    embeds = ours.get_input_embeddings()(ids).detach()
    a, b = run_both(ref, ours, inputs_embeds=embeds, attention_mask=mask)
    close(a.logits, b.logits, "pooled logits from inputs_embeds")
    ref2, ours2, _ = build("phimoe", cls_name="PhimoeForSequenceClassification", cache=False, num_labels=2)
    assert ours2.config.pad_token_id is None
    a, b = run_both(ref2, ours2, input_ids=ids[:1])
    close(a.logits, b.logits, "pooled logits, no pad token, batch 1")
    with pytest.raises(ValueError):
        ref2(input_ids=ids)
    with pytest.raises(ValueError):
        ours2(input_ids=ids)


def test_sequence_classification_regression():
    ref, ours, _ = _classifier(1)
    ids, mask = _classification_batch()
    target = torch.tensor([0.5, -1.0, 2.0, 0.25])
    a, b = run_both(ref, ours, input_ids=ids, attention_mask=mask, labels=target)
    assert b.logits.shape == (4, 1)
    close(a.logits, b.logits, "regression logits")
    close(a.loss, b.loss, "regression loss")
    assert ours.config.problem_type == ref.config.problem_type == "regression"


def test_classifier_from_a_causal_lm_checkpoint_with_num_labels():
    """from_pretrained(causal LM checkpoint, num_labels=3), as a classification fine-tune starts: the base weights
    read, a new 3-label head; with transformers' head copied in, the same logits. label2id names the labels."""
    _, _, path = build("phimoe", pad_token_id=5)  # the family with a classification head
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3,
                                                                          attn_implementation="eager")
    ours = moelm.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, attn_implementation="eager")
    assert ours.score.weight.shape == (3, ref.config.hidden_size) and ours.config.id2label == ref.config.id2label
    with torch.no_grad():
        ours.score.weight.copy_(ref.score.weight)
    ids, mask = _classification_batch()
    close(*(m(input_ids=ids, attention_mask=mask).logits for m in (ref, ours)), "logits of the new head")
    named = moelm.AutoModelForSequenceClassification.from_pretrained(path, label2id={"neg": 0, "pos": 1, "mid": 2})
    assert named.config.id2label == {0: "neg", 1: "pos", 2: "mid"} and named.score.out_features == 3
    with pytest.raises(ValueError, match="num_labels=2 but id2label / label2id name 3 labels"):
        moelm.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, label2id={"a": 0, "b": 1, "c": 2})


# ------------------------------------------------------------------ training: gradients

def _grads(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad for n in names}


def test_ernie_moe_gradients():
    ref, ours, _ = build("ernie4_5_moe", "eager", cache=False, use_bias=True, tie_word_embeddings=False,
                         moe_num_shared_experts=1, edit=_big_correction_bias)
    ref.train()
    ours.train()
    ids = tokens(seq=12)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids).masked_fill(mask == 0, -100),
                  output_router_logits=True)
    a = ref(**kwargs)
    b = ours(**kwargs)
    close(a.logits.detach(), b.logits.detach(), "train-mode logits")
    close(a.loss.detach(), b.loss.detach(), "train-mode loss (incl. aux)")
    a.loss.backward()
    b.loss.backward()
    moe_idx = [i for i, layer in enumerate(ours.model.layers) if hasattr(layer.mlp, "experts")]
    dense_idx = [i for i, layer in enumerate(ours.model.layers) if not hasattr(layer.mlp, "experts")]
    names = ["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", "model.norm.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
             "model.layers.1.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight",
             "model.layers.2.self_attn.o_proj.weight", "model.layers.1.input_layernorm.weight",
             f"model.layers.{dense_idx[0]}.mlp.gate_proj.weight"]
    for i in moe_idx:
        names += [f"model.layers.{i}.mlp.experts.gate_up_proj", f"model.layers.{i}.mlp.experts.down_proj",
                  f"model.layers.{i}.mlp.shared_experts.up_proj.weight",
                  f"model.layers.{i}.mlp.shared_experts.down_proj.bias"]
    ref_names = {n: n for n in names}
    ours_grads = _grads(ours, names)
    ref_grads = _grads(ref, list(ref_names.values()))
    for n in names:
        g_ours, g_ref = ours_grads[n], ref_grads[ref_names[n]]
        assert g_ref is not None and g_ours is not None, n
        assert g_ours.abs().max() > 0, f"{n}: zero gradient"
        close(g_ref, g_ours, f"grad {n}")
    # the router weight: the reference's gate.weight
    for i in moe_idx:
        close(ref.model.layers[i].mlp.gate.weight.grad, ours.model.layers[i].mlp.gate.weight.grad,
              f"grad layer {i} gate.weight")
        assert ours.model.layers[i].mlp.moe_statics.e_score_correction_bias.grad is None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_phimoe_train_jitter_gradients(attn):
    ref, ours, _ = build("phimoe", attn, cache=False, router_jitter_noise=0.5, input_jitter_noise=0.05,
                         attention_dropout=0.0, attention_bias=True, lm_head_bias=True, num_local_experts=8)
    ref.train()
    ours.train()
    ids = tokens(batch=4, seq=12)
    kwargs = dict(input_ids=ids, labels=labels_for(ids), output_router_logits=True)
    torch.manual_seed(1234)
    a = ref(**kwargs)
    torch.manual_seed(1234)
    b = ours(**kwargs)
    close(a.logits.detach(), b.logits.detach(), "train-mode logits (same RNG stream)")
    close(a.loss.detach(), b.loss.detach(), "train-mode loss")
    close_seq([r.detach() for r in a.router_logits], [r.detach() for r in b.router_logits], "router_logits")
    a.loss.backward()
    b.loss.backward()
    for i in range(len(ours.model.layers)):
        close(ref.model.layers[i].mlp.router.weight.grad, ours.model.layers[i].block_sparse_moe.gate.weight.grad,
              f"grad layer {i} router weight (sparsemixer backward)")
        close(ref.model.layers[i].mlp.experts.gate_up_proj.grad,
              ours.model.layers[i].block_sparse_moe.experts.gate_up_proj.grad, f"grad layer {i} gate_up_proj")
        close(ref.model.layers[i].mlp.experts.down_proj.grad,
              ours.model.layers[i].block_sparse_moe.experts.down_proj.grad, f"grad layer {i} down_proj")
        for proj in ("q_proj", "o_proj"):
            for kind in ("weight", "bias"):
                close(getattr(getattr(ref.model.layers[i].self_attn, proj), kind).grad,
                      getattr(getattr(ours.model.layers[i].self_attn, proj), kind).grad, f"grad {i} {proj}.{kind}")
        close(ref.model.layers[i].post_attention_layernorm.bias.grad,
              ours.model.layers[i].post_attention_layernorm.bias.grad, f"grad {i} post_attention_layernorm.bias")
    close(ref.model.embed_tokens.weight.grad, ours.model.embed_tokens.weight.grad, "grad embed_tokens")
    close(ref.lm_head.bias.grad, ours.lm_head.bias.grad, "grad lm_head.bias")
    # the noise is really on: another seed routes differently
    torch.manual_seed(99)
    with torch.no_grad():
        other = ours(**kwargs).logits
    assert not torch.allclose(other, b.logits.detach(), atol=1e-4)
    # and eval mode is deterministic and matches the reference
    ref.eval()
    ours.eval()
    x, y = run_both(ref, ours, input_ids=ids)
    close(x.logits, y.logits, "eval logits after training-mode forward")


REF_NAMES = [(".block_sparse_moe.gate.", ".mlp.router."), (".block_sparse_moe.", ".mlp."),
             (".mlp.moe_statics.", ".mlp.gate.moe_statics.")]  # moelm's parameter names -> transformers 5.23's


def ref_name(name: str) -> str:
    for ours, theirs in REF_NAMES:
        name = name.replace(ours, theirs)
    return name


def test_negative_pad_token_id_is_the_last_row():
    """pad_token_id -1 (transformers keeps it: nn.Embedding's padding_idx counts from the end): the last row of the
    embedding is the padding row and gets no gradient."""
    ref, ours, _ = build("ernie4_5", cache=False, pad_token_id=-1, tie_word_embeddings=False)
    last = ours.config.vocab_size - 1
    ids = tokens(seq=8)
    ids[:, ::3] = last
    for m in (ref, ours):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads = [m.model.embed_tokens.weight.grad for m in (ref, ours)]
    assert float(grads[1][last].abs().max()) == 0.0
    close(grads[0], grads[1], "embedding gradient")


@pytest.mark.parametrize("family,overrides", [
    ("ernie4_5", dict(use_bias=True, tie_word_embeddings=False)),
    ("ernie4_5_moe", dict(use_bias=True, moe_num_shared_experts=1, router_aux_loss_coef=0.3)),
    ("phimoe", dict(router_jitter_noise=0.2, input_jitter_noise=0.05, attention_bias=True, lm_head_bias=True,
                    router_aux_loss_coef=0.3)),
])
def test_every_gradient_matches(family, overrides):
    """Training mode, padding, labels and the aux loss: the gradient of every parameter equals the reference's
    (ERNIE with its correction bias set; PhiMoE through the sparsemixer's training path with seeded jitter)."""
    edit = _big_correction_bias if family == "ernie4_5_moe" else None
    ref, ours, _ = build(family, "eager", cache=False, edit=edit, **overrides)
    ref.train()
    ours.train()
    ids = tokens(batch=3, seq=12)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids).masked_fill(mask == 0, -100),
                  output_router_logits=family != "ernie4_5")
    torch.manual_seed(7)
    a = ref(**kwargs)
    torch.manual_seed(7)
    b = ours(**kwargs)
    close(a.loss.detach(), b.loss.detach(), "train-mode loss (with the aux loss)")
    a.loss.backward()
    b.loss.backward()
    theirs = dict(ref.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        q = theirs[ref_name(name)]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert p.grad.abs().max() > 0, f"{name}: zero gradient"
            close(q.grad, p.grad, f"grad {name}")
            compared += 1
    assert compared == sum(1 for p in ref.parameters() if p.grad is not None) > 10


@pytest.mark.parametrize("family", list(BASE))
def test_auto_model_is_the_base_model(family):
    """moelm.AutoModel, as transformers' AutoModel: the family's base model from a causal-LM checkpoint (its head
    left out), the same last hidden state, hidden states and (MoE) router logits."""
    ref, _, path = build(family)
    base = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = moelm.AutoModel.from_pretrained(path)
    assert type(ours).__name__ == type(base).__name__ and not hasattr(ours, "lm_head")
    ids = tokens()
    kwargs = dict(input_ids=ids, output_hidden_states=True)
    if family in MOE_FAMILIES:
        kwargs["output_router_logits"] = True
    with torch.no_grad():
        a, b = base(**kwargs), ours(**kwargs)
    close(a.last_hidden_state, b.last_hidden_state, "last_hidden_state")
    close_seq(a.hidden_states, b.hidden_states, "hidden_states")
    if family in MOE_FAMILIES:
        close_seq(a.router_logits, b.router_logits, "router_logits")
    fresh = moelm.AutoModel.from_config(ours.config, seed=0)
    assert type(fresh) is type(ours)


# ------------------------------------------------------------------ forward keywords and embedding accessors

@pytest.mark.parametrize("family", list(BASE))
def test_unknown_forward_keywords_are_errors(family):
    """A misspelt or unknown keyword is a TypeError naming it (transformers' **kwargs would drop it silently); for
    the causal LM, its base model and (PhiMoE) the classifier."""
    _, ours, _ = build(family)
    ids, mask = left_padded()
    models = [ours, ours.model] + ([_classifier(3)[1]] if family == "phimoe" else [])
    for model in models:
        with pytest.raises(TypeError, match=rf"{type(model).__name__}\.forward\(\) got unexpected keyword "
                                            r"argument\(s\) 'attenion_mask', 'totally_bogus'"):
            model(input_ids=ids, attenion_mask=mask, totally_bogus=123)
        with pytest.raises(TypeError, match="does not take NeMo's attn_kwargs.*'cu_seqlens'"):
            model(input_ids=ids, attention_mask=mask, attn_kwargs={"cu_seqlens": None})


@pytest.mark.parametrize("family", list(BASE))
def test_nemo_padding_mask_is_the_attention_masks_complement(family):
    """NeMo AutoModel's padding_mask (True at padding) and empty attn_kwargs: accepted where they say what
    attention_mask says (the same logits, loss and aux loss), else a TypeError saying to pass attention_mask."""
    _, ours, _ = build(family)
    ids, mask = left_padded()
    kwargs = forward_kwargs(family, input_ids=ids, attention_mask=mask, labels=labels_for(ids))
    with torch.no_grad():
        want, got = ours(**kwargs), ours(**kwargs, padding_mask=mask == 0, attn_kwargs={})
        plain = ours.model(input_ids=ids[1:2], padding_mask=torch.zeros(1, ids.shape[1], dtype=torch.bool))
    assert torch.equal(want.logits, got.logits) and torch.equal(want.loss, got.loss)
    assert family not in MOE_FAMILIES or torch.equal(want.aux_loss, got.aux_loss)
    assert plain.last_hidden_state.shape[:2] == (1, ids.shape[1])
    for bad in (dict(input_ids=ids, padding_mask=mask == 0),  # padding that attention_mask does not say
                dict(input_ids=ids, attention_mask=mask, padding_mask=mask == 1),
                dict(input_ids=ids, attention_mask=mask, padding_mask=(mask == 0)[:, 1:])):
        with pytest.raises(TypeError, match="padding_mask.*pass attention_mask=~padding_mask instead"):
            ours(**bad)


@pytest.mark.parametrize("family", list(BASE))
def test_embedding_accessors_as_transformers(family):
    """get_output_embeddings, set_input_embeddings and set_output_embeddings (causal LM; the base model's input
    embeddings too) replace the modules forward uses, as transformers' do."""
    ref, ours, _ = build(family, cache=False, tie_word_embeddings=False)
    assert ours.get_output_embeddings() is ours.lm_head and ours.model.get_output_embeddings() is None
    hidden = ref.config.hidden_size
    emb, head = torch.nn.Embedding(VOCAB, hidden), torch.nn.Linear(hidden, VOCAB, bias=ref.lm_head.bias is not None)
    torch.nn.init.normal_(emb.weight)
    for model in (ref, ours):
        model.set_input_embeddings(copy.deepcopy(emb))
        model.set_output_embeddings(copy.deepcopy(head))
    assert isinstance(ours.get_output_embeddings(), torch.nn.Linear)
    assert torch.equal(ours.get_input_embeddings().weight, emb.weight)
    ids = tokens()
    with torch.no_grad():
        close(ref(input_ids=ids).logits, ours(input_ids=ids).logits, "logits with the new embeddings and head")
    base = ours.model
    base.set_input_embeddings(emb)
    assert base.get_input_embeddings() is emb and ours.get_input_embeddings() is emb


@pytest.mark.parametrize("family,overrides", [("ernie4_5", dict(tie_word_embeddings=True)),
                                              ("ernie4_5_moe", dict(tie_word_embeddings=False, use_bias=True)),
                                              ("phimoe", dict(lm_head_bias=True))])
@pytest.mark.parametrize("new,pad,mean", [(340, None, True), (340, 64, False), (250, None, True), (None, 128, True)])
def test_resize_token_embeddings_as_transformers(family, overrides, new, pad, mean):
    """resize_token_embeddings grows or cuts the embedding and an untied head (bias included) as transformers does:
    the kept rows unchanged, the added ones around the old mean (mean_resizing: 1e-9 times the covariance, so within
    1e-4 of transformers' own draw), config.vocab_size, padding_idx and the tie followed; the resized model saves and
    transformers loads it."""
    ref, ours, _ = build(family, cache=False, **overrides)
    torch.manual_seed(0)
    expected = ref.resize_token_embeddings(new, pad_to_multiple_of=pad, mean_resizing=mean)
    got = ours.resize_token_embeddings(new, pad_to_multiple_of=pad, mean_resizing=mean)
    size = ref.config.vocab_size
    assert got is ours.get_input_embeddings() and ours.config.vocab_size == size and got.num_embeddings == size
    assert got.padding_idx == expected.padding_idx and ours.lm_head.out_features == size
    assert (ours.lm_head.weight is got.weight) == (ref.lm_head.weight is expected.weight)
    kept = min(size, VOCAB)
    for a, b in ((expected.weight, got.weight), (ref.lm_head.weight, ours.lm_head.weight),
                 (ref.lm_head.bias, ours.lm_head.bias)):
        if a is None:
            assert b is None
            continue
        assert b.shape == a.shape and b.requires_grad
        assert torch.equal(a[:kept], b[:kept])
        if mean and size > VOCAB:
            close(a[kept:], b[kept:], "rows added around the old mean")
    with torch.no_grad():  # transformers' draw for the added rows, then the same logits for every token
        got.weight.copy_(expected.weight)
        ours.lm_head.weight.copy_(ref.lm_head.weight)
        ids = torch.randint(1, size, (2, 9), generator=torch.Generator().manual_seed(3))
        close(ref(input_ids=ids).logits, ours(input_ids=ids).logits, "logits after resizing")
        path = new_dir()
        ours.save_pretrained(path)
        again = type(ref).from_pretrained(path, attn_implementation="eager")
        close(ref(input_ids=ids).logits, again(input_ids=ids).logits, "the resized model saved by moelm")


def test_resize_token_embeddings_errors():
    _, ours, path = build("ernie4_5", cache=False)
    assert ours.resize_token_embeddings() is ours.get_input_embeddings() and ours.config.vocab_size == VOCAB
    for bad in (dict(new_num_tokens=0), dict(new_num_tokens="320"), dict(new_num_tokens=320.0),
                dict(pad_to_multiple_of=0), dict(pad_to_multiple_of=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ours.resize_token_embeddings(**bad)
    quantized = moelm.AutoModelForCausalLM.from_pretrained(path, quantization="int8")
    with pytest.raises(TypeError, match="LM head.*QuantizedLinear.*before quantizing"):
        quantized.resize_token_embeddings(320)
    assert quantized.config.vocab_size == VOCAB
