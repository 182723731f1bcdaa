"""Constrained decoding requests (``response_format``, ``grammar``): the one place they plug in.

A request's output constraint becomes ``SamplingParams`` fields (``json_schema``
or ``grammar``, text/grammar): the row's sampler then masks every token whose
bytes cannot continue a valid output, and the engine tells it each sampled
token before the row's next step. The schema or grammar is compiled here, so a
bad one is a 400 before the request queues. A grammar can still give up while
generating (more parses open at once than its limit): that request alone ends
with a 422 ``constraint_failed`` error; the others go on.
"""

from __future__ import annotations

from ..text.grammar import GrammarError, sampling_fields_for_response_format
from .errors import bad_request


def constraint_fields(body: dict) -> dict:
    """``SamplingParams`` fields enforcing ``body``'s ``response_format`` / ``grammar`` (``{}``: none).

    Raises a 400 :class:`~.errors.APIError` naming the field for a constraint that cannot be built.
    """
    fmt, grammar = body.get("response_format"), body.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise bad_request("grammar must be a string of GBNF rules", "grammar")
    try:
        return sampling_fields_for_response_format(fmt, grammar)
    except GrammarError as e:
        raise bad_request(f"{e}", "grammar" if grammar is not None else "response_format",
                          "invalid_grammar" if grammar is not None else "invalid_response_format") from None
