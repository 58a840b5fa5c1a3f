"""The config classes of the three families: their fields are the hub's config.json keys, with the reference's
defaults; each describes its MoE layout for `moelm info`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import PretrainedConfig


@dataclass(init=False, repr=False)
class Ernie4_5Config(PretrainedConfig):
    model_type: ClassVar[str] = "ernie4_5"
    default_theta: ClassVar[float] = 500000.0
    default_architecture: ClassVar[str] = "Ernie4_5ForCausalLM"
    hub_architectures: ClassVar[tuple[str, ...]] = ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM", "Ernie4_5Model")

    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-05
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    use_bias: bool = False
    head_dim: int | None = 128

    def _derive(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass(init=False, repr=False)
class Ernie4_5_MoeConfig(PretrainedConfig):
    model_type: ClassVar[str] = "ernie4_5_moe"
    default_theta: ClassVar[float] = 500000.0
    default_architecture: ClassVar[str] = "Ernie4_5_MoeForCausalLM"
    hub_architectures: ClassVar[tuple[str, ...]] = ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeModel")
    attribute_map: ClassVar[dict[str, str]] = {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k"}
    # the -PT checkpoints' MTP head: its depth (from_config adds a head that deep; from_pretrained loads the
    # checkpoint's model.mtp_* tensors) and its loss's weight in training (moelm.train: moe.mtp_loss_coef null)
    optional_keys: ClassVar[tuple[str, ...]] = PretrainedConfig.optional_keys + ("num_nextn_predict_layers",
                                                                                 "multi_token_pred_lambda")

    vocab_size: int = 103424
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    use_bias: bool = False
    moe_intermediate_size: int = 1536
    moe_k: int = 6
    moe_num_experts: int = 64
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    head_dim: int | None = None

    def _derive(self):
        # Real hub configs may give per-modality lists; the text layers span their min..max.
        if isinstance(self.moe_layer_start_index, (list, tuple)):
            self.moe_layer_start_index = min(self.moe_layer_start_index)
        if isinstance(self.moe_layer_end_index, (list, tuple)):
            self.moe_layer_end_index = max(self.moe_layer_end_index)
        if self.moe_layer_end_index == -1:
            self.moe_layer_end_index = self.num_hidden_layers - 1
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self):
        super().validate()
        if self.moe_k > self.moe_num_experts:
            raise ValueError(f"moe_k ({self.moe_k}) must not exceed moe_num_experts ({self.moe_num_experts})")
        if self.moe_num_shared_experts < 0:
            raise ValueError(f"moe_num_shared_experts must be >= 0, got {self.moe_num_shared_experts}")
        if self.moe_layer_interval <= 0:
            raise ValueError(f"moe_layer_interval must be positive, got {self.moe_layer_interval}")
        mtp = self.extra.get("num_nextn_predict_layers")
        if mtp is not None and (not isinstance(mtp, int) or isinstance(mtp, bool) or mtp < 0):
            raise ValueError(f"num_nextn_predict_layers must be an integer >= 0, got {mtp!r}")

    def is_moe_layer(self, i: int) -> bool:
        return ((i + 1) % self.moe_layer_interval == 0
                and self.moe_layer_start_index <= i <= self.moe_layer_end_index)

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def moe_summary(self) -> str:
        layers = self.moe_layers()
        return (f"{len(layers)} MoE layers ({_ranges(layers)}), {self.moe_num_experts} experts, top-{self.moe_k}, "
                f"{self.moe_num_shared_experts} shared, expert width {self.moe_intermediate_size}")


@dataclass(init=False, repr=False)
class PhimoeConfig(PretrainedConfig):
    model_type: ClassVar[str] = "phimoe"
    default_theta: ClassVar[float] = 1000000.0
    default_architecture: ClassVar[str] = "PhimoeForCausalLM"
    hub_architectures: ClassVar[tuple[str, ...]] = ("PhimoeForCausalLM", "PhiMoEForCausalLM", "PhimoeModel",
                                                     "PhimoeForSequenceClassification")
    top_level_original_max_wins: ClassVar[bool] = False

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 6400
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_local_experts: int = 16
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.01
    input_jitter_noise: float = 0.0
    attention_bias: bool = False
    lm_head_bias: bool = False

    def validate(self):
        super().validate()
        if self.num_experts_per_tok != 2:
            raise ValueError(f"PhiMoE's sparsemixer routes exactly 2 experts per token, "
                             f"got num_experts_per_tok={self.num_experts_per_tok}")
        if self.num_local_experts < 2:
            raise ValueError(f"num_local_experts must be >= 2, got {self.num_local_experts}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or null, got {self.sliding_window}")
        rope = self.rope_parameters
        if rope["rope_type"] != "default":
            for key in ("short_mscale", "long_mscale"):
                if not isinstance(rope.get(key), (int, float)):
                    raise ValueError(f"rope_parameters.{key} must be a number for PhiMoE's "
                                     f"{rope['rope_type']!r} rope, got {rope.get(key)!r}")

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))

    def moe_summary(self) -> str:
        return (f"all {self.num_hidden_layers} layers, {self.num_local_experts} experts, top-2 sparsemixer, "
                f"expert width {self.intermediate_size}")


def _ranges(xs: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    if not xs:
        return "none"
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ", ".join(out)
