"""Named configs: the real models' shapes and tiny ones for tests (`moelm.named_config(name)`)."""
from __future__ import annotations

import copy

from .base import PretrainedConfig
from .families import Ernie4_5_MoeConfig, Ernie4_5Config, PhimoeConfig

_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)
NAMED_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "ernie-4.5-0.3b": (Ernie4_5Config, dict(rope_theta=500000.0, max_position_embeddings=131072)),
    "ernie-4.5-21b-a3b": (Ernie4_5_MoeConfig, dict(
        moe_layer_start_index=1, moe_layer_end_index=27, num_nextn_predict_layers=1)),
    "ernie-4.5-300b-a47b": (Ernie4_5_MoeConfig, dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=54, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, moe_intermediate_size=3584, moe_k=8, moe_num_shared_experts=0,
        moe_layer_start_index=3, moe_layer_end_index=53, num_nextn_predict_layers=1)),
    # short_factor/long_factor below are placeholders (all 1.0): the real microsoft/Phi-3.5-MoE-instruct config.json
    # carries its own 64+64 longrope factors, and loading that checkpoint reads them from config.json.
    "phi-3.5-moe": (PhimoeConfig, dict(
        rope_theta=10000.0, max_position_embeddings=131072, sliding_window=131072, attention_bias=True,
        lm_head_bias=True, router_jitter_noise=0.01, input_jitter_noise=0.01, bos_token_id=1, eos_token_id=32000,
        rms_norm_eps=1e-5, original_max_position_embeddings=4096,
        rope_scaling=dict(type="longrope", short_mscale=1.243163121016122, long_mscale=1.243163121016122,
                          original_max_position_embeddings=4096, short_factor=[1.0] * 64,
                          long_factor=[1.0] * 64))),
    "ernie4_5-tiny": (Ernie4_5Config, dict(_TINY, vocab_size=512, intermediate_size=128, head_dim=16)),
    "ernie4_5_moe-tiny": (Ernie4_5_MoeConfig, dict(
        _TINY, vocab_size=512, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1)),
    "phimoe-tiny": (PhimoeConfig, dict(
        _TINY, vocab_size=512, intermediate_size=64, num_local_experts=4, rope_theta=10000.0)),
}


def named_config(name: str) -> PretrainedConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config name {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    cls, kwargs = NAMED_CONFIGS[name]
    return cls(**copy.deepcopy(kwargs))
