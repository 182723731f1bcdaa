"""A code-point :class:`~.gbnf.Grammar` lowered to bytes, checked, and flattened for the matcher.

Tokens do not align with characters, so the matcher works on UTF-8 bytes:

* a literal becomes its UTF-8 bytes, one single-byte class each;
* a character class becomes one byte class when it is ASCII only, otherwise a
  rule whose alternatives are the UTF-8 byte-range sequences of its code points
  (the classic split of a code-point range into byte ranges; surrogates are
  excluded because they are not valid UTF-8);
* groups and repetitions become rules the way llama.cpp rewrites them
  (``x*`` -> ``R ::= x R |``, ``x{m,n}`` -> m copies then nested optionals),
  right-recursive so that a matcher stack does not grow with the count.

Checks that bound the matcher's work: the number of symbols, left recursion
(direct, indirect or through rules that can match nothing: the stack-based
matcher would expand it forever) and rules that can never finish.

The flat form (:class:`ByteGrammar`): ``kind[pos]`` is ``END``, ``TERM``
(``arg`` = byte-class index into ``classes``, each a 256-byte 0/1 table) or
``RULE`` (``arg`` = rule index); every alternative is a run of positions
closed by an ``END``; ``alts[rule]`` lists the alternatives' first positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .gbnf import MAX_CODE_POINT, MAX_REPEAT, Grammar, GrammarError, complement_ranges, merge_ranges

END, TERM, RULE = 0, 1, 2
#: Upper bound on grammar symbols after lowering (bounds memory and compile time).
MAX_SYMBOLS = 500_000


@dataclass
class ByteGrammar:
    kind: list[int]
    arg: list[int]
    alts: list[list[int]]
    classes: list[bytes]
    rule_names: list[str]
    root: int = 0
    nullable: list[bool] = field(default_factory=list)


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The UTF-8 encodings of code points ``lo..hi`` as sequences of byte ranges
    (each sequence matches exactly the encodings of one sub-range)."""
    out = []
    todo = [(lo, hi)]
    while todo:
        lo, hi = todo.pop()
        if lo > hi:
            continue
        if lo <= 0xDFFF and hi >= 0xD800:  # surrogates have no UTF-8 encoding
            todo += [(0xE000, hi), (lo, 0xD7FF)]
            continue
        split = next((b for b in (0x7F, 0x7FF, 0xFFFF) if lo <= b < hi), None)
        if split is not None:
            todo += [(split + 1, hi), (lo, split)]
            continue
        if hi <= 0x7F:
            out.append([(lo, hi)])
            continue
        n = len(chr(lo).encode("utf-8"))
        for i in range(1, n):
            m = (1 << (6 * i)) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    todo += [((lo | m) + 1, hi), (lo, lo | m)]
                    break
                if hi & m != m:
                    todo += [(hi & ~m, hi), (lo, (hi & ~m) - 1)]
                    break
        else:
            a, b = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
            out.append(list(zip(a, b)))
    return out


class _Lowering:
    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.rule_ids: dict[str, int] = {}
        self.rules: list[list[list[tuple[int, int]]]] = []  # alternatives of (TERM|RULE, arg)
        self.names: list[str] = []
        self.classes: list[bytes] = []
        self.class_ids: dict[bytes, int] = {}
        self.cp_class_rules: dict[tuple, int] = {}
        self.symbols = 0

    def count(self, n: int) -> None:
        self.symbols += n
        if self.symbols > MAX_SYMBOLS:
            raise GrammarError(f"grammar is too large: more than {MAX_SYMBOLS} symbols once repetitions and "
                               "character classes are expanded")

    def new_rule(self, name: str) -> int:
        self.rules.append([])
        self.names.append(name)
        return len(self.rules) - 1

    def byte_class(self, lo: int, hi: int) -> tuple[int, int]:
        table = bytes(1 if lo <= b <= hi else 0 for b in range(256))
        cid = self.class_ids.get(table)
        if cid is None:
            cid = self.class_ids[table] = len(self.classes)
            self.classes.append(table)
        return (TERM, cid)

    def byte_set(self, values) -> tuple[int, int]:
        table = bytearray(256)
        for b in values:
            table[b] = 1
        table = bytes(table)
        cid = self.class_ids.get(table)
        if cid is None:
            cid = self.class_ids[table] = len(self.classes)
            self.classes.append(table)
        return (TERM, cid)

    def lower(self) -> ByteGrammar:
        for name in self.grammar.rules:
            self.rule_ids[name] = self.new_rule(name)
        for name, alts in self.grammar.rules.items():
            rid = self.rule_ids[name]
            self.rules[rid] = [self.sequence(seq, name) for seq in alts]
        return self.flatten()

    def sequence(self, seq: list[tuple], owner: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for item in seq:
            out += self.item(item, owner)
        self.count(len(out) + 1)
        return out

    def item(self, item: tuple, owner: str) -> list[tuple[int, int]]:
        kind = item[0]
        if kind == "lit":
            return [self.byte_class(b, b) for b in item[1].encode("utf-8", "surrogatepass")]
        if kind == "ref":
            return [(RULE, self.rule_ids[item[1]])]
        if kind == "cls":
            return [self.char_class(item[1], item[2], owner)]
        if kind == "group":
            rid = self.new_rule(owner)
            self.rules[rid] = [self.sequence(seq, owner) for seq in item[1]]
            return [(RULE, rid)]
        if kind == "rep":
            return self.repetition(item[1], item[2], item[3], owner)
        raise AssertionError(kind)

    def char_class(self, ranges, negated: bool, owner: str) -> tuple[int, int]:
        ranges = [(lo, min(hi, MAX_CODE_POINT)) for lo, hi in ranges if lo <= MAX_CODE_POINT]
        ranges = complement_ranges(ranges) if negated else merge_ranges(ranges)
        key = tuple(ranges)
        if not ranges:
            raise GrammarError(f"grammar rule {owner!r}: a character class matches no character")
        if ranges[-1][1] <= 0x7F:
            return self.byte_set(b for lo, hi in ranges for b in range(lo, hi + 1))
        rid = self.cp_class_rules.get(key)
        if rid is None:
            rid = self.cp_class_rules[key] = self.new_rule(owner)
            seqs = [s for lo, hi in ranges for s in utf8_sequences(lo, hi)]
            self.rules[rid] = [[self.byte_class(a, b) for a, b in seq] for seq in seqs]
            self.count(sum(len(s) + 1 for s in seqs))
        return (RULE, rid)

    def as_one_symbol(self, item: tuple, owner: str) -> tuple[int, int]:
        syms = self.item(item, owner)
        if len(syms) == 1:
            return syms[0]
        rid = self.new_rule(owner)
        self.rules[rid] = [syms]
        self.count(len(syms) + 1)
        return (RULE, rid)

    def repetition(self, item: tuple, m: int, n: int | None, owner: str) -> list[tuple[int, int]]:
        if m > MAX_REPEAT or (n is not None and n > MAX_REPEAT):
            raise GrammarError(f"grammar rule {owner!r}: repetition count above {MAX_REPEAT}")
        x = self.as_one_symbol(item, owner)
        self.count(m + 2)
        out = [x] * m
        if n is None:  # R ::= x R | (empty)
            rid = self.new_rule(owner)
            self.rules[rid] = [[x, (RULE, rid)], []]
            return out + [(RULE, rid)]
        tail = None  # nested optionals: (x (x (x)?)?)?
        for _ in range(n - m):
            rid = self.new_rule(owner)
            self.rules[rid] = [[x] + ([(RULE, tail)] if tail is not None else []), []]
            self.count(3)
            tail = rid
        return out + ([(RULE, tail)] if tail is not None else [])

    def flatten(self) -> ByteGrammar:
        kind, arg, alts = [], [], []
        for rule in self.rules:
            starts = []
            for seq in rule:
                starts.append(len(kind))
                for k, a in seq:
                    kind.append(k)
                    arg.append(a)
                kind.append(END)
                arg.append(0)
            alts.append(starts)
        g = ByteGrammar(kind, arg, alts, self.classes, self.names, root=self.rule_ids[self.grammar.root])
        _check(g, self.rules)
        return g


def _rules_where(rules, terminal_ok: bool) -> list[bool]:
    """The least fixpoint "some alternative has only good symbols": with ``terminal_ok`` False the
    rules that can match nothing (nullable), with True the rules that can finish (productive)."""
    good = [False] * len(rules)
    changed = True
    while changed:
        changed = False
        for r, alts in enumerate(rules):
            if not good[r] and any(all(terminal_ok if k == TERM else good[a] for k, a in seq) for seq in alts):
                good[r] = changed = True
    return good


def _check(g: ByteGrammar, rules: list[list[list[tuple[int, int]]]]) -> None:
    n = len(rules)
    nullable = g.nullable = _rules_where(rules, terminal_ok=False)
    productive = _rules_where(rules, terminal_ok=True)

    reachable, todo = {g.root}, [g.root]
    while todo:
        for seq in rules[todo.pop()]:
            for k, a in seq:
                if k == RULE and a not in reachable:
                    reachable.add(a)
                    todo.append(a)
    stuck = list(dict.fromkeys(g.rule_names[r] for r in sorted(reachable) if not productive[r]))
    if stuck:
        names = ", ".join(repr(n) for n in stuck[:4]) + (", ..." if len(stuck) > 4 else "")
        raise GrammarError(f"grammar rule{'s' if len(stuck) > 1 else ''} {names} can never finish: every "
                           "alternative recurses without end")

    # Left corners: the rules a rule can start with without consuming a byte.
    corners: list[set[int]] = [set() for _ in range(n)]
    for r, alts in enumerate(rules):
        for seq in alts:
            for k, a in seq:
                if k == TERM:
                    break
                corners[r].add(a)
                if not nullable[a]:
                    break
    color = [0] * n  # 0 new, 1 on the DFS stack, 2 done
    for start in sorted(reachable):
        if color[start]:
            continue
        stack = [(start, iter(corners[start]))]
        color[start] = 1
        while stack:
            r, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[r] = 2
                stack.pop()
            elif color[nxt] == 1:
                raise GrammarError(f"grammar rule {g.rule_names[nxt]!r} is left-recursive (it can reach itself "
                                   "without matching a character); rewrite it with repetition, e.g. "
                                   "'expr ::= term (\"+\" term)*'")
            elif color[nxt] == 0:
                color[nxt] = 1
                stack.append((nxt, iter(corners[nxt])))


def lower(grammar: Grammar) -> ByteGrammar:
    """Lower and check ``grammar``; :class:`GrammarError` if it cannot be matched safely."""
    try:
        return _Lowering(grammar).lower()
    except RecursionError:
        raise GrammarError("grammar nests groups too deeply") from None
