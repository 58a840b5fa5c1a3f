"""Training, applied to an unchanged model (issue 14, in progress): so far ERNIE's aux-free load balancing."""
from .balance import ExpertLoad, update_correction_bias

__all__ = ["ExpertLoad", "update_correction_bias"]
