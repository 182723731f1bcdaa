"""States checkpointed at message boundaries, found again by token prefix.

RWKV's state is all the model knows of the text it read, and its size is
fixed (about 21 MiB for the 2.9B model), so keeping one per conversation turn
is cheap, and a client that resends a conversation pays only for the new
message.

* A trie keyed by token ids (one trie per *origin*: the zero state, or a named
  initial state) finds the longest checkpointed prefix of a prompt in one pass.
* In memory the states form an LRU bounded by bytes.
* With a directory, every checkpoint is also written there (at once, so a
  killed server loses nothing) as a state file (``State.save``: safetensors,
  written to a temporary name and renamed, tagged with the model's identity),
  with its origin and token ids in the metadata. A restart rebuilds the trie
  from the files' headers; a state evicted from memory is read back on a hit.
  Files of another model, unreadable files and leftover temporary files are
  ignored (and removed). The directory is bounded by bytes too, oldest use first.

Only the engine thread calls this (it owns MLX), so there is no locking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import RwkvMlxError
from ..io import is_leftover
from ..model.state import ModelIdentity, State

log = logging.getLogger("rwkv_mlx.serve")

SUFFIX = ".state.safetensors"
_HEADER_LIMIT = 1 << 24  # a state file's JSON header is a few KiB; more means it is not one


@dataclass(eq=False)
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    entry: "_Entry | None" = None


@dataclass(eq=False)
class _Entry:
    origin: str
    tokens: tuple[int, ...]
    digest: str
    nbytes: int  # the state's size in memory
    state: State | None = None  # None: on disk only
    path: Path | None = None
    file_bytes: int = 0


def _digest(identity: str, origin: str, tokens: list[int]) -> str:
    h = hashlib.sha256(identity.encode())
    h.update(origin.encode() + b"\0")
    h.update(np.asarray(tokens, dtype=np.uint32).tobytes())
    return h.hexdigest()[:40]


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (without reading its tensors); ValueError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= _HEADER_LIMIT:
            raise ValueError(f"implausible header length {n}")
        header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if os.fstat(f.fileno()).st_size < 8 + n + end:
            raise ValueError("truncated: the tensors end past the end of the file")
    return header


class StateCache:
    """``lookup`` the longest checkpointed prefix of a prompt; ``put`` a checkpoint."""

    def __init__(self, model, *, max_bytes: int, directory: str | os.PathLike | None = None,
                 max_disk_bytes: int | None = None):
        self.model = model
        self.identity = ModelIdentity.of(model).to_json()
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.directory = Path(directory) if directory is not None else None
        self.roots: dict[str, _Node] = {}
        self.memory: OrderedDict[str, _Entry] = OrderedDict()  # LRU order, by digest: states held in memory
        self.disk: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: entries with a file
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.hits = self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._scan()

    # -- the index ------------------------------------------------------------------------

    def _node(self, origin: str, tokens: list[int], create: bool) -> _Node | None:
        node = self.roots.setdefault(origin, _Node()) if create else self.roots.get(origin)
        for t in tokens:
            if node is None:
                return None
            nxt = node.children.get(t)
            if nxt is None:
                if not create:
                    return None
                nxt = node.children[t] = _Node()
            node = nxt
        return node

    def _scan(self) -> None:
        """Index the directory's state files for this model; drop what a crash or another model left."""
        found = []
        for path in self.directory.iterdir():
            if is_leftover(path):
                log.warning("state cache: removing %s, left by a write that did not finish", path.name)
                path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(SUFFIX):
                continue
            try:
                meta = read_safetensors_header(path).get("__metadata__", {})
                if meta.get("model") != self.identity:
                    continue  # another model's cache sharing the directory: not ours to touch
                origin, tokens = meta["cache_origin"], json.loads(meta["cache_tokens"])
                if _digest(self.identity, origin, tokens) + SUFFIX != path.name:
                    raise ValueError("its name does not match its contents")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("state cache: ignoring and removing %s (%s)", path.name, e)
                path.unlink(missing_ok=True)
                continue
            found.append((path.stat().st_mtime, path, origin, tokens))
        for _, path, origin, tokens in sorted(found, key=lambda f: f[0]):  # oldest first: LRU order
            self._index(origin, tokens, None, path)
        if found:
            log.info("state cache: %d checkpoints found in %s", len(found), self.directory)

    def _index(self, origin: str, tokens: list[int], state: State | None, path: Path | None) -> _Entry:
        node = self._node(origin, tokens, create=True)
        if node.entry is None:
            nbytes = state.nbytes if state is not None else path.stat().st_size
            node.entry = _Entry(origin, tuple(tokens), _digest(self.identity, origin, tokens), nbytes)
        entry = node.entry
        if path is not None and entry.path is None:
            entry.path, entry.file_bytes = path, path.stat().st_size
            self.disk[entry.digest] = entry
            self.disk_bytes += entry.file_bytes
        if state is not None and entry.state is None:
            entry.state = state
            self.memory[entry.digest] = entry
            self.memory_bytes += entry.nbytes
        return entry

    # -- use ------------------------------------------------------------------------------------

    def lookup(self, origin: str, tokens: list[int], max_len: int) -> tuple[int, State | None]:
        """(n, state after tokens[:n]) for the longest checkpoint with n <= max_len, or (0, None)."""
        node, best, path_nodes = self.roots.get(origin), None, []
        for i, t in enumerate(tokens[:max_len]):
            if node is None:
                break
            node = node.children.get(t)
            if node is not None and node.entry is not None:
                path_nodes.append((i + 1, node.entry))
        for n, entry in reversed(path_nodes):
            state = self._materialize(entry)
            if state is not None:
                best = (n, state)
                break
        if best is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        return best

    def _materialize(self, entry: _Entry) -> State | None:
        if entry.state is not None:
            self.memory.move_to_end(entry.digest)
            if entry.path is not None:
                self.disk.move_to_end(entry.digest)
            return entry.state
        if entry.path is None:
            return None
        try:
            state = State.load(entry.path, self.model)
        except RwkvMlxError as e:
            log.warning("state cache: cannot read %s back (%s); dropping it", entry.path.name, e)
            self._drop_file(entry)
            self._drop_from_trie(entry)
            return None
        self.disk.move_to_end(entry.digest)
        self._index(entry.origin, list(entry.tokens), state, None)
        self._evict_memory()
        return state

    def put(self, origin: str, tokens: list[int], state: State) -> None:
        """Keep ``state`` as the state after reading ``tokens`` from ``origin`` (a no-op if already kept)."""
        node = self._node(origin, tokens, create=False)
        if node is not None and node.entry is not None and node.entry.state is not None:
            self._materialize(node.entry)  # refresh its place in the LRU
            return
        path = None
        if self.directory is not None and (node is None or node.entry is None or node.entry.path is None):
            path = self.directory / (_digest(self.identity, origin, tokens) + SUFFIX)
            try:
                state.save(path, metadata={"cache_origin": origin, "cache_tokens": json.dumps(tokens)})
            except (RwkvMlxError, OSError) as e:  # a full disk costs the checkpoint, not the request
                log.warning("state cache: cannot write %s (%s)", path, e)
                path = None
        self._index(origin, tokens, state, path)
        self._evict_memory()
        self._evict_disk()

    # -- bounds -------------------------------------------------------------------------------

    def _evict_memory(self) -> None:
        while self.memory_bytes > self.max_bytes and self.memory:
            _, entry = self.memory.popitem(last=False)
            entry.state = None
            self.memory_bytes -= entry.nbytes
            if entry.path is None:
                self._drop_from_trie(entry)

    def _evict_disk(self) -> None:
        while self.max_disk_bytes is not None and self.disk_bytes > self.max_disk_bytes and self.disk:
            entry = next(iter(self.disk.values()))
            self._drop_file(entry)
            if entry.state is None:
                self._drop_from_trie(entry)

    def _drop_file(self, entry: _Entry) -> None:
        self.disk.pop(entry.digest, None)
        self.disk_bytes -= entry.file_bytes
        entry.path.unlink(missing_ok=True)
        entry.path, entry.file_bytes = None, 0

    def _drop_from_trie(self, entry: _Entry) -> None:
        """Forget ``entry``, and the nodes of its path that lead to nothing else any more (a long
        conversation leaves one node a token: kept, they would outgrow the byte bounds)."""
        path = [self.roots.get(entry.origin)]
        for t in entry.tokens:
            if path[-1] is None:
                return
            path.append(path[-1].children.get(t))
        if path[-1] is None or path[-1].entry is not entry:
            return
        path[-1].entry = None
        for depth in range(len(entry.tokens), 0, -1):
            node = path[depth]
            if node.entry is not None or node.children:
                break
            del path[depth - 1].children[entry.tokens[depth - 1]]
        if not path[0].children and path[0].entry is None:
            del self.roots[entry.origin]

    def stats(self) -> dict:
        return {"memory_bytes": self.memory_bytes, "memory_states": len(self.memory), "disk_bytes": self.disk_bytes,
                "disk_states": len(self.disk), "hits": self.hits, "misses": self.misses}
