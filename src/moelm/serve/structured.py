"""Structured output through llguidance: a request's constraint (a JSON schema, any JSON object, a regex, a choice of
strings, a Lark or GBNF grammar) becomes a grammar checked when the request arrives; each sequence that has one gets a
matcher, whose token mask the engine applies to the logits before sampling and which consumes every token emitted.
When the grammar is complete the mask keeps EOS (and only EOS once nothing else may follow)."""
from __future__ import annotations

import json
from copy import copy

import numpy as np
import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar")


class GrammarError(ValueError):
    """A constraint llguidance cannot compile (the server answers 400)."""


class Grammars:
    """llguidance's tokenizer over the model's vocabulary (made at the first constraint) and the compiler."""

    def __init__(self, tokenizer, vocab_size: int, eos: list[int]):
        self.tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, eos
        self._lltok = None

    def lltokenizer(self):
        if self._lltok is None:
            try:
                import llguidance
            except ImportError:
                raise GrammarError("structured output needs llguidance: pip install 'moelm[serve]'") from None
            backend = copy(self.tokenizer.backend_tokenizer)
            backend.no_padding()
            backend.no_truncation()
            try:
                self._lltok = llguidance.LLTokenizer(backend.to_str(), eos_token=self.eos or None,
                                                     n_vocab=max(self.vocab_size, len(self.tokenizer)))
            except ValueError as e:
                raise GrammarError(f"structured output cannot use this model's tokenizer: {e}") from None
        return self._lltok

    def compile(self, kind: str, spec) -> str:
        """The llguidance grammar of a constraint: kind json (a schema, as a dict or JSON text; its "x-guidance" holds
        llguidance's JSON options), json_object, regex, choice (a list of strings) or grammar (Lark, or GBNF when
        it has '::='); GrammarError for a bad one."""
        import llguidance

        tokenizer = self.lltokenizer()
        if kind == "json" or kind == "json_object":  # json_object: spec None, or {"x-guidance": options}
            schema = {"type": "object", **(spec or {})} if kind == "json_object" else spec
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise GrammarError(f"the JSON schema is not JSON: {e}") from None
            if not isinstance(schema, dict):
                raise GrammarError("the JSON schema must be an object")
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema: {e}") from None
        elif kind == "regex":
            if not isinstance(spec, str):
                raise GrammarError("the regex must be a string")
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
                raise GrammarError("the choice must be a list of non-empty strings")
            grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        elif kind == "grammar":
            if not isinstance(spec, str) or not spec.strip():
                raise GrammarError("the grammar must be a non-empty string")
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                grammar = llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec))
            except Exception as e:  # GbnfToLarkError, or a bare Exception ("No 'root' rule found")
                raise GrammarError(f"the GBNF grammar: {e}") from None
        else:
            raise GrammarError(f"unknown constraint {kind!r}")
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if error:
            raise GrammarError(f"the {kind} constraint does not compile: {messages[0].strip()}")
        return grammar

    def matcher(self, grammar: str):
        import llguidance

        return llguidance.LLMatcher(self.lltokenizer(), grammar, log_level=0)


def allowed(matcher, vocab_size: int) -> torch.Tensor:
    """The tokens the matcher accepts next: bool [vocab_size] (unpacked by numpy: one pass, no threads)."""
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), count=vocab_size,
                         bitorder="little")  # token 8 i + b is bit b of byte i
    return torch.from_numpy(bits.view(np.bool_))
