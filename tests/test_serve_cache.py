"""The server's state cache: longest checkpointed prefix, memory bound, disk spill, restart, strangers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

import rwkv_mlx
from rwkv_mlx import State
from rwkv_mlx.serve.state_cache import SUFFIX, StateCache

DEMO = Path(__file__).resolve().parents[1] / "rwkv_mlx" / "data" / "rwkv7-demo-shakespeare.gguf"


@pytest.fixture(scope="module")
def model():
    return rwkv_mlx.load(DEMO)[0]


def marked(model, value: float) -> State:
    """A state whose every entry is ``value``: which checkpoint came back is visible in any entry."""
    return State.zeros(model.args).map(lambda a: a + value).owned_by(model)


def value_of(state: State) -> float:
    return state.wkv[0][0, 0, 0, 0].item()


def test_longest_prefix_within_the_limit_and_per_origin(model):
    cache = StateCache(model, max_bytes=1 << 30)
    cache.put("", [1, 2], marked(model, 2))
    cache.put("", [1, 2, 3, 4], marked(model, 4))
    cache.put("state:abc", [1, 2, 3], marked(model, 30))
    n, s = cache.lookup("", [1, 2, 3, 4, 5], max_len=4)
    assert (n, value_of(s)) == (4, 4)
    n, s = cache.lookup("", [1, 2, 3, 4], max_len=3)  # the whole prompt cached: one token must still be read
    assert (n, value_of(s)) == (2, 2)
    assert cache.lookup("", [9, 2, 3], max_len=3) == (0, None)
    n, s = cache.lookup("state:abc", [1, 2, 3, 4], max_len=4)
    assert (n, value_of(s)) == (3, 30)
    assert cache.lookup("state:other", [1, 2, 3, 4], max_len=4) == (0, None)


def test_memory_is_bounded_by_bytes_and_the_disk_copy_comes_back(model, tmp_path):
    size = marked(model, 0).nbytes
    memory_only = StateCache(model, max_bytes=2 * size)
    for i in range(3):
        memory_only.put("", [i], marked(model, i))
    assert memory_only.memory_bytes <= 2 * size
    assert memory_only.lookup("", [0, 9], 2) == (0, None)  # least recently used: gone
    assert value_of(memory_only.lookup("", [2, 9], 2)[1]) == 2

    spilled = StateCache(model, max_bytes=2 * size, directory=tmp_path)
    for i in range(3):
        spilled.put("", [i], marked(model, i))
    assert spilled.memory_bytes <= 2 * size and len(list(tmp_path.glob("*" + SUFFIX))) == 3
    n, s = spilled.lookup("", [0, 9], 2)  # evicted from memory, read back from its file
    assert n == 1 and all(mx.array_equal(a, b).item() for a, b in zip(s.arrays(), marked(model, 0).arrays()))


def test_evicted_paths_leave_no_nodes_behind(model):
    """The trie is bounded with the states: a long evicted conversation frees its nodes."""
    size = marked(model, 0).nbytes
    cache = StateCache(model, max_bytes=size)

    def count(roots) -> int:
        todo, n = list(roots), 0
        while todo:
            node = todo.pop()
            n += 1
            todo += node.children.values()
        return n

    cache.put("", [1, 2], marked(model, 2))
    cache.put("", list(range(1000, 1500)), marked(model, 5))  # evicts [1, 2]: memory holds one state
    assert count(cache.roots.values()) == 1 + 500  # the root and the kept path only
    cache.put("", [1, 2, 3], marked(model, 3))  # evicts the 500-token path
    assert count(cache.roots.values()) == 1 + 3
    assert value_of(cache.lookup("", [1, 2, 3, 4], 4)[1]) == 3


def test_a_restart_finds_the_files_and_ignores_other_models(model, tmp_path):
    first = StateCache(model, max_bytes=1 << 30, directory=tmp_path)
    first.put("", [5, 6, 7], marked(model, 7))
    stranger = SimpleNamespace(args=model.args, fingerprint="another-model")
    other = StateCache(stranger, max_bytes=1 << 30, directory=tmp_path)
    assert other.lookup("", [5, 6, 7, 8], 4) == (0, None)  # our file is not the stranger's
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 1  # ... and the stranger left it alone
    again = StateCache(model, max_bytes=1 << 30, directory=tmp_path)
    n, s = again.lookup("", [5, 6, 7, 8], 4)
    assert (n, value_of(s)) == (3, 7)


def test_a_renamed_or_truncated_file_is_dropped(model, tmp_path):
    cache = StateCache(model, max_bytes=1 << 30, directory=tmp_path)
    cache.put("", [1, 2], marked(model, 2))
    cache.put("", [3, 4], marked(model, 4))
    a, b = sorted(tmp_path.glob("*" + SUFFIX))
    data = a.read_bytes()
    a.write_bytes(data[: len(data) // 2])  # torn
    b.rename(tmp_path / ("f" * 40 + SUFFIX))  # a name that does not match its contents
    again = StateCache(model, max_bytes=1 << 30, directory=tmp_path)
    assert again.lookup("", [1, 2, 0], 3) == (0, None) and again.lookup("", [3, 4, 0], 3) == (0, None)
    assert list(tmp_path.iterdir()) == []


def test_disk_is_bounded_too(model, tmp_path):
    size = marked(model, 0).nbytes
    cache = StateCache(model, max_bytes=size, directory=tmp_path, max_disk_bytes=int(2.5 * size))
    for i in range(4):
        cache.put("", [i], marked(model, i))
    assert len(list(tmp_path.glob("*" + SUFFIX))) == 2 and cache.disk_bytes <= 2.5 * size
    assert cache.lookup("", [0, 9], 2) == (0, None)
    assert value_of(cache.lookup("", [3, 9], 2)[1]) == 3
