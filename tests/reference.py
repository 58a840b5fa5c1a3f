"""Helpers to build reference (transformers) models with every weight randomised and compare with moelm."""
from __future__ import annotations

import torch

import moelm

REF_CLASSES = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
               "phimoe": "PhimoeForCausalLM"}


def reference_config(model_type: str, **kwargs):
    import transformers

    cls = {"ernie4_5": transformers.Ernie4_5Config, "ernie4_5_moe": transformers.Ernie4_5_MoeConfig,
           "phimoe": transformers.PhimoeConfig}[model_type]
    return cls(**kwargs)


def random_checkpoint(name: str, overrides: dict, path):
    """named_config(name) with `overrides`, every weight randomised (randomise), saved in hub format at `path`."""

    config = moelm.named_config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False)
    randomise(model, seed=1)
    model.save_pretrained(path)
    return path


@torch.no_grad()
def randomise(model, seed: int = 0):
    """Every parameter away from its init: norms around 1, biases and the correction bias non-zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)
        elif "e_score_correction_bias" in name:
            p.copy_(0.05 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.08 * noise)
    return model


def randomise_scaled(model, seed: int, scale: float, mtp: bool = False):
    """ERNIE's MTP head added first if asked (add_mtp), every weight random (randomise), then the matrices times
    `scale`, so that greedy decoding wanders (4) or wanders and repeats itself (2)."""
    if mtp:
        model.add_mtp()
    randomise(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and not name.endswith("bias"):
                p.mul_(scale)
    return model


def reference_model(model_type: str, seed: int = 0, cls_name: str | None = None, attn: str = "eager", **kwargs):
    import transformers

    config = reference_config(model_type, **kwargs)
    config._attn_implementation = attn
    cls = getattr(transformers, cls_name or REF_CLASSES[model_type])
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    return randomise(model, seed)


def save_reference(model, path) -> None:
    model.save_pretrained(path)


def assert_close(a, b, atol=1e-4, rtol=1e-4, msg=""):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


def mtp_by_hand(m, ids: torch.Tensor) -> torch.Tensor:
    """ERNIE's MTP formula (its training code) written out for a moelm model with a head, over whole sequences with
    no padding: logits [B, L - 1, V] for the tokens at p + 2 of positions p = 0..L-2."""
    return _mtp_layer_by_hand(m, ids[:, 1:], _prenorm(m, ids)[:, :-1])[1]


def mtp_chain_by_hand(m, ids: torch.Tensor, k: int) -> torch.Tensor:
    """k greedy drafts [B, k] after ids [B, L] as vLLM's MTP proposer makes them with a one-layer head: the first by
    the formula above; each next one with the draft before as the next token and the head's own output (before the
    final norm) at the last position as its hidden state, the whole sequence recomputed (no cache)."""
    next_ids, hidden = ids[:, 1:], _prenorm(m, ids)[:, :-1]
    drafts = []
    for _ in range(k):
        states, logits = _mtp_layer_by_hand(m, next_ids, hidden)
        drafts.append(logits[:, -1].argmax(-1))
        next_ids, hidden = torch.cat([next_ids, drafts[-1][:, None]], 1), torch.cat([hidden, states[:, -1:]], 1)
    return torch.stack(drafts, 1)


def _prenorm(m, ids: torch.Tensor) -> torch.Tensor:
    """The main model's last decoder layer output before the final norm [B, L, H]."""
    seen = []
    hook = m.model.norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        m.model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    return seen[-1]


def _mtp_layer_by_hand(m, next_ids: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's layer output [B, S, H], logits [B, S, V]) of positions 0..S-1 given the next tokens [B, S] and
    the hidden states [B, S, H] there."""
    from moelm.nn.layers import DecoderLayer

    base = m.model

    def rms(x, w, eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    eps = m.config.rms_norm_eps
    emb = base.embed_tokens.weight[next_ids].clone()
    emb[:, 0] = 0  # position 0
    proj = base.mtp_linear_proj[0]
    x = torch.cat([rms(emb, base.mtp_emb_norm[0].weight, eps), rms(hidden, base.mtp_hidden_norm[0].weight, eps)],
                  -1) @ proj.weight.T + (0 if proj.bias is None else proj.bias)
    pos = torch.arange(x.shape[1])[None]
    x, _, _ = DecoderLayer.forward(base.mtp_block[0], x, base.rotary(x, pos), None, None)  # the layer op by op
    return x, m.lm_head(rms(x, base.norm.weight, eps))


@torch.no_grad()
def constant_moe_input(layer):
    """A PhiMoE decoder layer's MoE block made to see the same input for every token: its LayerNorm's weight 0 and
    bias e_0, so the router's scores are the gate's column 0."""
    norm = layer.post_attention_layernorm
    norm.weight.zero_()
    norm.bias.zero_()
    norm.bias[0] = 1.0
