"""A JSON-schema ``pattern`` (a regular expression) -> GBNF for the body of a JSON string.

Python's own regex parser (``re._parser``) reads the pattern, so the syntax is
exactly what ``jsonschema`` (which validates with ``re.search``) understands.
Only the regular part is accepted: literals, ``.``, classes, groups,
alternation, greedy and lazy repetitions, and ``^``/``$`` at the ends.
Backreferences, lookaround, conditionals, atomic groups, possessive
repetitions, word boundaries, inline ``(?i)``/``(?m)`` are refused with a
:class:`GrammarError`.

Soundness before completeness: every string the grammar allows matches the
pattern, though not every match is reachable.  ``\\d``, ``\\w``, ``\\s`` (and
any class that uses them) are restricted to ASCII, where Python's Unicode
classes agree with it; characters JSON must escape (``"``, ``\\``, control
characters) are written as their JSON escapes.  An unanchored pattern is
searched, as JSON Schema says, so it gets any characters before and after.
"""

from __future__ import annotations

import re

from .gbnf import MAX_CODE_POINT, MAX_REPEAT, GrammarError, complement_ranges, merge_ranges

try:  # Python >= 3.11
    import re._constants as _c
    import re._parser as _p
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

_ASCII_SETS = {
    _c.CATEGORY_DIGIT: [(0x30, 0x39)],
    _c.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    _c.CATEGORY_SPACE: [(0x09, 0x0D), (0x20, 0x20)],
}
_NOT = {_c.CATEGORY_NOT_DIGIT: _c.CATEGORY_DIGIT, _c.CATEGORY_NOT_WORD: _c.CATEGORY_WORD,
        _c.CATEGORY_NOT_SPACE: _c.CATEGORY_SPACE}
_JSON_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def _intersect(ranges, lo_hi):
    a, b = lo_hi
    return [(max(lo, a), min(hi, b)) for lo, hi in ranges if hi >= a and lo <= b]


def gbnf_char(cp: int) -> str:
    """A code point written for a GBNF literal or class."""
    c = chr(cp)
    if 0x20 < cp < 0x7F and c not in '\\"[]-^':
        return c
    if c in '\\"[]-^':
        return "\\" + c
    if cp < 0x100:
        return f"\\x{cp:02X}"
    if cp < 0x10000:
        return f"\\u{cp:04X}"
    return f"\\U{cp:08X}"


def gbnf_literal(text: str) -> str:
    return '"' + "".join(gbnf_char(ord(c)) for c in text) + '"'


def json_chars(ranges) -> str:
    """GBNF for one character of a JSON string body drawn from the code-point ``ranges``."""
    ranges = merge_ranges(ranges)
    plain = ranges
    for special in [*range(0x20), 0x22, 0x5C]:
        plain = [r for lo, hi in plain
                 for r in (((lo, special - 1), (special + 1, hi)) if lo <= special <= hi else ((lo, hi),))
                 if r[0] <= r[1]]
    alts = []
    if plain:
        alts.append("[" + "".join(gbnf_char(lo) if lo == hi else f"{gbnf_char(lo)}-{gbnf_char(hi)}"
                                  for lo, hi in plain) + "]")
    for lo, hi in ranges:
        for cp in range(lo, min(hi, 0x5C) + 1):
            if cp < 0x20 or cp in (0x22, 0x5C):
                alts.append(gbnf_literal(_JSON_ESCAPES.get(cp, f"\\u{cp:04x}")))
    if not alts:
        raise GrammarError("pattern has a character class that matches nothing")
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


class _Converter:
    def __init__(self, pattern: str, flags: int):
        self.pattern = pattern
        self.dotall = bool(flags & re.DOTALL)

    def refuse(self, what: str) -> GrammarError:
        return GrammarError(f"pattern {self.pattern!r}: {what} is not supported (only regular patterns can "
                            "constrain generation)")

    def seq(self, items) -> str:
        parts = [self.item(op, av) for op, av in items]
        return " ".join(p for p in parts if p) or '""'

    def item(self, op, av) -> str:
        if op is _c.LITERAL:
            return json_chars([(av, av)])
        if op is _c.NOT_LITERAL:
            return json_chars(complement_ranges([(av, av)]))
        if op is _c.ANY:
            return json_chars([(0, MAX_CODE_POINT)] if self.dotall else complement_ranges([(0x0A, 0x0A)]))
        if op is _c.IN:
            return json_chars(self.char_class(av))
        if op is _c.BRANCH:
            return "(" + " | ".join(self.seq(alt) for alt in av[1]) + ")"
        if op is _c.SUBPATTERN:
            _group, add_flags, _del_flags, sub = av
            if add_flags & (re.IGNORECASE | re.MULTILINE):
                raise self.refuse("an inline (?i) or (?m) flag")
            dotall = self.dotall
            self.dotall = dotall or bool(add_flags & re.DOTALL)
            try:
                return "(" + self.seq(sub) + ")"
            finally:
                self.dotall = dotall
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, sub = av
            if lo > MAX_REPEAT or (hi is not _c.MAXREPEAT and hi > MAX_REPEAT):
                raise self.refuse(f"a repetition count above {MAX_REPEAT}")
            body = "(" + self.seq(sub) + ")"
            if hi is _c.MAXREPEAT:
                return f"{body}{{{lo},}}"
            return f"{body}{{{lo},{hi}}}"
        if op in (_c.GROUPREF, getattr(_c, "GROUPREF_EXISTS", None)):
            raise self.refuse("a backreference (not a regular language)")
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            raise self.refuse("lookahead/lookbehind (not a regular language)")
        if op is getattr(_c, "POSSESSIVE_REPEAT", None) or op is getattr(_c, "ATOMIC_GROUP", None):
            raise self.refuse("a possessive repetition or atomic group")
        if op is _c.AT:
            raise self.refuse("an anchor or word boundary inside the pattern (only a leading ^ and trailing $)")
        raise self.refuse(f"the regex construct {op}")

    def char_class(self, items) -> list[tuple[int, int]]:
        ranges, negate, ascii_only = [], False, False
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                ranges.append((av, av))
            elif op is _c.RANGE:
                ranges.append(av)
            elif op is _c.CATEGORY:
                ascii_only = True  # Python's \d \w \s are Unicode-wide; ASCII is where both agree
                if av in _ASCII_SETS:
                    ranges += _ASCII_SETS[av]
                elif av in _NOT:
                    ranges += complement_ranges(_ASCII_SETS[_NOT[av]], top=0x7F)
                else:
                    raise self.refuse(f"the class {av}")
            else:
                raise self.refuse(f"the class item {op}")
        if negate:
            ranges = complement_ranges(ranges, top=0x7F if ascii_only else MAX_CODE_POINT)
        if ascii_only:
            ranges = _intersect(merge_ranges(ranges), (0, 0x7F))
        return ranges


def pattern_to_gbnf(pattern: str, any_char: str) -> str:
    """GBNF for a JSON string body that ``re.search(pattern, body)`` accepts.

    ``any_char`` is the GBNF of one arbitrary JSON string character, used
    before and after an unanchored pattern.
    """
    if not isinstance(pattern, str):
        raise GrammarError(f"pattern must be a string, got {pattern!r}")
    try:
        tree = _p.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise GrammarError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
    flags = tree.state.flags
    if flags & (re.IGNORECASE | re.MULTILINE):
        raise GrammarError(f"pattern {pattern!r}: the (?i)/(?m) flags are not supported")
    items = list(tree)
    start = end = False
    begin_ops = (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING)
    end_ops = (_c.AT_END, _c.AT_END_STRING)
    if items and items[0][0] is _c.AT and items[0][1] in begin_ops:
        items, start = items[1:], True
    if items and items[-1][0] is _c.AT and items[-1][1] in end_ops:
        items, end = items[:-1], True
    conv = _Converter(pattern, flags)
    try:
        body = conv.seq(items)
    except RecursionError:
        raise GrammarError(f"pattern {pattern!r} is nested too deeply") from None
    return " ".join([*([] if start else [f"{any_char}*"]), body, *([] if end else [f"{any_char}*"])])
