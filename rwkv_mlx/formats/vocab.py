"""The RWKV world vocabulary: the original text file and llama.cpp's escaped GGUF form.

Both describe the same 65529 byte strings (ids 1..65529); id 0 is end-of-text.
GGUF files store each token as Python's ``bytes`` repr without the ``b'`` and
closing quote; ``unescape_gguf_token`` undoes that exactly as llama.cpp does.
The vocabulary's rule is greedy longest match; ``byte_trie`` and ``trie_pattern``
write it as a regex (the tokenizer's matcher, and mlx-lm's tokenizer.json).
"""

from __future__ import annotations

import ast
import codecs
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import ModelFileError

WORLD_VOCAB_SIZE = 65536  # 65529 tokens + id 0 + 6 padding ids
WORLD_VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
BUNDLED_WORLD_VOCAB = Path(__file__).resolve().parents[1] / "data" / WORLD_VOCAB_FILE_NAME  # shipped in the package
TOKEN_END = 256  # trie key marking "a token ends at this node"; bytes are 0..255

# An escape other than \\ \' \" \t \n \r \xHH (which codecs.escape_decode reads as llama.cpp
# does), or a backslash at the end: those take the slow path below.
_UNUSUAL_ESCAPE = re.compile(r"\\(?:[^\\'\"tnrx]|x(?![0-9a-fA-F]{2})|$)")


def load_world_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Read ``rwkv_vocab_v20230424.txt``: lines ``<id> <python literal> <byte length>``."""
    vocab: dict[int, bytes] = {}
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(path, f"cannot read vocabulary ({e})") from None
    for n, line in enumerate(lines, 1):
        try:
            idx = int(line[: line.index(" ")])
            token = _literal_bytes(line[line.index(" ") + 1 : line.rindex(" ")])
            if len(token) != int(line[line.rindex(" ") :]):
                raise ValueError("byte length does not match")
        except (ValueError, SyntaxError, TypeError) as e:
            raise ModelFileError(path, f"line {n}: not a vocabulary entry ({e})") from None
        vocab[idx] = token
    return vocab


def _literal_bytes(literal: str) -> bytes:
    """The bytes of a vocabulary entry's Python literal (``'abc'``, ``b'\\xe4'``), without ``ast`` where it is plain.

    ``ast.literal_eval`` costs about 0.5 s for the 65529 lines; most are a quoted str
    without escapes, or a bytes literal, whose escapes ``codecs.escape_decode`` reads
    as the Python parser does.  Anything else goes to ``ast``.
    """
    quote = literal[:1]
    if quote in ("'", '"') and literal[-1:] == quote and len(literal) >= 2 and "\\" not in literal:
        return literal[1:-1].encode("utf-8")
    if literal[:2] in ("b'", 'b"') and literal[-1:] == literal[1] and len(literal) >= 3 and literal.isascii():
        return codecs.escape_decode(literal[2:-1].encode("ascii"))[0]
    value = ast.literal_eval(literal)
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def escape_gguf_token(token: bytes) -> str:
    """llama.cpp's converter form: ``repr(token)`` without ``b'`` and the closing quote."""
    return repr(token)[2:-1]


def unescape_gguf_token(text: str) -> bytes:
    """Inverse of ``escape_gguf_token`` (llama.cpp ``llama_unescape_rwkv_token``)."""
    if "\\" not in text:  # nothing to undo (65k tokens are unescaped per load: kept fast)
        return text.encode("utf-8")
    if _UNUSUAL_ESCAPE.search(text) is None:  # only the escapes repr() writes: the C decoder agrees
        return codecs.escape_decode(text.encode("utf-8"))[0]
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            e = text[i + 1]
            if e == "t":
                out.append(9)
            elif e == "n":
                out.append(10)
            elif e == "r":
                out.append(13)
            elif e == "x" and _is_hex(text[i + 2 : i + 4]):
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            else:
                out += e.encode("utf-8")
            i += 2
            continue
        out += c.encode("utf-8")
        i += 1
    return bytes(out)


def _is_hex(s: str) -> bool:
    return len(s) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in s)


def byte_trie(tokens: Iterable[bytes]) -> dict:
    """Nested dicts keyed by byte; ``TOKEN_END`` marks a node where a token ends."""
    root: dict = {}
    for token in tokens:
        node = root
        for byte in token:
            node = node.setdefault(byte, {})
        node[TOKEN_END] = True
    return root


def trie_pattern(node: dict, literal: Callable[[bytes], str], byte_class: Callable[[list[int]], str], *,
                 max_depth: int | None = None, flat: Callable[[dict], str] | None = None, depth: int = 0) -> str:
    """A regex alternation whose leftmost match at any position is the longest token there.

    Siblings in the trie differ in their first byte, so at most one branch of each
    alternation can match; a token node's subtree is an optional group, so when
    the deeper branch fails the engine backs off to the token itself. ``literal``
    and ``byte_class`` write bytes in the target regex dialect (Python's ``re``
    here, Oniguruma for the mlx-lm tokenizer.json); below ``max_depth``, ``flat``
    writes the rest of the subtrie (``re`` refuses deeper nesting).
    """
    if max_depth is not None and depth >= max_depth:
        return flat(node)
    branches, single_bytes = [], []
    for byte in sorted(k for k in node if k != TOKEN_END):
        child, chain = node[byte], bytearray([byte])
        while len(child) == 1 and TOKEN_END not in child:  # chain with no token on it: one literal
            (next_byte, child), = child.items()
            chain.append(next_byte)
        if all(k == TOKEN_END for k in child):  # a leaf
            if len(chain) == 1:
                single_bytes.append(byte)
            else:
                branches.append(literal(bytes(chain)))
            continue
        optional = "?" if TOKEN_END in child else ""
        inner = trie_pattern(child, literal, byte_class, max_depth=max_depth, flat=flat, depth=depth + 1)
        branches.append(literal(bytes(chain)) + "(?:" + inner + ")" + optional)
    if single_bytes:
        branches.append(byte_class(single_bytes))
    return "|".join(branches)
