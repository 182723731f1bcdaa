"""The world tokenizer against independent references.

Expected ids never come from rwkv_mlx itself: they come from pyrwkv_tokenizer (a
Rust implementation bundling the same vocabulary), from the check values in the
spec (section 4.2, taken from the reference tokenizers), from a deliberately
naive longest-prefix search written here, or from Python's own UTF-8 codec.
"""

from __future__ import annotations

import hashlib
import os
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_mlx.errors import InvalidArgumentError, RwkvMlxError
from rwkv_mlx.text.tokenizer import StreamDecoder, Tokenizer
from rwkv_mlx.formats.vocab import load_world_vocab

pyrwkv_tokenizer = pytest.importorskip("pyrwkv_tokenizer")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_VOCAB = REPO_ROOT / "rwkv_mlx" / "data" / "rwkv_vocab_v20230424.txt"
ORACLE_DIR = Path(os.environ.get("RWKV_MLX_ORACLE", REPO_ROOT.parent / "shared" / "oracle"))
GGUF_WITH_TRUNCATED_VOCAB = ORACLE_DIR / "models" / "fixa-f32.gguf"

# Spec 4.2 check values (pip ``rwkv`` and pyrwkv_tokenizer agree on them).
SPEC_LONG_TEXT = "User: Hello, world! 今天是美好的一天。\n\nAssistant: <think"
SPEC_LONG_IDS = [24281, 59, 36786, 45, 40213, 34, 33, 10381, 11639, 13091, 15597, 11685,
                 14734, 10250, 11639, 28329, 11, 5585, 41693, 59, 295, 35762]
SPEC_VOCAB_MD5 = "dd1946a66e1721abeac49f9c75a1e844"  # spec 4.1 / oracle README


@pytest.fixture(scope="module", params=["walk", "regex"])
def world(request) -> Tokenizer:
    """The world tokenizer with each of its two matchers: the Python walk (short texts) and the regex."""
    tokenizer = Tokenizer.from_vocab_file()
    tokenizer.regex_after_bytes = 1 << 62 if request.param == "walk" else 0
    return tokenizer


@pytest.fixture(scope="module")
def reference():
    return pyrwkv_tokenizer.RWKVTokenizer()


# -- varied text, built from pieces with a fixed seed ------------------------------------

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "Hello, world! How's it going? I'm fine -- thanks.",
    "RWKV is an RNN with transformer-level LLM performance.",
    "Don't panic: 42 is the answer (probably).",
    "e-mail: someone@example.com, URL: https://example.org/a?b=c&d=e#f",
    "\"Quoted\" and 'single-quoted' text; semicolons; colons: dashes — and ellipses…",
    "ALL CAPS SENTENCE WITH Mixed Case words",
]
WORDS = ("the of and to in is was for that with as on by it at from this be are an have not "
         "but had his they you were her which one all we there been when can said who would "
         "tokenizer model state token prefill recurrent matrix vector").split()
CODE = [
    "def encode(self, text: str) -> list[int]:\n    return [ord(c) for c in text]\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f\"{i=}\")\n",
    "class Foo(Bar):\n    \"\"\"Docstring.\"\"\"\n\n    x: int = 0\n",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    printf(\"%d\\n\", argc);\n    return 0;\n}\n",
    "static inline float silu(float x) { return x / (1.0f + expf(-x)); }",
    "if (a && !b || c->d[i] >= 0x7fffffff) { *p++ = '\\0'; }",
    "x = {'a': [1, 2, 3], \"b\": (4, 5)}  # comment\nlambda y: y ** 2",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    "<div class=\"x\"><p>Hello &amp; goodbye</p></div>",
]
CJK = [
    "今天是美好的一天。", "我们去公园散步吧！", "人工智能正在改变世界，", "中华人民共和国", "龘靐齉爩",
    "日本語のテキストです。", "カタカナとひらがな", "東京都は雨でした", "ｶﾀｶﾅ半角",
    "안녕하세요, 세계!", "한국어 문장입니다.", "𠀀𠀁𪚥",  # CJK extension B: 4-byte UTF-8
]
OTHER_SCRIPTS = [
    "Привет, мир!", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "café naïve façade", "e\u0301 a\u0308 n\u0303", "straße Ærø ĳ ﬁ", "ＡＢＣ１２３", "∑∫√∞≈≠ℝ",
    "zero\u200bwidth", "\ufeffBOM", "non\u00a0breaking", "ctrl\x01\x02\x1b[0m", "\x7f\x80\x9f",
    "\U0001d400\U0001d41a", "\ue000\uf8ff", "\U0010fffd",
]
EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "🇯🇵", "🇺🇸🇬🇧🇩🇪", "1️⃣", "#️⃣",
    "❤️", "☺️", "🫠", "🦀", "🤖💬", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
]
SPECIAL_LOOKING = ["<s>", "</s>", "<|endoftext|>", "<think>", "</think>", "User:", "Assistant:",
                   "System:", "<s><s>", "[PAD65530]", "\\n\\n", "\\x00"]
WHITESPACE_UNITS = [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\r", "\u3000", " \n", "\t\n"]
NEWLINE_JOINS = ["\n\n", "\n\n\n", "\n \n", ".\n\n", "。\n\n", "\r\n\r\n", "\n\n ", " \n\n",
                 "\n\n\t", ":\n\n", "!\n\n\n\n"]
REPEAT_UNITS = ["a", " ", "=", "-", "\n", "\t", "0", "中", "😀", "ab", "。", "é", "\\", "*"]
CODEPOINT_RANGES = [
    (0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
    (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
    (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0x10000, 0x10FFFF),
]


def _random_codepoints(rng: random.Random) -> str:
    chars = []
    for _ in range(rng.randint(1, 12)):
        low, high = rng.choice(CODEPOINT_RANGES)
        cp = rng.randint(low, high)
        if 0xD800 <= cp <= 0xDFFF or cp == 0xFFFD:
            cp = 0x41  # a str cannot hold a lone surrogate here; U+FFFD is kept out on purpose
        chars.append(chr(cp))
    return "".join(chars)


def _random_piece(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(PROSE)
    if kind == 1:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 15))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice(["", ".", ",", "!", "?", ":", ";"])
    if kind == 2:
        return rng.choice(CODE)
    if kind == 3:
        return "".join(rng.choice(CJK) for _ in range(rng.randint(1, 3)))
    if kind == 4:
        return rng.choice(OTHER_SCRIPTS)
    if kind == 5:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
    if kind == 6:
        return rng.choice(SPECIAL_LOOKING)
    if kind == 7:
        return "".join(rng.choice(WHITESPACE_UNITS) for _ in range(rng.randint(1, 12)))
    if kind == 8:
        return rng.choice([
            str(rng.randint(0, 10 ** rng.randint(1, 30))),
            f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 8)}f}",
            f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 60))),
            f"{rng.random():e}",
        ])
    if kind == 9:
        return rng.choice(REPEAT_UNITS) * rng.randint(2, 300)
    if kind == 10:
        return _random_codepoints(rng)
    # a chat turn: the "\n\n" separators of the rwkv-world template
    return f"User: {rng.choice(PROSE + CJK)}\n\nAssistant: {rng.choice(PROSE + CJK + EMOJI)}\n\n"


def varied_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    fixed = (PROSE + CODE + CJK + OTHER_SCRIPTS + EMOJI + SPECIAL_LOOKING + WHITESPACE_UNITS
             + NEWLINE_JOINS + [u * 257 for u in REPEAT_UNITS] + [SPEC_LONG_TEXT])
    out = list(fixed)
    while len(out) < count:
        style = rng.random()
        if style < 0.3:
            out.append(_random_piece(rng))
        elif style < 0.55:  # two pieces across a blank-line boundary
            out.append(_random_piece(rng) + rng.choice(NEWLINE_JOINS) + _random_piece(rng))
        else:
            separators = ["", " ", "\n", "\n\n", "\t", ", ", "。", " \n\n", "\r\n"]
            pieces = [_random_piece(rng) for _ in range(rng.randint(2, 6))]
            text = pieces[0]
            for piece in pieces[1:]:
                text += rng.choice(separators) + piece
            out.append(text)
    return out


VARIED = varied_strings(2400, seed=20230424)


def test_generated_strings_cover_the_intended_kinds():
    joined = "".join(VARIED)
    assert len(VARIED) >= 2000
    for needle in ["\u200d", "\U0001F1EF", "<s>", "\r\n", "\n\n\n", "\t", "def ", "#include",
                   "中", "ひ", "한", "😀" * 50, "a" * 200]:
        assert needle in joined, needle
    assert "\ufffd" not in joined
    assert len(set(VARIED)) > 1800  # random combinations, not a short list repeated


# -- 1. agreement with pyrwkv_tokenizer --------------------------------------------------

def test_encode_agrees_with_pyrwkv_tokenizer(world, reference):
    mismatches = [s for s in VARIED if world.encode(s) != reference.encode(s)]
    assert not mismatches, f"{len(mismatches)} disagreements, first: {mismatches[0]!r}"


def test_decode_round_trips_and_agrees_with_pyrwkv_tokenizer(world, reference):
    for s in VARIED:
        ids = world.encode(s)
        assert world.decode(ids) == s
        assert reference.decode(ids) == s


def test_str_and_utf8_bytes_encode_alike(world):
    for s in VARIED[:300]:
        assert world.encode(s.encode("utf-8")) == world.encode(s)


@settings(max_examples=300, derandomize=True, deadline=1000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_hypothesis_text_agrees_with_pyrwkv_tokenizer(world, reference, text):
    assert world.encode(text) == reference.encode(text)


# -- 2. spec check values and vocabulary facts -------------------------------------------

@pytest.mark.parametrize(
    "text, ids",
    [("\n\n", [261]), (" ", [33]), ("<s>", [61, 116, 63]), ("\n", [11]),
     (SPEC_LONG_TEXT, SPEC_LONG_IDS)],
)
def test_spec_check_values(world, text, ids):
    assert world.encode(text) == ids
    assert world.decode(ids) == text


def test_bundled_vocabulary_is_the_published_file():
    assert hashlib.md5(BUNDLED_VOCAB.read_bytes()).hexdigest() == SPEC_VOCAB_MD5


def test_world_vocabulary_facts(world):
    assert world.vocab_size == len(world) == 65536
    assert world.eot_token_id == 261
    assert world.end_of_text_id == Tokenizer.end_of_text_id == 0
    for byte in range(256):  # spec 4.1: id = byte value + 1
        assert world.encode(bytes([byte])) == [byte + 1]
        assert world.token_bytes(byte + 1) == bytes([byte])
    assert world.token_bytes(261) == b"\n\n"
    assert world.token_bytes(0) == b""  # end-of-text is not text
    assert world.token_bytes(65535) == b""  # padding
    assert world.decode([0, 61, 116, 63, 0]) == "<s>"


def test_explicit_vocab_path_matches_bundled(world):
    other = Tokenizer.from_vocab_file(BUNDLED_VOCAB)
    assert other.encode(SPEC_LONG_TEXT) == SPEC_LONG_IDS
    assert other.token_bytes(65529) == world.token_bytes(65529)


# -- 3. the truncated GGUF token list ----------------------------------------------------

def naive_longest_prefix_encode(data: bytes, id_by_bytes: dict[bytes, int]) -> list[int]:
    """Obviously correct and O(n * maxlen): try every length, longest first."""
    longest = max(map(len, id_by_bytes))
    ids, pos = [], 0
    while pos < len(data):
        for length in range(min(longest, len(data) - pos), 0, -1):
            token_id = id_by_bytes.get(data[pos : pos + length])
            if token_id is not None:
                ids.append(token_id)
                pos += length
                break
        else:
            raise AssertionError(f"no token at {pos}")
    return ids


@pytest.fixture(scope="module")
def gguf_token_list():
    if not GGUF_WITH_TRUNCATED_VOCAB.is_file():
        pytest.skip(f"oracle not found at {GGUF_WITH_TRUNCATED_VOCAB} (set RWKV_MLX_ORACLE)")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(GGUF_WITH_TRUNCATED_VOCAB)
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    types_field = reader.fields["tokenizer.ggml.token_type"]
    eot_field = reader.fields["tokenizer.ggml.eot_token_id"]
    tokens = [bytes(tokens_field.parts[i]).decode() for i in tokens_field.data]
    types = [int(types_field.parts[i][0]) for i in types_field.data]
    eot = int(eot_field.parts[eot_field.data[0]][0])
    return tokens, types, eot


def test_gguf_token_list_is_what_the_test_assumes(gguf_token_list):
    tokens, types, eot = gguf_token_list
    assert len(tokens) == 4096 and eot == 261
    assert tokens[0] == "<s>" and types[0] == 3  # CONTROL, so the exclusion is exercised
    assert tokens[11] == "\\n" and tokens[261] == "\\n\\n"


def test_gguf_tokenizer_matches_naive_reference_on_truncated_vocab(gguf_token_list):
    tokens, types, eot = gguf_token_list
    tokenizer = Tokenizer.from_gguf(tokens, types, eot)
    assert tokenizer.vocab_size == len(tokenizer) == 4096
    assert tokenizer.eot_token_id == 261
    truncated = {tok: i for i, tok in load_world_vocab(BUNDLED_VOCAB).items() if i < 4096}
    strings = VARIED[:150] + varied_strings(400, seed=7)[-250:]
    for s in strings:
        data = s.encode("utf-8")
        assert tokenizer.encode(s) == naive_longest_prefix_encode(data, truncated), s
    assert tokenizer.encode("<s>") == [61, 116, 63]  # llama.cpp would say [0]
    assert tokenizer.token_bytes(0) == b""


def test_gguf_unused_and_control_entries_never_match():
    tokens = ["<s>", "[", "P", "A", "D", "]", "7", "<", "s", ">", "[PAD7]", "<s>"]
    types = [3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 3]
    tokenizer = Tokenizer.from_gguf(tokens, types, None)
    assert tokenizer.encode("[PAD7]") == [1, 2, 3, 4, 6, 5]
    assert tokenizer.encode("<s>") == [7, 8, 9]
    assert tokenizer.eot_token_id is None
    # Without types only id 0 is excluded.
    assert Tokenizer.from_gguf(tokens, None).encode("[PAD7]<s>") == [10, 11]


def test_gguf_escaped_tokens_are_unescaped():
    tokens = ["<s>", "a", "\\n", "\\xe4\\xb8\\xad", "\\\\", "\\t\\t", "it's"]
    tokenizer = Tokenizer.from_gguf(tokens, [3, 1, 1, 1, 1, 1, 1], 2)
    assert tokenizer.encode("中\n\\\t\ta") == [3, 2, 4, 5, 1]
    assert tokenizer.decode([6]) == "it's"


@pytest.mark.parametrize("regex_after", [1 << 62, 0], ids=["walk", "regex"])
def test_missing_byte_in_truncated_vocab_is_a_clear_error(regex_after):
    tokenizer = Tokenizer({1: b"a", 2: b"b", 3: b"xy"}, 4, None)
    tokenizer.regex_after_bytes = regex_after
    assert tokenizer.encode("abxyab") == [1, 2, 3, 1, 2]
    with pytest.raises(InvalidArgumentError, match=r"0x78 at byte offset 2"):
        tokenizer.encode("abxb")
    empty = Tokenizer({}, 1, None)
    empty.regex_after_bytes = regex_after
    with pytest.raises(InvalidArgumentError, match=r"0x63 at byte offset 0"):
        empty.encode("c")
    assert isinstance(InvalidArgumentError("x"), RwkvMlxError)


# -- 4. streaming ------------------------------------------------------------------------

def _longest_valid_prefix(data: bytes) -> str:
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"{data!r} is not valid UTF-8 up to its last 3 bytes")


def test_stream_decoder_on_valid_text_never_emits_replacement(world):
    rng = random.Random(11)
    multibyte = [s for s in VARIED if len(s.encode("utf-8")) != len(s)]
    held_back = 0
    for s in rng.sample(multibyte, 400) + EMOJI + CJK:
        ids = world.encode(s)
        decoder = world.stream_decoder()
        emitted, seen = "", b""
        for token_id in ids:
            part = decoder.add(token_id)
            seen += world.token_bytes(token_id)
            assert "\ufffd" not in part
            emitted += part
            # Everything that is complete is out; only an unfinished character waits.
            assert emitted == _longest_valid_prefix(seen)
            held_back += emitted != seen.decode("utf-8", "replace")
        emitted += decoder.flush()
        assert emitted == world.decode(ids) == s
    assert held_back > 50  # tokens that split characters were really exercised


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize(
    "data, parts",
    [
        (b"\xe4\xb8a", ["", "", "\ufffda", ""]),  # truncated 3-byte char, then ASCII
        (b"\xe4\xb8\xad", ["", "", "中", ""]),
        (b"\xff", ["\ufffd", ""]),  # never a lead byte
        (b"\xe0\x80", ["", "\ufffd\ufffd", ""]),  # E0 needs A0..BF next: overlong
        (b"\xed\xa0\x80", ["", "\ufffd\ufffd", "\ufffd", ""]),  # surrogate
        (b"\xf4\x90", ["", "\ufffd\ufffd", ""]),  # beyond U+10FFFF
        (b"\xc0\xaf", ["\ufffd", "\ufffd", ""]),  # C0 can never start a character
        (b"\x80\x80\x80\x80", ["\ufffd"] * 4 + [""]),  # stray continuation bytes
        (b"\xf0\x9f\x98", ["", "", "", "\ufffd"]),  # incomplete at the end: flush emits it
        (b"\xe4\xf0\x9f\x98\x80", ["", "\ufffd", "", "", "😀", ""]),
    ],
)
def test_stream_decoder_byte_by_byte(world, data, parts):
    ids = [byte + 1 for byte in data]  # spec 4.1: single-byte tokens
    assert _stream(world, ids) == parts
    assert "".join(parts) == data.decode("utf-8", "replace") == world.decode(ids)


def test_stream_decoder_on_invalid_bytes_terminates_and_equals_decode(world):
    rng = random.Random(5)
    pool = list(range(0x80, 0x100)) * 3 + [0xE4, 0xB8, 0xAD, 0xF0, 0x9F, 0x98, 0x80] * 20 + list(b"ab \n")
    for n in range(400):
        data = bytes(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        ids = world.encode(data) if n % 2 else [byte + 1 for byte in data]
        decoder = world.stream_decoder()
        emitted, seen = "", b""
        for token_id in ids:
            emitted += decoder.add(token_id)
            seen += world.token_bytes(token_id)
            # at most an unfinished character (3 bytes) is ever held back
            assert any(emitted == seen[:cut].decode("utf-8", "replace")
                       for cut in range(max(len(seen) - 3, 0), len(seen) + 1))
        emitted += decoder.flush()
        assert emitted == world.decode(ids) == data.decode("utf-8", "replace")
        assert decoder.flush() == ""


def test_stream_decoder_skips_end_of_text(world):
    assert _stream(world, [0, 261, 0]) == ["", "\n\n", "", ""]


# -- 5. robustness -----------------------------------------------------------------------

@settings(max_examples=300, derandomize=True, deadline=1000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_random_bytes_round_trip(world, data):
    ids = world.encode(data)
    assert world.decode_bytes(ids) == data
    assert world.decode(ids) == data.decode("utf-8", "replace")


def test_nul_and_empty_input(world, reference):
    for text in ["\x00", "a\x00b", "\x00" * 100, "中\x00文", "\x00\n\n\x00"]:
        ids = world.encode(text)
        assert ids == reference.encode(text)
        assert world.decode(ids) == text
    assert world.encode("") == world.encode(b"") == []
    assert world.decode([]) == "" and world.decode_bytes([]) == b""
    assert "".join(_stream(world, [])) == ""


def test_surrogates_in_str_never_raise(world):
    # Lone surrogates: their "surrogatepass" bytes (documented in the module).
    for text, expected in [("a\udc80b", b"a\xed\xb2\x80b"), ("\ud800", b"\xed\xa0\x80"),
                           ("\udfff\ud800", b"\xed\xbf\xbf\xed\xa0\x80")]:
        assert world.decode_bytes(world.encode(text)) == expected
    # A surrogate *pair* in a str stands for one character and encodes as that character.
    assert world.encode("x\ud83d\ude00y") == world.encode("x😀y")


def test_encode_accepts_bytes_like(world):
    assert world.encode(bytearray(b"hi\n\n")) == world.encode(memoryview(b"hi\n\n")) == world.encode("hi\n\n")


def test_bad_arguments_raise_invalid_argument(world):
    for bad in [-1, 65536, 10 ** 9]:
        with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
            world.token_bytes(bad)
        with pytest.raises(InvalidArgumentError):
            world.decode([1, bad])
    for bad in [1.5, True, "1"]:
        with pytest.raises(InvalidArgumentError, match="must be an integer"):
            world.decode([bad])
    with pytest.raises(InvalidArgumentError):
        world.encode(123)
    with pytest.raises(InvalidArgumentError):
        Tokenizer({0: b"<s>"}, 10)
    with pytest.raises(InvalidArgumentError):
        Tokenizer({10: b"a"}, 10, None)
    with pytest.raises(InvalidArgumentError):
        Tokenizer({1: b"a"}, 10, eot_token_id=10)
    with pytest.raises(InvalidArgumentError):
        Tokenizer.from_gguf(["<s>", "a"], [3], None)


def test_numpy_integers_are_accepted(world):
    ids = np.array(world.encode(SPEC_LONG_TEXT), dtype=np.int64)
    assert world.decode(ids) == world.decode(ids.astype(np.uint32)) == SPEC_LONG_TEXT
    tokenizer = Tokenizer({np.int32(1): b"a"}, np.int64(3), eot_token_id=np.uint32(2))
    assert tokenizer.encode("a") == [1] and tokenizer.eot_token_id == 2


@pytest.mark.parametrize("regex_after", [1 << 62, 0], ids=["walk", "regex"])
def test_deeply_nested_vocabulary_matches_naive_reference(regex_after):
    # 600 tokens each a prefix of the next: deeper than the regex parser can nest.
    vocab = {bytes([b]): b + 1 for b in range(256)}
    for length in range(2, 601):
        vocab[b"a" * length] = 255 + length
    vocab[b"a" * 300 + b"b"] = 1000
    tokenizer = Tokenizer({i: tok for tok, i in vocab.items()}, 1001, None)
    tokenizer.regex_after_bytes = regex_after
    rng = random.Random(3)
    for _ in range(20):
        runs = [b"a" * rng.randint(0, 900) for _ in range(rng.randint(1, 5))]
        data = rng.choice([b"b", b"ab", b"x"]).join(runs) or b"b"
        assert tokenizer.encode(data) == naive_longest_prefix_encode(data, vocab)
    data = b"a" * 300 + b"b" + b"a" * 1300
    assert tokenizer.encode(data) == naive_longest_prefix_encode(data, vocab)


def test_duplicate_token_bytes_encode_to_the_lowest_id():
    assert Tokenizer({5: b"a", 2: b"a", 3: b"b"}, 6, None).encode("ab") == [2, 3]


def test_normalisation_is_not_applied(world, reference):
    composed = "café"
    decomposed = unicodedata.normalize("NFD", composed)
    assert world.encode(decomposed) != world.encode(composed)
    assert world.encode(decomposed) == reference.encode(decomposed)


def test_the_regex_matcher_takes_over_after_regex_after_bytes(reference):
    tokenizer = Tokenizer.from_vocab_file()
    tokenizer.regex_after_bytes = 2000
    text = " ".join(VARIED)[:1500]
    assert tokenizer.encode(text) == reference.encode(text) and tokenizer._matcher is None  # walked
    assert tokenizer.encode(text) == reference.encode(text) and tokenizer._matcher is not None  # 3000 > 2000
