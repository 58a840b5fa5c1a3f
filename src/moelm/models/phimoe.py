"""PhiMoE (Phi-3.5-MoE): LayerNorm with bias, half-split RoPE (LongRoPE), 16 experts routed by sparsemixer."""
from __future__ import annotations

import torch
from torch import nn

from ..config import PhimoeConfig
from ..nn.layers import DecoderLayer
from ..nn.moe import Experts, sparsemixer
from ..nn.rope import cos_sin, inv_freq_and_scale, rotate_half_split
from .modeling import CausalLM, DecoderModel, Router, SequenceClassification


class PhimoeSparseMoeBlock(nn.Module):
    def __init__(self, config: PhimoeConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config.num_local_experts, config.hidden_size)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.intermediate_size)

    def routing_spec(self) -> tuple[str, int, float, float] | None:
        """(routing kind, top-k, norm_min, jitter) for kernels that run the block whole (moelm.inference); None
        in training (jitter noise, sampled picks)."""
        return None if self.training else ("sparsemixer", 2, 0.0, self.config.router_jitter_noise)

    def routed(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing forward does at inference, from its router logits [T, E]: weights [T, 2], index [T, 2]."""
        return sparsemixer(logits, self.config.router_jitter_noise, False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h = x.shape
        noise = self.config.input_jitter_noise
        if self.training and noise > 0:  # the reference jitters twice: in the block and again in the router
            x = x * torch.empty_like(x).uniform_(1.0 - noise, 1.0 + noise)
        flat = x.reshape(-1, h)  # [T, H]
        if self.training and noise > 0:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - noise, 1.0 + noise)
        logits = self.gate(flat)  # [T, E]
        weights, index = sparsemixer(logits, self.config.router_jitter_noise, self.training)
        return self.experts(flat, index, weights).reshape(b, s, h), logits


class PhimoeModel(DecoderModel):
    config_class = PhimoeConfig

    def __init__(self, config: PhimoeConfig):
        def norm():
            return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)

        def layer(cfg, i):
            return DecoderLayer(cfg, i, norm, PhimoeSparseMoeBlock(cfg), "block_sparse_moe", cfg.attention_bias,
                                rotate_half_split)

        super().__init__(config, layer, norm)
        self.sliding_window = config.sliding_window

    def rotary(self, x, position_ids):
        """As the reference: the short factors always; past original_max_position_embeddings only the
        mscale switches to long_mscale. cos/sin in x's dtype."""
        rope = self.config.rope_parameters
        inv_freq, scale = inv_freq_and_scale(rope, self.config.head_size, self.config.max_position_embeddings)
        if rope["rope_type"] != "default":
            seq_len = int(position_ids.max()) + 1
            original = rope.get("original_max_position_embeddings", self.config.max_position_embeddings)
            scale = rope["long_mscale"] if seq_len > original else rope["short_mscale"]
        cos, sin = cos_sin(inv_freq, position_ids, scale)
        return cos.to(x.dtype), sin.to(x.dtype)


class PhimoeForCausalLM(CausalLM):
    config_class = PhimoeConfig
    base_class = PhimoeModel

    def __init__(self, config: PhimoeConfig):
        self.lm_head_bias = config.lm_head_bias
        super().__init__(config)

    def needs_cache_reset(self, past_length: int, total_length: int) -> bool:
        """As the reference's prepare_inputs_for_generation: when the (padded) length first passes
        original_max_position_embeddings, the cached keys (rotated with the short mscale) are dropped and the whole
        sequence is run again."""
        rope = self.config.rope_parameters
        original = rope.get("original_max_position_embeddings") if rope["rope_type"] != "default" else None
        original = original or self.config.extra.get("original_max_position_embeddings")
        return original is not None and total_length >= original + 1 and past_length <= original


class PhimoeForSequenceClassification(SequenceClassification):
    config_class = PhimoeConfig
    base_class = PhimoeModel


ModelClass = PhimoeForCausalLM  # the name NeMo AutoModel's model registry reads from a model file
