"""Constrained decoding: a reply held to a JSON schema, to any JSON object, to a grammar
(GBNF or Lark) or to a regular expression, token by token.

The grammar work is llguidance's (a Rust library made for this, with no Python
dependencies; xgrammar, the other candidate, needs transformers and Triton at run time).
hexin gives it the model's own tokenizer (its tokenizer.json), keeps one compiled matcher
per grammar (``Grammars``), and copies it for each request (``Constraint``): before each
pick the tokens the grammar forbids get -inf, after it the token is consumed. A finished
grammar allows only the end-of-sequence token, so the reply ends there.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from hexin.errors import HexinError

if TYPE_CHECKING:
    from hexin.tokenizer import Tokenizer

#: compiled grammars kept per engine
CACHE_SIZE = 64


class InvalidGrammar(HexinError):
    """A schema, grammar or regex that cannot constrain a reply; ``param`` names the
    OpenAI API's parameter that gave it."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.param = "response_format" if kind.startswith("json") else kind


def _source(kind: str, text: str) -> str:
    """llguidance's grammar for (kind, text)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"})
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise InvalidGrammar(f"json_schema: not JSON ({e})", kind) from None
        if not isinstance(schema, dict):
            raise InvalidGrammar("json_schema: a schema is a JSON object", kind)
        return LLMatcher.grammar_from_json_schema(schema)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(text)
    try:
        return LLMatcher.grammar_from_lark(any_to_lark(text))  # GBNF or Lark
    except Exception as e:
        raise InvalidGrammar(f"grammar: {e}", kind) from None


#: a JSON reply this close to its token budget closes what it has open (``Constraint``)
CLOSING_TOKENS = 32


class Constraint:
    """One request's grammar state: masks its logits and consumes its tokens.

    A small model can loop inside a JSON string until its token budget cuts the reply,
    which then no longer parses. So in its last ``CLOSING_TOKENS`` tokens a JSON reply
    picks among the allowed tokens that only close (a quote, ``]`` or ``}``) whenever there
    is one: open strings, arrays and objects end, and the reply still follows the schema.
    """

    def __init__(self, matcher, vocab_size: int, closers: np.ndarray | None) -> None:
        """``closers``: which tokens only close JSON (None: not a JSON grammar)."""
        self.matcher, self.vocab_size, self.closers = matcher, vocab_size, closers

    def mask(self, logits: Tensor, *, tokens_left: int | None = None) -> Tensor:
        """``logits`` (V,) with every token the grammar forbids next at -inf (a copy);
        with ``tokens_left`` under ``CLOSING_TOKENS``, every token but the closing ones
        too where one is allowed."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].view(bool)
        if self.closers is not None and tokens_left is not None and tokens_left <= CLOSING_TOKENS:
            closing = allowed & self.closers
            if closing.any():
                allowed = closing
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)  # ids past the tokenizer's: no
        n = min(len(allowed), logits.shape[-1])
        keep[:n] = torch.from_numpy(allowed[:n])
        return torch.where(keep, logits.float(), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            error = self.matcher.get_error()
            raise InvalidGrammar(f"token {token} broke the grammar: {error}", "grammar")


class Grammars:
    """The compiled grammars of one tokenizer, built at first use and kept (LRU)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._llt = None
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._closers: np.ndarray | None = None

    def closers(self) -> np.ndarray:
        """Which tokens' text is only closing JSON punctuation (quotes, ] and }) and
        whitespace, found once per tokenizer."""
        if self._closers is None:
            tok = self.tokenizer
            texts = (tok.decode([i], skip_special=False) for i in range(tok.vocab_size))
            self._closers = np.array(
                [bool(t.strip()) and set(t.strip()) <= set('"]}') for t in texts]
            )
        return self._closers

    def _ll_tokenizer(self):
        if self._llt is None:
            from llguidance import LLTokenizer

            tok = self.tokenizer
            self._llt = LLTokenizer(
                tok.inner.to_str(), n_vocab=tok.vocab_size, eos_token=list(tok.eos_token_ids)
            )
        return self._llt

    def constraint(self, kind: str, text: str) -> Constraint:
        """A fresh state for (kind, text); compiles it the first time it is seen."""
        key = (kind, text)
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is None:
                from llguidance import LLMatcher

                matcher = LLMatcher(self._ll_tokenizer(), _source(kind, text), log_level=0)
                if matcher.is_error():
                    raise InvalidGrammar(f"{kind}: {matcher.get_error()}", kind)
                self._compiled[key] = matcher
                if len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
            closers = self.closers() if kind.startswith("json") else None
            return Constraint(matcher.deep_copy(), self.tokenizer.vocab_size, closers)
