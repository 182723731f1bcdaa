"""The RWKV "World" tokenizer: greedy longest match on UTF-8 bytes (spec section 4).

Matching follows the reference tokenizers (pip ``rwkv`` TRIE_TOKENIZER and
``pyrwkv_tokenizer``), not llama.cpp: id 0 (end-of-text, ``<s>`` in GGUF) and the
padding/control entries never match text, so the literal text ``<s>`` encodes as
``[61, 116, 63]``.

Speed.  Two matchers give the same ids.  Short texts (a prompt, a chat turn) go
through a walk in Python: at each position the token lengths that occur after
its first two bytes are tried longest first against the token dictionary (the
table costs about 20 ms to build, on the first ``encode``).  Once a tokenizer has
walked ``REGEX_AFTER_BYTES`` in all, the byte trie is compiled into one regular
expression (nested optional groups, one per trie node that ends a token) and the
whole match loop runs inside the C ``re`` engine: 5.5 MB/s on English prose
(tinyshakespeare), 6.6 MB/s on Python source, 4.2 MB/s on Chinese, 4.5 MB/s on
Japanese (2-core development machine, CPython 3.11, best of 3; pyrwkv_tokenizer
(Rust) does 50-100 MB/s there once warm).  Compiling the full 65529-token world
vocabulary costs about 1 s, which a CLI run that reads one prompt never pays; it
is shared by every tokenizer with the same vocabulary through ``re``'s pattern cache.

Text that is not valid Unicode still encodes.  ``bytes`` are matched as given.
A ``str`` containing surrogate code points (which strict UTF-8 refuses) is first
normalised through UTF-16, so a *paired* surrogate becomes the real character it
stands for, and the remaining lone surrogates are written as their 3-byte
"surrogatepass" form (``\\ud800`` -> ``ed a0 80``).  Those bytes are not valid
UTF-8, so ``decode`` shows them as U+FFFD; nothing raises.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from ..errors import InvalidArgumentError
from ..formats.vocab import (BUNDLED_WORLD_VOCAB, TOKEN_END, WORLD_VOCAB_SIZE, byte_trie, load_world_vocab, trie_pattern,
                             unescape_gguf_token)

END_OF_TEXT_ID = 0
WORLD_EOT_TOKEN_ID = 261  # "\n\n": what the GGUF converter writes as eot, the end of a chat turn

# gguf.TokenType values (not imported, to keep ``import gguf`` out of the tokenizer).
GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_UNUSED = 5
UNMATCHABLE_GGUF_TOKEN_TYPES = frozenset({GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_UNUSED})

# ``re`` parses nested groups recursively and overflows the Python stack somewhere
# past 400 levels; below this depth a subtrie is written as a flat alternation.
MAX_PATTERN_NESTING = 200

#: Bytes a tokenizer encodes with the Python walk (about 1-2 MB/s) before it compiles the regex
#: matcher (about 1 s for the world vocabulary, then ~5 MB/s): the cost of the walk so far then
#: matches the compile's.
REGEX_AFTER_BYTES = 1 << 20


class Tokenizer:
    """Encodes text to token ids and back for one vocabulary.

    ``tokens`` are the entries that may match text; every id in ``0..vocab_size-1``
    not among them (end-of-text, padding, control) decodes to no bytes.
    """

    end_of_text_id = END_OF_TEXT_ID

    def __init__(
        self,
        tokens: Mapping[int, bytes],
        vocab_size: int,
        eot_token_id: int | None = WORLD_EOT_TOKEN_ID,
    ):
        vocab_size = _as_index(vocab_size, "vocab_size")
        if vocab_size < 1:
            raise InvalidArgumentError(f"vocab_size must be positive, got {vocab_size}")
        if eot_token_id is not None:
            eot_token_id = _as_index(eot_token_id, "eot_token_id")
            if not 0 <= eot_token_id < vocab_size:
                raise InvalidArgumentError(
                    f"eot_token_id {eot_token_id} is outside the vocabulary (0..{vocab_size - 1})"
                )
        self._vocab_size = vocab_size
        self._eot_token_id = eot_token_id
        self._bytes_by_id: list[bytes] = [b""] * vocab_size
        self._id_by_bytes: dict[bytes, int] = {}
        for key in sorted(tokens):
            token_id = key if type(key) is int else _as_index(key, "token id")  # plain ints: the common case, kept fast
            if not 0 <= token_id < vocab_size:
                raise InvalidArgumentError(
                    f"token id {token_id} is outside the vocabulary (0..{vocab_size - 1})"
                )
            if token_id == END_OF_TEXT_ID:
                raise InvalidArgumentError(
                    "token id 0 is end-of-text and must not be given as a text token"
                )
            token = bytes(tokens[key])
            self._bytes_by_id[token_id] = token
            if token:  # an empty token can never be the longest match
                self._id_by_bytes.setdefault(token, token_id)  # duplicates: lowest id wins
        self._matcher: re.Pattern[bytes] | None = None
        self._lengths: dict[bytes, list[int]] | None = None  # the walk's table, built on first use
        self._walked = 0
        self.regex_after_bytes = REGEX_AFTER_BYTES

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        """The world tokenizer from ``rwkv_vocab_v20230424.txt``; ``None`` = the copy shipped in the package."""
        if path is not None:
            return cls(load_world_vocab(path), WORLD_VOCAB_SIZE, WORLD_EOT_TOKEN_ID)
        return cls(load_world_vocab(BUNDLED_WORLD_VOCAB), WORLD_VOCAB_SIZE, WORLD_EOT_TOKEN_ID)

    @classmethod
    def from_gguf(
        cls,
        tokens: Sequence[str],
        token_types: Sequence[int] | None,
        eot_token_id: int | None = None,
    ) -> Tokenizer:
        """From ``tokenizer.ggml.tokens`` / ``token_type``; vocab_size is the list length.

        Id 0 and CONTROL/UNUSED entries are left out of matching so that the result
        encodes like the reference tokenizer rather than like llama.cpp.
        """
        if token_types is not None and len(token_types) != len(tokens):
            raise InvalidArgumentError(
                f"GGUF tokenizer has {len(tokens)} tokens but {len(token_types)} token types"
            )
        matchable: dict[int, bytes] = {}
        for token_id, text in enumerate(tokens):
            if token_id == END_OF_TEXT_ID:
                continue
            if token_types is not None and int(token_types[token_id]) in UNMATCHABLE_GGUF_TOKEN_TYPES:
                continue
            matchable[token_id] = unescape_gguf_token(text)
        return cls(matchable, max(len(tokens), 1), eot_token_id)

    # -- properties ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_token_id(self) -> int | None:
        return self._eot_token_id

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self._vocab_size}, text_tokens={len(self._id_by_bytes)}, "
            f"eot_token_id={self._eot_token_id})"
        )

    # -- encoding --------------------------------------------------------------------

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text``; see the module docstring for what happens to surrogates."""
        data = _text_to_bytes(text)
        if not data:
            return []
        if self._matcher is None:
            self._walked += len(data)
            if self._walked <= self.regex_after_bytes:
                return self._walk(data)
            self._matcher = _compile_matcher(self._id_by_bytes)
        pieces = self._matcher.findall(data)
        if sum(map(len, pieces)) != len(data):
            offset = 0
            for match in self._matcher.finditer(data):
                if match.start() != offset:
                    break
                offset = match.end()
            self._raise_unmatched(data, offset)
        return list(map(self._id_by_bytes.__getitem__, pieces))

    def _walk(self, data: bytes) -> list[int]:
        """Greedy longest match in Python: the lengths of the tokens that start with the next two bytes, longest first."""
        if self._lengths is None:
            table: dict[bytes, set[int]] = {}
            for token in self._id_by_bytes:
                if len(token) > 1:
                    table.setdefault(token[:2], set()).add(len(token))
            self._lengths = {k: sorted(v, reverse=True) for k, v in table.items()}
        ids, lengths, out, i, n = self._id_by_bytes, self._lengths, [], 0, len(data)
        while i < n:
            for length in lengths.get(data[i:i + 2], ()):
                piece = data[i:i + length]  # shorter than ``length`` at the end: then the longest possible
                token_id = ids.get(piece)
                if token_id is not None:
                    break
            else:
                piece = data[i:i + 1]
                token_id = ids.get(piece)
                if token_id is None:
                    self._raise_unmatched(data, i)
            out.append(token_id)
            i += len(piece)
        return out

    def _raise_unmatched(self, data: bytes, offset: int) -> None:
        # Every single byte is a token in a complete vocabulary; a truncated one may lack some.
        raise InvalidArgumentError(
            f"cannot encode byte 0x{data[offset]:02x} at byte offset {offset}: no token of this "
            f"vocabulary ({len(self._id_by_bytes)} text tokens) matches there"
        )

    # -- decoding --------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token; end-of-text and padding ids have none."""
        index = _as_index(token_id, "token id")
        if not 0 <= index < self._vocab_size:
            raise InvalidArgumentError(
                f"token id {index} is outside the vocabulary (0..{self._vocab_size - 1})"
            )
        return self._bytes_by_id[index]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join([self.token_bytes(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not UTF-8 become U+FFFD (a model can emit any id order)."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text as they arrive without printing half a character.

    One character can span several tokens.  ``add`` holds back a trailing byte
    sequence only while it can still become a valid UTF-8 character, so invalid
    bytes come out (as U+FFFD) at once instead of stalling the stream, and the
    concatenated output always equals ``tokenizer.decode`` of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending = b""

    def add(self, token_id: int) -> str:
        data = self._pending + self._tokenizer.token_bytes(token_id)
        keep = _incomplete_utf8_suffix_length(data)
        # A held suffix starts with a lead byte, where the UTF-8 decoder always
        # restarts, so decoding the two parts separately equals decoding them together.
        self._pending = data[len(data) - keep :]
        return data[: len(data) - keep].decode("utf-8", "replace")

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return data.decode("utf-8", "replace")


# UTF-8 lead byte -> (sequence length, allowed range of the second byte), RFC 3629.
# Narrow second-byte ranges exclude overlong forms, surrogates and code points > U+10FFFF.
_UTF8_LEAD_BYTES: dict[int, tuple[int, int, int]] = {
    **{b: (2, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (3, 0xA0, 0xBF),
    **{b: (3, 0x80, 0xBF) for b in range(0xE1, 0xED)},
    0xED: (3, 0x80, 0x9F),
    0xEE: (3, 0x80, 0xBF),
    0xEF: (3, 0x80, 0xBF),
    0xF0: (4, 0x90, 0xBF),
    0xF1: (4, 0x80, 0xBF),
    0xF2: (4, 0x80, 0xBF),
    0xF3: (4, 0x80, 0xBF),
    0xF4: (4, 0x80, 0x8F),
}


def _incomplete_utf8_suffix_length(data: bytes) -> int:
    """Length of the trailing bytes that are a proper prefix of a valid UTF-8 character, else 0."""
    end = len(data)
    for back in range(1, min(3, end) + 1):
        byte = data[end - back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:
            lead = _UTF8_LEAD_BYTES.get(byte)
            if lead is None:
                return 0
            length, second_low, second_high = lead
            if back >= length:
                return 0
            if back >= 2 and not second_low <= data[end - back + 1] <= second_high:
                return 0
            return back
        # a continuation byte: its lead, if any, is further back
    return 0


def _as_index(value: object, what: str) -> int:
    """Any integer type (numpy scalars from a GGUF reader included), never a float or bool."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}") from None


def _text_to_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            paired = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
            return paired.encode("utf-8", "surrogatepass")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise InvalidArgumentError(f"text to encode must be str or bytes, got {type(text).__name__}")


def _compile_matcher(id_by_bytes: Mapping[bytes, int]) -> re.Pattern[bytes]:
    """The tokenizer's matcher: the trie as one bytes regex (latin-1 maps each byte to one character)."""
    root = byte_trie(id_by_bytes)
    if not root:
        return re.compile(b"(?!)")  # matches nothing: every byte of any input is unmatched
    pattern = trie_pattern(root, _re_literal, _byte_class, max_depth=MAX_PATTERN_NESTING, flat=_flat_pattern)
    return re.compile(pattern.encode("latin-1"), re.DOTALL)


def _re_literal(data: bytes) -> str:
    return re.escape(data.decode("latin-1"))


def _flat_pattern(node: dict) -> str:
    """The subtrie as plain alternatives, longest first (``re`` takes the first that matches)."""
    suffixes = []
    stack = [(node, b"")]
    while stack:
        current, prefix = stack.pop()
        for key, child in current.items():
            if key == TOKEN_END:
                if prefix:
                    suffixes.append(prefix)
            else:
                stack.append((child, prefix + bytes([key])))
    suffixes.sort(key=lambda s: (-len(s), s))
    return "|".join(_re_literal(s) for s in suffixes)


def _byte_class(byte_values: list[int]) -> str:
    if len(byte_values) == 1:
        return _re_literal(bytes(byte_values))
    return "[" + "".join("\\x%02x" % b for b in byte_values) + "]"
