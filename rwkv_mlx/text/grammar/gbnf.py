"""GBNF text -> a code-point grammar (rules of alternatives of items).

The syntax is llama.cpp's (``grammars/README.md``): ``name ::= body`` rules, a
``root`` rule, ``"literals"``, ``[character classes]`` with ranges and ``^``
negation, ``.`` (any character), ``( groups )``, ``|`` alternation, the
repetitions ``* + ? {m} {m,} {m,n}``, ``# comments`` and the escapes
``\\x.. \\u.... \\U........ \\t \\n \\r \\" \\\\ \\[ \\] \\-``.  One liberty: a rule
may continue over any number of lines (a new rule starts where ``name ::=``
does), which accepts every grammar llama.cpp accepts.

The result is a :class:`Grammar`: ``rules[name]`` is a list of alternatives, an
alternative a list of items, an item one of

* ``("lit", text)``: a literal string;
* ``("cls", ((lo, hi), ...), negated)``: one code point in (or not in) the ranges;
* ``("ref", name)``: another rule;
* ``("group", [alternatives])``: a parenthesised sub-expression;
* ``("rep", item, m, n)``: ``item`` between ``m`` and ``n`` times (``n`` None: no bound).

Everything about bytes, UTF-8, recursion and size is checked later, when the
grammar is lowered for the matcher (:mod:`.bytegrammar`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidArgumentError

#: Largest ``m`` or ``n`` in ``{m,n}``: each unit becomes grammar symbols.
MAX_REPEAT = 10_000
#: Longest grammar text accepted (bytes of GBNF), a bound on parse time and memory.
MAX_GRAMMAR_CHARS = 2_000_000

_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", '"': '"', "\\": "\\", "[": "[", "]": "]", "-": "-",
            "/": "/", "'": "'", "0": "\0", "f": "\f", "v": "\v", "b": "\b", "a": "\a", "e": "\x1b",
            "^": "^", ".": ".", "(": "(", ")": ")", "|": "|", "*": "*", "+": "+", "?": "?",
            "{": "{", "}": "}", " ": " "}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


MAX_CODE_POINT = 0x10FFFF


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent ``(lo, hi)`` code-point ranges covering the same set."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def complement_ranges(ranges, top: int = MAX_CODE_POINT) -> list[tuple[int, int]]:
    """The code points ``0..top`` not in ``ranges``."""
    out, nxt = [], 0
    for lo, hi in merge_ranges(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= top:
        out.append((nxt, top))
    return out


class GrammarError(InvalidArgumentError):
    """A grammar or JSON schema that cannot be used: a syntax error, an unsupported
    feature, left recursion, a rule that never finishes, or a size past the limits."""


@dataclass
class Grammar:
    """A parsed GBNF grammar at the level of Unicode code points."""

    rules: dict[str, list[list[tuple]]]
    root: str = "root"


def _is_name_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-_")


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, msg: str) -> GrammarError:
        line = self.s.count("\n", 0, self.i) + 1
        col = self.i - (self.s.rfind("\n", 0, self.i) + 1) + 1
        return GrammarError(f"grammar line {line} column {col}: {msg}")

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip_space(self) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                while self.i < len(s) and s[self.i] != "\n":
                    self.i += 1
            else:
                return

    def name(self) -> str:
        start = self.i
        while self.i < len(self.s) and _is_name_char(self.s[self.i]):
            self.i += 1
        if self.i == start:
            raise self.error(f"expected a rule name, found {self.peek()!r}" if self.peek() else
                             "expected a rule name, found the end of the grammar")
        return self.s[start:self.i]

    def at_rule_start(self) -> bool:
        """Is the text at the cursor ``name ::=``?"""
        j = self.i
        while j < len(self.s) and _is_name_char(self.s[j]):
            j += 1
        if j == self.i:
            return False
        while j < len(self.s) and self.s[j] in " \t":
            j += 1
        return self.s.startswith("::=", j)

    def grammar(self) -> Grammar:
        rules: dict[str, list[list[tuple]]] = {}
        self.skip_space()
        while self.i < len(self.s):
            name = self.name()
            self.skip_space()
            if not self.s.startswith("::=", self.i):
                raise self.error(f"expected '::=' after rule name {name!r}")
            self.i += 3
            if name in rules:
                raise self.error(f"rule {name!r} is defined twice")
            rules[name] = self.alternatives(nested=False)
            self.skip_space()
        if not rules:
            raise GrammarError("grammar is empty: it needs at least a 'root ::= ...' rule")
        if "root" not in rules:
            raise GrammarError("grammar has no 'root' rule")
        for name, alts in rules.items():
            for ref in _refs(alts):
                if ref not in rules:
                    raise GrammarError(f"grammar rule {name!r} refers to undefined rule {ref!r}")
        return Grammar(rules)

    def alternatives(self, nested: bool) -> list[list[tuple]]:
        alts = [self.sequence(nested)]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.sequence(nested))
        return alts

    def sequence(self, nested: bool) -> list[tuple]:
        items: list[tuple] = []
        while True:
            self.skip_space()
            c = self.peek()
            if c == "" or c == "|" or (c == ")" and nested):
                return items
            if c == ")":
                raise self.error("unmatched ')'")
            if not nested and self.at_rule_start():
                return items
            if c == '"':
                item = ("lit", self.literal())
            elif c == "[":
                item = self.char_class()
            elif c == ".":
                self.i += 1
                item = ("cls", (), True)
            elif c == "(":
                self.i += 1
                alts = self.alternatives(nested=True)
                if self.peek() != ")":
                    raise self.error("expected ')' to close the group")
                self.i += 1
                item = ("group", alts)
            elif _is_name_char(c):
                item = ("ref", self.name())
            elif c in "*+?{":
                raise self.error(f"repetition {c!r} has nothing to repeat")
            else:
                raise self.error(f"unexpected character {c!r}")
            items.append(self.repetitions(item))

    def repetitions(self, item: tuple) -> tuple:
        while True:
            c = self.peek()
            if c == "*":
                item = ("rep", item, 0, None)
            elif c == "+":
                item = ("rep", item, 1, None)
            elif c == "?":
                item = ("rep", item, 0, 1)
            elif c == "{":
                self.i += 1
                m, n = self.bounds()
                item = ("rep", item, m, n)
                continue
            else:
                return item
            self.i += 1

    def number(self) -> int:
        start = self.i
        while self.peek().isdigit() and self.peek().isascii():
            self.i += 1
        if start == self.i:
            raise self.error("expected a number in '{m,n}'")
        if self.i - start > 6 or int(self.s[start:self.i]) > MAX_REPEAT:
            raise self.error(f"repetition count {self.s[start:self.i]} is larger than {MAX_REPEAT}")
        return int(self.s[start:self.i])

    def bounds(self) -> tuple[int, int | None]:
        self.skip_space()
        m = self.number()
        self.skip_space()
        n: int | None = m
        if self.peek() == ",":
            self.i += 1
            self.skip_space()
            n = None if self.peek() == "}" else self.number()
            self.skip_space()
        if self.peek() != "}":
            raise self.error("expected '}' to close '{m,n}'")
        self.i += 1
        if n is not None and n < m:
            raise self.error(f"repetition {{{m},{n}}} has its maximum below its minimum")
        return m, n

    def char(self, where: str) -> str:
        """One possibly escaped character inside a literal or class."""
        c = self.peek()
        if c == "":
            raise self.error(f"unterminated {where}")
        self.i += 1
        if c != "\\":
            return c
        e = self.peek()
        self.i += 1
        if e in _HEX_ESCAPES:
            n = _HEX_ESCAPES[e]
            digits = self.s[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"escape \\{e} needs {n} hex digits")
            self.i += n
            cp = int(digits, 16)
            if cp > 0x10FFFF:
                raise self.error(f"escape \\{e}{digits} is past the last Unicode code point")
            return chr(cp)
        if e in _ESCAPES:
            return _ESCAPES[e]
        raise self.error(f"unknown escape '\\{e}'" if e else f"unterminated {where}")

    def literal(self) -> str:
        self.i += 1  # opening quote
        out = []
        while self.peek() != '"':
            if self.peek() == "":
                raise self.error("unterminated string literal")
            out.append(self.char("string literal"))
        self.i += 1
        return "".join(out)

    def char_class(self) -> tuple:
        self.i += 1  # [
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges = []
        while self.peek() != "]":
            if self.peek() == "":
                raise self.error("unterminated character class")
            lo = self.char("character class")
            hi = lo
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.char("character class")
                if ord(hi) < ord(lo):
                    raise self.error(f"character range {lo!r}-{hi!r} is reversed")
            ranges.append((ord(lo), ord(hi)))
        self.i += 1
        if not ranges and not negated:
            raise self.error("empty character class [] matches nothing")
        return ("cls", tuple(ranges), negated)


def _refs(alts: list[list[tuple]]):
    for seq in alts:
        for item in seq:
            yield from _item_refs(item)


def _item_refs(item: tuple):
    kind = item[0]
    if kind == "ref":
        yield item[1]
    elif kind == "group":
        yield from _refs(item[1])
    elif kind == "rep":
        yield from _item_refs(item[1])


def parse_gbnf(text: str) -> Grammar:
    """Parse GBNF ``text``; :class:`GrammarError` names the line and column of a mistake."""
    if not isinstance(text, str):
        raise GrammarError(f"a grammar must be GBNF text (str), got {type(text).__name__}")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"grammar is {len(text)} characters long; the limit is {MAX_GRAMMAR_CHARS}")
    try:
        return _Parser(text).grammar()
    except RecursionError:
        raise GrammarError("grammar nests groups too deeply") from None
