"""The norms' fast modules (optimize() swaps them in): a decoding step's few rows normalised in one C pass."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import RMSNorm
from . import kernels


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1] % 8 == 0 \
                and self.weight.is_contiguous() and not kernels.plain_only(x) and kernels.usable(x, self.weight):
            return kernels.rmsnorm(x, self.weight, self.variance_epsilon)  # decode: one C pass
        return super().forward(x)


class FastLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.usable(x) and not kernels.plain_only(x) and kernels.usable(x, self.weight, self.bias):
            return kernels.layernorm(x, self.weight, self.bias, self.eps)  # decode: one C pass
        return super().forward(x)

    def usable(self, x: torch.Tensor) -> bool:
        """Whether kernels.layernorm computes this norm of x (fp32 or bf16 with weights of its dtype, affine, over
        its last dimension only)."""
        return x.dtype in (torch.float32, torch.bfloat16) and self.weight is not None \
            and self.weight.dtype == x.dtype and len(self.normalized_shape) == 1 and x.shape[-1] % 8 == 0 \
            and self.weight.is_contiguous() and (self.bias is None or self.bias.dtype == x.dtype
                                                 and self.bias.is_contiguous())
