"""generate(): decoding loops, beam search, the one sampler, GenerationConfig."""
