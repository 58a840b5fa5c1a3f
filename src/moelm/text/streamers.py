"""Streamers for `generate`: print (or queue) text as it becomes final, like transformers' TextStreamer."""
from __future__ import annotations

from queue import Queue

from .detokenize import Detokenizer


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


class TextStreamer:
    """`put(ids)` / `end()` from `generate`; the first `put` is the prompt. Text goes to `on_finalized_text` as
    transformers' TextStreamer sends it: up to the last space, whole lines, CJK characters at once. The text is the
    `Detokenizer`'s, started afresh after each line as transformers' token cache is."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.next_tokens_are_prompt = True
        self._reset()

    def _reset(self):
        self._detok = Detokenizer(self.tokenizer, **{"skip_special_tokens": False, **self.decode_kwargs})
        self._text, self.print_len = "", 0

    def put(self, value):
        ids = value.tolist() if hasattr(value, "tolist") else value
        ids = [ids] if isinstance(ids, int) else list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            if len(ids) > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            ids = list(ids[0])
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        for i in ids:
            self._text += self._detok.add(int(i))
        text = self._text + self._detok.pending  # what decoding every token since the last line gives
        if text.endswith("\n"):
            printable = text[self.print_len:]
            self._reset()
        elif text and _is_cjk(text[-1]):
            printable = text[self.print_len:]
            self.print_len += len(printable)
        else:  # up to the last space; so a trailing "\ufffd" (an incomplete character) waits
            printable = text[self.print_len:text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self):
        """Flush what is left and signal the end of the stream."""
        printable = (self._text + self._detok.flush())[self.print_len:]
        self._reset()
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        print(text, flush=True, end=None if stream_end else "")


class TextIteratorStreamer(TextStreamer):
    """Iterate over text pieces (from another thread) until `end()`; `timeout` bounds each wait on the queue."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value == self.stop_signal:
            raise StopIteration()
        return value
