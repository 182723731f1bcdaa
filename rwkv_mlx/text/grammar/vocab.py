"""The vocabulary as a byte trie, and the token mask of a matcher state computed by walking it.

Token ``t`` may follow state ``s`` when every prefix of ``bytes(t)`` keeps some
parse alive, so the mask is a walk of the vocabulary's byte trie from ``s``
that stops at dead branches.  The walk goes one trie depth at a time, as numpy
gathers from the automaton's transition table (``table[parent_state, byte]``):
over the children of the live nodes when they are few, over the whole depth
when they are many.  Only states never seen before go back to Python
(:meth:`Automaton.fill`), and after a few steps in the same kind of context
there are none.  Nodes are numbered breadth-first with each node's children
contiguous, so the children of the live nodes of one depth are a few
``repeat``/``arange`` operations away.

Masks are cached per state (JSON string bodies, numbers and whitespace return
to the same states over and over).  The end-of-text token (no bytes) is allowed
exactly when the state is complete.
"""

from __future__ import annotations

import functools

import numpy as np

from .matcher import DEAD, UNKNOWN, Automaton

#: Masks kept per automaton (bit-packed: 8 KiB each for the world vocabulary, 8 MiB in all).
MASK_CACHE_SIZE = 1024


class VocabTrie:
    """Byte trie of a vocabulary: ``token_bytes[i]`` for ``i < vocab_size`` (empty = never generated as text)."""

    def __init__(self, token_bytes: list[bytes], eot_id: int | None):
        self.vocab_size = len(token_bytes)
        self.eot_id = eot_id
        prefixes = set()
        for tok in token_bytes:
            for i in range(1, len(tok) + 1):
                prefixes.add(tok[:i])
        nodes = sorted(prefixes, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(nodes)}
        n = len(nodes)
        self.n_nodes = n
        self.byte = np.fromiter((p[-1] for p in nodes), dtype=np.int32, count=n)
        parent = np.fromiter((index[p[:-1]] if len(p) > 1 else -1 for p in nodes), dtype=np.int64, count=n)
        # BFS order with lexicographic order inside a depth => parent ids never decrease.
        self.n_child = np.bincount(parent[parent >= 0], minlength=n).astype(np.int64)
        self.first_child = np.searchsorted(parent, np.arange(n), side="left").astype(np.int64)
        self.parent = parent
        depth = np.fromiter((len(p) for p in nodes), dtype=np.int64, count=n)
        cuts = np.searchsorted(depth, np.arange(1, (int(depth[-1]) if n else 0) + 2))
        self.levels = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))  # [start, end) of each depth
        # the node that spells each token (n = a sentinel node that is always dead)
        self.token_node = np.full((self.vocab_size,), n, dtype=np.int64)
        for t, tok in enumerate(token_bytes):
            if tok:
                self.token_node[t] = index[tok]

    def mask(self, automaton: Automaton, sid: int) -> np.ndarray:
        """Bool ``[vocab_size]``: the tokens whose bytes keep state ``sid`` alive.

        Depth by depth, each node's state is ``table[parent's state, byte]``.  A
        depth is computed only for the children of live nodes when they are few
        (structure: after ``{`` almost everything is dead) and densely, as one
        gather over the whole depth, when they are many (inside a string almost
        everything lives); a depth with no live node ends the walk.
        """
        state = np.zeros((self.n_nodes + 1,), dtype=np.int32)  # DEAD everywhere not reached
        live = None  # live nodes of the previous depth (None: the root)
        for lo, hi in self.levels:
            if live is None:
                nodes = np.arange(lo, hi)
                parents = np.full((hi - lo,), sid, dtype=np.int32)
            else:
                counts = self.n_child[live]
                total = int(counts.sum())
                if not total:
                    break
                if total * 4 < hi - lo:  # few children: only those
                    ends = np.cumsum(counts)
                    nodes = np.repeat(self.first_child[live] - (ends - counts), counts) + np.arange(total)
                else:  # many: the whole depth (children of dead nodes read the DEAD row)
                    nodes = np.arange(lo, hi)
                parents = state[self.parent[nodes]]
            byte = self.byte[nodes]
            index = parents.astype(np.int64) * 256 + byte
            nxt = automaton.table.reshape(-1)[index]
            unknown = nxt == UNKNOWN
            if unknown.any():
                automaton.fill(parents[unknown])
                nxt = automaton.table.reshape(-1)[index]
            state[nodes] = nxt
            live = nodes[nxt != DEAD]
            if not live.size:
                break
        allowed = state[self.token_node] != DEAD
        if self.eot_id is not None:
            allowed[self.eot_id] = bool(automaton.complete[sid])
        return allowed

    def cached_mask(self, automaton: Automaton, sid: int) -> tuple[np.ndarray, bool]:
        """``(mask, only_end_of_text)`` for state ``sid``, from the automaton's cache when it has been seen.

        Cached masks are bit-packed (8 KiB for the world vocabulary) so that many
        states and grammars fit; unpacking one costs tens of microseconds.
        """
        cache, key = automaton.masks, (self, sid)
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return np.unpackbits(hit[0], count=self.vocab_size).view(bool), hit[1]
        mask = self.mask(automaton, sid)
        only_eot = bool(self.eot_id is not None and mask[self.eot_id] and mask.sum() == 1)
        cache[key] = (np.packbits(mask), only_eot)
        if len(cache) > MASK_CACHE_SIZE:
            cache.popitem(last=False)
        return mask, only_eot


@functools.lru_cache(maxsize=4)
def vocab_trie(tokenizer, vocab_size: int) -> VocabTrie:
    """The trie of ``tokenizer``'s vocabulary padded or cut to ``vocab_size`` (built once per tokenizer)."""
    n = min(vocab_size, tokenizer.vocab_size)
    token_bytes = [tokenizer.token_bytes(i) or b"" for i in range(n)] + [b""] * (vocab_size - n)
    return VocabTrie(token_bytes, tokenizer.end_of_text_id)
