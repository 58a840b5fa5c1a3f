"""ERNIE 4.5 dense (0.3B): Llama-style decoder with interleaved fp32 RoPE and optional biases."""
from __future__ import annotations

import torch

from ..config import Ernie4_5Config
from ..nn.layers import MLP, DecoderLayer, RMSNorm
from ..nn.rope import SEQ_DEPENDENT, cos_sin, inv_freq_and_scale, rotate_interleaved
from .modeling import CausalLM, DecoderModel


def ernie_cos_sin(config, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [B, S, D/2]; dynamic and longrope frequencies follow the batch's max position."""
    seq_len = None
    if config.rope_parameters["rope_type"] in SEQ_DEPENDENT:
        seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 1
    inv_freq, scale = inv_freq_and_scale(config.rope_parameters, config.head_size, config.max_position_embeddings,
                                         seq_len)
    return cos_sin(inv_freq, position_ids, scale)


def no_attention_dropout(layer: DecoderLayer) -> DecoderLayer:
    """transformers' ERNIE attention has no dropout, whatever attention_dropout a config.json carries."""
    layer.self_attn.dropout = 0.0
    return layer


class Ernie4_5Model(DecoderModel):
    config_class = Ernie4_5Config

    def __init__(self, config: Ernie4_5Config):
        def norm():
            return RMSNorm(config.hidden_size, config.rms_norm_eps)

        def layer(cfg, i):
            return no_attention_dropout(DecoderLayer(cfg, i, norm, self.make_mlp(cfg, i), "mlp", cfg.use_bias,
                                                     rotate_interleaved))

        super().__init__(config, layer, norm)

    @staticmethod
    def make_mlp(config, layer_idx: int):
        return MLP(config.hidden_size, config.intermediate_size, bias=config.use_bias)

    def rotary(self, x, position_ids):
        return ernie_cos_sin(self.config, position_ids)

    def rotation_changes(self, length: int, longer: int) -> bool:
        """dynamic and longrope frequencies follow the forward's largest position (ernie_cos_sin)."""
        rope = self.config.rope_parameters
        if rope["rope_type"] not in SEQ_DEPENDENT:
            return False
        a, b = (inv_freq_and_scale(rope, self.config.head_size, self.config.max_position_embeddings, n)
                for n in (length, longer))
        return a[1] != b[1] or not torch.equal(a[0], b[0])


class Ernie4_5ForCausalLM(CausalLM):
    config_class = Ernie4_5Config
    base_class = Ernie4_5Model


ModelClass = Ernie4_5ForCausalLM  # the name NeMo AutoModel's model registry reads from a model file
