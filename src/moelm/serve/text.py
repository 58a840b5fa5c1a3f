"""Streaming text: incremental detokenization that never emits half a UTF-8 character, and stop strings held back
until they can no longer match."""
from __future__ import annotations

PREFIX_TOKENS = 5  # tokens decoded before the new ones, so that word-initial spaces come out as they do in full


class Detokenizer:
    """`add(token)` -> the new text that is final, decoding a window of the last tokens as vLLM and TGI do (so a
    word-initial space comes out as in the full decode); a trailing U+FFFD (a character whose bytes are still
    arriving) waits for the next token."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-PREFIX_TOKENS:])
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] were emitted, decoded again for context

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

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
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class StopStrings:
    """Text passes through `feed`, which returns what may be sent: a tail that could begin a stop string waits; a
    completed stop string ends the text before it (`hit` set)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if self.hit is not None:
            return ""
        if not self.stops:
            return text
        self.pending += text
        found = [(self.pending.find(s), s) for s in self.stops]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, self.hit = min(found)
            out, self.pending = self.pending[:index], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.hit is not None else out
