"""Constrained decoding requests (``response_format``, ``grammar``): the one place they plug in.

The structured-output work (a grammar/constraint subpackage on its own branch)
will turn such a request into a logits processor -- ``(logits [1, V]) -> logits``
plus ``accept(tokens)``, the :class:`rwkv_mlx.sample.LogitsProcessor` protocol --
that the engine applies to that request's row before sampling. Until it exists
the server refuses these fields with 400 rather than silently ignoring them:
a client that asked for JSON must not receive free text it believes is JSON.
"""

from __future__ import annotations

from .errors import bad_request

#: Values of ``response_format.type`` that ask for nothing beyond plain text.
_PLAIN = {"text"}


def logits_processor_for(body: dict, vocab_size: int):
    """The logits processor that enforces ``body``'s output constraint, or None when it asks for none.

    Raises a 400 :class:`~.errors.APIError` for a constraint this build cannot enforce yet.
    """
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if not isinstance(fmt, dict) or not isinstance(kind, str):
            raise bad_request("response_format must be an object with a string 'type'", "response_format")
        if kind not in _PLAIN:
            raise bad_request(f"response_format type {kind!r} is not supported yet by rwkv-mlx serve "
                              f"(constrained decoding is not built in); omit it or use 'text'",
                              "response_format", "unsupported_response_format")
    if body.get("grammar") is not None:
        raise bad_request("grammar is not supported yet by rwkv-mlx serve (constrained decoding is not built in)",
                          "grammar", "unsupported_grammar")
    return None
