"""Text: tokenizers, SentencePiece conversion, chat templates, incremental detokenising and streamers."""
