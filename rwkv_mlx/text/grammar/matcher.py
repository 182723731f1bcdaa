"""An incremental byte matcher for a :class:`~.bytegrammar.ByteGrammar`, as a lazily built automaton.

A matcher position is a set of stacks (llama.cpp's grammar stacks, an
Earley-like set of parses): each stack is a tuple of grammar positions, its top
a terminal byte class still to be matched, the rest the continuations of the
rules it is inside.  The empty stack means "the text so far is a complete
match".  Reading a byte keeps the stacks whose top class holds the byte,
advances them and expands their new tops until each again shows a terminal.

Such sets repeat all the time (inside a JSON string every ordinary character
leads back to the same set), so each distinct set is interned once as an
integer *state* and the byte transitions between states are cached in a dense
``int32 [states, 256]`` table, filled a whole row at a time: ``-1`` not
computed yet, ``0`` the dead state (no parse survives).  The vocabulary walk in :mod:`.vocab` reads that table
with numpy and only asks Python for the transitions it has not seen before.

Bounds: a state may hold at most :data:`MAX_STACKS` stacks (and reaching it may
take at most :data:`MAX_EXPANSIONS` intermediate ones), a stack at most
:data:`MAX_DEPTH` entries (deeper recursion is cut: those parses are dropped),
and once the table has passed :data:`MAX_STATES` rows it is cleared before the
next mask or feed and rebuilt on demand (matchers keep their stack sets, so
they survive the reset).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .bytegrammar import END, TERM, ByteGrammar
from .gbnf import GrammarError

MAX_STACKS = 4096
MAX_EXPANSIONS = 100_000
MAX_DEPTH = 1024
MAX_STATES = 20_000  # 20 MiB of transition table
DEAD = 0
UNKNOWN = -1

Stacks = frozenset  # of stacks, each a tuple of grammar positions


class Automaton:
    """The interned states and cached byte transitions of one grammar (shared by every matcher of it)."""

    def __init__(self, grammar: ByteGrammar):
        self.grammar = grammar
        self._kind = grammar.kind
        self._arg = grammar.arg
        self._alts = grammar.alts
        self._classes = grammar.classes
        self.generation = 0
        self._clear()
        self.initial_stacks = self._expand_all((), root=True)

    def _clear(self) -> None:
        self.table = np.full((1024, 256), UNKNOWN, dtype=np.int32)
        self.table[DEAD] = DEAD
        self.complete = np.zeros((1024,), dtype=bool)
        self.stacks: list[Stacks] = [frozenset()]
        self.ids: dict[Stacks, int] = {frozenset(): DEAD}
        self.masks: OrderedDict = OrderedDict()  # (trie, state) -> cached vocabulary mask, LRU (vocab.py)
        self.generation += 1

    @property
    def n_states(self) -> int:
        return len(self.stacks)

    # -- stacks ----------------------------------------------------------------

    def _expand_all(self, stacks, root: bool = False) -> Stacks:
        """Every stack reachable from ``stacks`` without reading a byte whose top is a terminal
        (or that is empty: the match may end here).  Iterative, so long chains of rules or of
        optional items cannot exhaust the Python stack; each stack is expanded once."""
        kind, arg, alts = self._kind, self._arg, self._alts
        if root:
            stacks = [() if kind[start] == END else (start,) for start in alts[self.grammar.root]]
        out: set = set()
        todo, seen = list(stacks), set()
        while todo:
            stack = todo.pop()
            if stack in seen:
                continue
            seen.add(stack)
            if not stack or kind[stack[-1]] == TERM:
                out.add(stack)
                if len(out) > MAX_STACKS:
                    raise GrammarError(f"grammar is too ambiguous: more than {MAX_STACKS} parses are open at once")
                continue
            if len(stack) > MAX_DEPTH:
                continue  # recursion deeper than the bound: this parse is dropped
            pos = stack[-1]
            rest = stack[:-1] if kind[pos + 1] == END else stack[:-1] + (pos + 1,)
            todo += [rest if kind[start] == END else rest + (start,) for start in alts[arg[pos]]]
            if len(seen) > MAX_EXPANSIONS:
                raise GrammarError(f"grammar is too ambiguous: more than {MAX_EXPANSIONS} partial parses "
                                   "after one byte")
        return frozenset(out)

    def intern(self, stacks: Stacks) -> int:
        sid = self.ids.get(stacks)
        if sid is not None:
            return sid
        sid = len(self.stacks)
        if sid >= self.table.shape[0]:
            grow = self.table.shape[0]
            self.table = np.concatenate([self.table, np.full((grow, 256), UNKNOWN, dtype=np.int32)])
            self.complete = np.concatenate([self.complete, np.zeros((grow,), dtype=bool)])
        self.stacks.append(stacks)
        self.ids[stacks] = sid
        self.complete[sid] = () in stacks
        return sid

    def _advance(self, stacks, byte: int) -> Stacks:
        nxt = []
        kind = self._kind
        for s in stacks:
            pos = s[-1] + 1
            nxt.append(s[:-1] if kind[pos] == END else s[:-1] + (pos,))
        return self._expand_all(nxt)

    def fill_row(self, sid: int) -> None:
        """Compute all 256 byte transitions of state ``sid`` at once.

        The next state depends only on which stacks accept the byte, so bytes
        are grouped by that signature (inside a JSON string: a handful of groups
        for 256 bytes) and each group is advanced once.
        """
        stacks = [s for s in self.stacks[sid] if s]
        row = np.zeros((256,), dtype=np.int32)  # DEAD unless some stack accepts the byte
        if stacks:
            accept = np.frombuffer(b"".join(self._classes[self._arg[s[-1]]] for s in stacks),
                                   dtype=np.uint8).reshape(len(stacks), 256)
            if len(stacks) <= 63:  # one integer per byte: bit i = stack i accepts it
                signatures = (accept.astype(np.int64) << np.arange(len(stacks))[:, None]).sum(axis=0)
                _, first, group = np.unique(signatures, return_index=True, return_inverse=True)
            else:
                signatures = np.packbits(accept, axis=0).T  # [256, ceil(stacks / 8)]
                _, first, group = np.unique(signatures, axis=0, return_index=True, return_inverse=True)
            targets = []
            for b in first.tolist():
                live = [s for s, ok in zip(stacks, accept[:, b]) if ok]
                targets.append(self.intern(self._advance(live, b)) if live else DEAD)
            row = np.asarray(targets, dtype=np.int32)[group.reshape(-1)]
        self.table[sid] = row

    def fill(self, states) -> None:
        """Compute the transitions of every state in ``states`` (a numpy array, repeats allowed)."""
        for sid in np.unique(states).tolist():
            self.fill_row(sid)

    def step(self, sid: int, byte: int) -> int:
        if self.table[sid, byte] == UNKNOWN:
            self.fill_row(sid)
        return int(self.table[sid, byte])

    def reset_if_full(self) -> None:
        """Clear the table once it has grown past :data:`MAX_STATES` rows (call between walks only:
        it invalidates state ids, which matchers re-intern from their stack sets)."""
        if len(self.stacks) > MAX_STATES:
            self._clear()


class Matcher:
    """Where one output stands in its grammar; fed bytes (or whole tokens) as they are generated."""

    def __init__(self, automaton: Automaton):
        self.automaton = automaton
        self.reset()

    def reset(self) -> None:
        self._stacks = self.automaton.initial_stacks
        self._generation = -1
        self.ended = False  # end-of-text was accepted

    @property
    def state(self) -> int:
        """This matcher's state id in the automaton (re-interned after a table reset)."""
        a = self.automaton
        if self._generation != a.generation:
            self._sid = a.intern(self._stacks)
            self._generation = a.generation
        return self._sid

    @property
    def is_complete(self) -> bool:
        """True when the bytes so far are a whole match (end-of-text is allowed now)."""
        return () in self._stacks

    def accepts(self, data: bytes) -> bool:
        """Would ``data`` keep the output viable (a prefix of some match)?"""
        sid = self.state
        for b in data:
            sid = self.automaton.step(sid, b)
            if sid == DEAD:
                return False
        return True

    def feed(self, data: bytes) -> None:
        """Advance over ``data``; :class:`GrammarError` if it breaks the grammar."""
        a = self.automaton
        a.reset_if_full()
        sid = self.state
        for i, b in enumerate(data):
            sid = a.step(sid, b)
            if sid == DEAD:
                raise GrammarError(f"byte {i} of {data!r} breaks the grammar")
        self._stacks = a.stacks[sid]
        self._sid = sid
        self._generation = a.generation


def matches(automaton: Automaton, data: bytes) -> bool:
    """Is ``data`` a complete match of the grammar (a check for tests and callers)?"""
    m = Matcher(automaton)
    if not m.accepts(data):
        return False
    m.feed(data)
    return m.is_complete
