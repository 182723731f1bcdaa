"""Structured output: decoding constrained by a JSON schema or a GBNF grammar.

Layers (each depends only on the ones above it; nothing here touches the model):

* :mod:`.gbnf` -- GBNF text -> a code-point grammar (llama.cpp's syntax);
* :mod:`.pattern`, :mod:`.schema` -- JSON-schema ``pattern`` and JSON schemas -> GBNF;
* :mod:`.bytegrammar` -- the grammar lowered to UTF-8 bytes, checked (left
  recursion, rules that never finish, size) and flattened;
* :mod:`.matcher` -- the incremental byte matcher (sets of parse stacks,
  interned as states with cached byte transitions);
* :mod:`.vocab` -- the vocabulary's byte trie and the token mask of a state;
* :mod:`.processor` -- the logits processor and the request-level entry points.

Use it through ``SamplingParams(json_schema=...)`` / ``SamplingParams(grammar=...)``.
"""

from .gbnf import GrammarError, parse_gbnf
from .processor import (GrammarConstraint, compile_constraint, processor_for_response_format,
                        sampling_fields_for_response_format)
from .schema import schema_to_gbnf

__all__ = [
    "GrammarError", "GrammarConstraint", "parse_gbnf", "schema_to_gbnf", "compile_constraint",
    "processor_for_response_format", "sampling_fields_for_response_format",
]
