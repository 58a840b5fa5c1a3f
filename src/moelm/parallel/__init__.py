"""Tensor and expert parallelism on torch.distributed, applied to an unchanged model: the plans (data, in
transformers' vocabulary), DistributedConfig and its meshes, the sharded forms, loading and saving, the per-rank
memory and communication plans."""
from .config import DistributedConfig
from .memory import memory_plan
from .plans import EP_PLANS, TP_PLANS, check_sizes, plan_for

__all__ = ["DistributedConfig", "EP_PLANS", "TP_PLANS", "check_sizes", "memory_plan", "plan_for"]
