"""NeMo AutoModel's face: BackendConfig chooses the implementation of each part of an unchanged model (every choice
computes the same numbers), get_capabilities says which parallelisms moelm really runs for a config, and
moe_config / moe_overrides set the MoE fields of the config under NeMo's names."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from ..nn.layers import Attention, RMSNorm
from ..nn.moe import Experts

CHOICES = {
    "attn": ("sdpa", "eager", "flex"),
    "rms_norm": ("torch", "torch_fp32"),
    "experts": ("torch", "torch_mm", "grouped_mm", "bmm"),  # torch: grouped_mm where it runs, else bmm
    "dispatcher": ("torch", "all_to_all", "all_reduce"),
}
ELSEWHERE = {"te": "Transformer Engine", "deepep": "DeepEP", "uccl_ep": "UCCL-EP",
             "hybridep": "HybridEP", "tilelang": "TileLang", "torch_mm_mxfp8": "torchao MXFP8"}


@dataclass(kw_only=True)
class BackendConfig:
    """attn: "sdpa" | "eager" | "flex" (torch's flex_attention); rms_norm: "torch" (torch's rms_norm in fp32) |
    "torch_fp32" (the formula in fp32); experts: "torch" | "torch_mm" / "grouped_mm" (torch._grouped_mm) | "bmm"
    (experts padded to one batched matmul); dispatcher: the EP token exchange, "torch" (moelm's choice: all_reduce
    when a group shares its batch at inference, else all_to_all) | "all_to_all" | "all_reduce"."""

    attn: str = "sdpa"
    linear: str = "torch"
    rms_norm: str = "torch_fp32"
    experts: str = "torch"
    dispatcher: str = "torch"
    rope_fusion: bool = False
    fake_balanced_gate: bool = False
    enable_hf_state_dict_adapter: bool = True

    def __post_init__(self):
        if self.experts == "gmm":  # as nemo_automodel 0.7.0
            warnings.warn("experts='gmm' is deprecated; use experts='torch_mm' instead.", FutureWarning, stacklevel=3)
            self.experts = "torch_mm"
        for name, allowed in (*CHOICES.items(), ("linear", ("torch",))):
            value = getattr(self, name)
            if value in ELSEWHERE:
                raise NotImplementedError(f"BackendConfig({name}={value!r}): {ELSEWHERE[value]} is not available in "
                                          f"moelm; choose one of {allowed}")
            if value not in allowed:
                raise ValueError(f"BackendConfig({name}={value!r}): choose one of {allowed}")
        for name in ("rope_fusion", "fake_balanced_gate"):
            if getattr(self, name):
                raise NotImplementedError(f"BackendConfig({name}=True) is not implemented in moelm")
        if not self.enable_hf_state_dict_adapter:
            raise ValueError("BackendConfig(enable_hf_state_dict_adapter=False): moelm always reads and writes the "
                             "hub layout")


@dataclass(frozen=True)
class ModelCapabilities:
    """NeMo's fields: those of nemo_automodel 0.7.0 (supports_thd ... supports_cp_vision_frame_sharding) and of its
    main branch (cp_style, cp_layout)."""

    supports_tp: bool = False
    supports_cp: bool = False
    supports_pp: bool = False
    supports_ep: bool = False
    supports_thd: bool = False
    supports_mtp_cp: bool = False
    supports_mtp_cp_pp: bool = False
    supports_cp_vision_frame_sharding: bool = False
    cp_style: str = "none"
    cp_layout: str = "none"


def get_capabilities(config) -> ModelCapabilities:
    """What moelm runs for this config: TP for every family (attention, MLPs, experts, vocab), EP where there are
    experts; no context or pipeline parallelism."""
    return ModelCapabilities(supports_tp=True, supports_ep=bool(getattr(config, "num_experts", None)))


# NeMo MoEConfig names -> moelm config fields (aliases resolve per family)
MOE_FIELDS = {"n_routed_experts": "num_experts", "n_activated_experts": "num_experts_per_tok",
              "n_shared_experts": "moe_num_shared_experts", "moe_inter_dim": "moe_intermediate_size",
              "aux_loss_coeff": "router_aux_loss_coef", "gate_bias_update_factor": "gate_bias_update_factor"}


def apply_moe_overrides(config, moe_config=None, moe_overrides: dict | None = None):
    """Set the config's MoE fields from NeMo's MoEConfig names (a dict or an object with those attributes), the
    overrides last. A name moelm does not map is an error naming it."""
    values = {}
    if moe_config is not None:
        values.update(dataclasses.asdict(moe_config) if dataclasses.is_dataclass(moe_config) else dict(moe_config))
    values.update(moe_overrides or {})
    if values and not getattr(config, "num_experts", None):
        raise ValueError(f"moe_config / moe_overrides given for {config.model_type}, which has no experts")
    for key, value in values.items():
        field = MOE_FIELDS.get(key, key)
        if not config.has_field(field):
            raise TypeError(f"moe_config/moe_overrides: {key!r} is not a MoE setting of {type(config).__name__} "
                            f"(NeMo names moelm maps: {', '.join(MOE_FIELDS)})")
        setattr(config, field, value)
    config.validate()


class FlexAttention(Attention):
    """attend() through torch's flex_attention, with the same mask."""

    def attend(self, q, k, v, mask, dropout):
        from torch.nn.attention.flex_attention import flex_attention

        if dropout:
            raise NotImplementedError("attention dropout with BackendConfig(attn='flex')")
        q_len, kv_len = q.shape[2], k.shape[2]
        if mask is None:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)[None, None]
        mask = mask.expand(q.shape[0], 1, q_len, kv_len)

        def score_mod(score, b, h, qi, ki):
            return torch.where(mask[b, 0, qi, ki], score, -float("inf"))

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(q, k, v, score_mod=score_mod, scale=self.scaling,
                                  enable_gqa=self.num_heads != self.num_kv_heads)


class FormulaRMSNorm(RMSNorm):
    """x * rsqrt(mean(x^2) + eps) written out in fp32, as the reference does."""

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def apply_backend(model, backend: BackendConfig | dict | None):
    """Set each part's implementation on `model` (built with fast=False: the inference fast paths replace these
    modules with their own kernels)."""
    if backend is None:
        return model
    backend = BackendConfig(**backend) if isinstance(backend, dict) else backend
    model.config.attn_implementation = "eager" if backend.attn == "eager" else "sdpa"
    for module in model.modules():
        if type(module) is Attention and backend.attn == "flex":
            module.__class__ = FlexAttention
        elif type(module) is RMSNorm and backend.rms_norm == "torch_fp32":
            module.__class__ = FormulaRMSNorm
        elif isinstance(module, Experts):
            module.path = {"torch": "auto", "torch_mm": "grouped_mm"}.get(backend.experts, backend.experts)
    model.backend = backend
    return model
