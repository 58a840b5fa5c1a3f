"""Incremental detokenization that never emits half a UTF-8 character; used by the server and the streamers."""
from __future__ import annotations

PREFIX_TOKENS = 5  # tokens decoded before the new ones, so that word-initial spaces come out as they do in full


class Detokenizer:
    """`add(token)` -> the new text that is final, decoding a window of the last tokens as vLLM and TGI do (so a
    word-initial space comes out as in the full decode); a trailing U+FFFD (a character whose bytes are still
    arriving) waits for the next token, its text in `pending` meanwhile."""

    def __init__(self, tokenizer, prompt_ids=(), skip_special_tokens: bool = True, **decode_kwargs):
        self.tokenizer = tokenizer
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens, **decode_kwargs}
        self.ids = list(prompt_ids[-PREFIX_TOKENS:])
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] were emitted, decoded again for context
        self.pending = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """What is left at the end of the sequence, complete or not."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if len(self.ids) == self.read:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.pending = text[len(before):]
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read, self.pending = self.read, len(self.ids), ""
        return text[len(before):]
