"""Stop strings held back until they can no longer match."""
from __future__ import annotations


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
