"""Tensor and expert parallelism: the plans (data, in transformers' vocabulary) and the per-rank memory plan. The
plans are applied to an unchanged model; applying them on torch.distributed is not implemented yet."""
from .memory import memory_plan
from .plans import EP_PLANS, TP_PLANS, check_sizes, plan_for

__all__ = ["EP_PLANS", "TP_PLANS", "check_sizes", "memory_plan", "plan_for"]
