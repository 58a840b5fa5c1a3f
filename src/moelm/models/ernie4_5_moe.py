"""ERNIE 4.5 MoE (21B-A3B, 300B-A47B): ERNIE 4.5 attention, dense and MoE layers (routed + shared experts)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Ernie4_5_MoeConfig
from ..nn.layers import MLP
from ..nn.moe import Experts, ernie_route
from .ernie4_5 import Ernie4_5Model
from .modeling import CausalLM, Router


class MoeStatics(nn.Module):
    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32),
                                                    requires_grad=False)


class Ernie4_5_MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config.moe_num_experts, config.hidden_size, dtype=torch.float32)
        self.moe_statics = MoeStatics(config.moe_num_experts)
        self.experts = Experts(config.moe_num_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.moe_num_shared_experts
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * shared,
                                  bias=config.use_bias) if shared else None

    def routing_spec(self) -> tuple[str, int, float, float]:
        """(routing kind, top-k, norm_min, jitter) for kernels that run the block whole (moelm.inference)."""
        return "ernie", self.config.moe_k, self.config.moe_norm_min, 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h = x.shape
        flat = x.reshape(-1, h)  # [T, H]
        logits, weights, index = ernie_route(flat, self.gate.weight, self.moe_statics.e_score_correction_bias,
                                             self.config.moe_k, self.config.moe_norm_min)
        out = self.experts(flat, index, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(b, s, h).to(x.dtype), logits


class Ernie4_5_MoeModel(Ernie4_5Model):
    config_class = Ernie4_5_MoeConfig
    keep_in_fp32 = ("gate.weight", "e_score_correction_bias")

    @staticmethod
    def make_mlp(config, layer_idx: int):
        if config.is_moe_layer(layer_idx):
            return Ernie4_5_MoeSparseMoeBlock(config)
        return MLP(config.hidden_size, config.intermediate_size, bias=config.use_bias)


class Ernie4_5_MoeForCausalLM(CausalLM):
    config_class = Ernie4_5_MoeConfig
    base_class = Ernie4_5_MoeModel
    keep_in_fp32 = Ernie4_5_MoeModel.keep_in_fp32

    def __init__(self, config: Ernie4_5_MoeConfig):
        self.lm_head_bias = config.use_bias
        super().__init__(config)
