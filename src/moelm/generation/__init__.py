"""generate(): GenerationConfig (.config), the one sampler of generate and the server (.sampling), the decoding
loops and beam search (.generate)."""
from .config import DEFAULT_NEW_TOKENS, GENERATION_CONFIG_NAME, GenerationConfig
from .generate import GenerateOutput, GenerationMixin, generate_tokens
from .sampling import Sampling, SamplingError, apply_penalties, choose, warp

__all__ = ["DEFAULT_NEW_TOKENS", "GENERATION_CONFIG_NAME", "GenerationConfig", "GenerateOutput", "GenerationMixin",
           "generate_tokens", "Sampling", "SamplingError", "apply_penalties", "choose", "warp"]
