"""moelm bench: runner (moelm vs transformers and llama.cpp on random weights), machine, report, cli, gguf, llamacpp."""
from .cli import main

__all__ = ["main"]
