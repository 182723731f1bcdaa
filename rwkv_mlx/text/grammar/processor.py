"""The constrained-decoding logits processor, and the entry points that build one.

:class:`GrammarConstraint` is a :class:`~rwkv_mlx.text.logits.LogitsProcessor` whose
state is the current token mask of every row (``[B, V]`` bool) plus a flag for
rows where only end-of-text remains.  The mask is computed on the host, so the
decode loop tells the processor each sampled token (``advance``) before it
samples the next one; the model's forward pass for that next step is already
queued on the device meanwhile, so mask work overlaps the model step.

Compiled grammars are cached by their text: rows and requests with the same
schema share one automaton (its state table and mask cache keep growing
warm).  The cache is not thread-safe; generate from one thread at a time.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..logits import LogitsProcessor
from .bytegrammar import lower
from .gbnf import GrammarError, parse_gbnf
from .matcher import Automaton, Matcher
from .schema import schema_to_gbnf
from .vocab import vocab_trie

_NEG_INF = float("-inf")


@functools.lru_cache(maxsize=32)
def compile_grammar(gbnf: str) -> Automaton:
    """Parse, lower and check GBNF text once; the same text gives the same (shared) automaton."""
    return Automaton(lower(parse_gbnf(gbnf)))


def grammar_text(*, json_schema: Any = None, grammar: str | None = None) -> str:
    """The GBNF for a JSON schema (dict, bool or JSON text) or the grammar itself."""
    if (json_schema is None) == (grammar is None):
        raise GrammarError("give exactly one of json_schema and grammar")
    return grammar if grammar is not None else schema_to_gbnf(json_schema)


def compile_constraint(*, json_schema: Any = None, grammar: str | None = None) -> Automaton:
    """Compile a schema or grammar, raising :class:`GrammarError` for anything unusable."""
    if json_schema is not None and not isinstance(json_schema, (str, bytes)):
        # key the cache on the JSON text (key order kept: it is the property order) so equal schemas share one automaton
        try:
            json_schema = json.dumps(json_schema, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"JSON schema is not JSON data: {e}") from None
    text = grammar_text(json_schema=json_schema, grammar=grammar)
    try:
        return compile_grammar(text)
    except GrammarError as e:
        if json_schema is None:
            raise
        raise GrammarError(f"JSON schema cannot constrain output: its {e} (rule names follow the schema's "
                           "paths and $refs)") from None


class GrammarConstraint(LogitsProcessor):
    """Masks every token whose bytes cannot continue a valid output, one matcher per row.

    End-of-text is allowed only where the output is complete, and forced
    (whatever bans or penalties say) where nothing else can follow.  Call
    :meth:`advance` with each row's sampled token before the next step.
    """

    needs_tokens = True

    def __init__(self, automaton: Automaton, tokenizer, vocab_size: int, batch_size: int = 1):
        self.automaton = automaton
        self.trie = vocab_trie(tokenizer, int(vocab_size))
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eot = tokenizer.end_of_text_id
        self.matchers = [Matcher(automaton) for _ in range(int(batch_size))]
        self._eot_only = np.zeros((self.vocab_size,), dtype=bool)
        self._eot_only[self.eot] = True
        self._publish()

    def row_mask(self, row: int) -> tuple[np.ndarray, bool]:
        """``(allowed [V] bool, only end-of-text)`` for one row now."""
        m = self.matchers[row]
        if m.ended:
            return self._eot_only, True
        self.automaton.reset_if_full()
        mask, only = self.trie.cached_mask(self.automaton, m.state)
        if not mask.any():
            raise GrammarError("no token of the vocabulary can continue the grammar here "
                               "(a byte sequence it requires is not in any token)")
        return mask, only

    def _publish(self) -> None:
        rows = [self.row_mask(i) for i in range(len(self.matchers))]
        self.state = (mx.array(np.stack([m for m, _ in rows])), mx.array([[o] for _, o in rows]))

    def apply(self, state, logits):
        allowed, only_eot = state
        return mx.where(allowed, mx.where(only_eot, 0.0, logits), _NEG_INF)

    def advance(self, tokens: Sequence[int]) -> None:
        for m, t in zip(self.matchers, tokens):
            t = int(t)
            if m.ended:
                continue
            if t == self.eot:
                if not m.is_complete:
                    raise GrammarError("end-of-text was sampled before the grammar was complete")
                m.ended = True
            else:
                m.feed(self.tokenizer.token_bytes(t) or b"")
        self._publish()

    def reset(self) -> None:
        for m in self.matchers:
            m.reset()
        self._publish()

    @property
    def complete(self) -> list[bool]:
        """Per row: is the output so far a complete match?"""
        return [m.ended or m.is_complete for m in self.matchers]


def constraint_for(params, tokenizer, vocab_size: int, batch_size: int = 1) -> GrammarConstraint:
    """The processor for ``SamplingParams(json_schema=...)`` or ``SamplingParams(grammar=...)``."""
    automaton = compile_constraint(json_schema=params.json_schema, grammar=params.grammar)
    return GrammarConstraint(automaton, tokenizer, vocab_size, batch_size)


def sampling_fields_for_response_format(response_format: dict | None, grammar: str | None = None) -> dict:
    """``SamplingParams`` fields for an OpenAI-style ``response_format`` and/or a GBNF ``grammar``.

    * ``None`` or ``{"type": "text"}``: no constraint (``{}``);
    * ``{"type": "json_object"}``: a JSON object (``{"type": "object"}``; an
      optional ``"schema"`` member, as llama.cpp's server accepts, narrows it);
    * ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``:
      that schema (``"strict"`` is accepted and changes nothing: output always follows the schema);
    * ``grammar`` (the server's extension): GBNF text; not together with a JSON format.

    The constraint is compiled here, so a bad request fails now with a
    :class:`GrammarError` (a ValueError; HTTP 400), not in the middle of generation.
    """
    fields: dict = {}
    if response_format is not None:
        if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
            raise GrammarError("response_format must be an object with a string 'type'")
        kind = response_format["type"]
        if kind == "json_object":
            schema = response_format.get("schema", {"type": "object"})
            fields["json_schema"] = schema
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise GrammarError("response_format of type json_schema needs json_schema.schema")
            fields["json_schema"] = spec["schema"]
        elif kind != "text":
            raise GrammarError(f"response_format type {kind!r} is not supported "
                               "(use text, json_object or json_schema)")
    if grammar is not None:
        if fields:
            raise GrammarError("give either a JSON response_format or a grammar, not both")
        fields["grammar"] = grammar
    if fields:
        compile_constraint(**fields)
    return fields


def processor_for_response_format(response_format: dict | None, tokenizer, *, vocab_size: int | None = None,
                                  grammar: str | None = None, batch_size: int = 1) -> GrammarConstraint | None:
    """A :class:`GrammarConstraint` for an OpenAI-style request (see
    :func:`sampling_fields_for_response_format`), or None when it asks for plain text."""
    fields = sampling_fields_for_response_format(response_format, grammar)
    if not fields:
        return None
    automaton = compile_constraint(**fields)
    return GrammarConstraint(automaton, tokenizer, vocab_size or tokenizer.vocab_size, batch_size)
