"""Inference, applied to an unchanged model after loading: the static KV cache, CPU kernels and their choice per
machine, fused projections and one-call decoding steps (`optimize`), int8/int4 and bitsandbytes weights."""
from .cache import StaticCache
from .modules import optimize

__all__ = ["StaticCache", "optimize"]
