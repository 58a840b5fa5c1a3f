"""Text: tokenizers, SentencePiece conversion (also to and from GGUF metadata), chat templates, incremental
detokenising and streamers."""
from .detokenize import Detokenizer
from .stops import StopStrings
from .streamers import TextIteratorStreamer, TextStreamer
from .tokenizer import AutoTokenizer

__all__ = ["AutoTokenizer", "Detokenizer", "StopStrings", "TextIteratorStreamer", "TextStreamer"]
