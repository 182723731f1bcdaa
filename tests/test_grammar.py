"""Structured output (rwkv_mlx.text.grammar): GBNF, JSON schemas, the byte matcher, the vocabulary mask,
and constrained generation with the bundled demo model (its full 65,536-token world vocabulary).

Independent checks: ``json.loads`` and ``jsonschema`` for schema output, ``lark`` (an Earley parser)
on hand-written equivalent grammars (tests/grammars/*.lark) for GBNF output, and a brute-force
per-token check of the trie-walk masks.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from pathlib import Path

import jsonschema
import lark
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwkv_mlx
from rwkv_mlx import InvalidArgumentError, SamplingParams
from rwkv_mlx import DEMO_MODEL
from rwkv_mlx.text.grammar import (GrammarConstraint, GrammarError, compile_constraint, parse_gbnf,
                              processor_for_response_format, sampling_fields_for_response_format, schema_to_gbnf)
from rwkv_mlx.text.grammar.bytegrammar import lower, utf8_sequences
from rwkv_mlx.text.grammar.matcher import Automaton, Matcher, matches
from rwkv_mlx.text.grammar.vocab import vocab_trie
from rwkv_mlx.text.tokenizer import Tokenizer

GRAMMARS = Path(__file__).parent / "grammars"
GBNF_NAMES = ["json", "arithmetic", "list", "chess"]


@pytest.fixture(scope="module")
def demo():
    return rwkv_mlx.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_vocab_file()


def gbnf(name: str) -> str:
    return (GRAMMARS / f"{name}.gbnf").read_text()


@pytest.fixture(scope="module")
def lark_parsers():
    return {n: lark.Lark((GRAMMARS / f"{n}.lark").read_text(), parser="earley", lexer="dynamic")
            for n in GBNF_NAMES}


def lark_accepts(parser, text: str) -> bool:
    try:
        parser.parse(text)
        return True
    except lark.exceptions.LarkError:
        return False


def automaton(text: str) -> Automaton:
    return Automaton(lower(parse_gbnf(text)))


# ---------------------------------------------------------------------------------------------
# GBNF and the byte matcher


def test_utf8_sequences_cover_exactly_the_valid_encodings():
    for lo, hi in [(0, 0x10FFFF), (0x7F, 0x800), (0xD000, 0xE100), (0x10000, 0x10FFFF), (0xE9, 0xE9)]:
        seqs = utf8_sequences(lo, hi)
        rng = random.Random(lo)
        for cp in [lo, hi, *(rng.randint(lo, hi) for _ in range(300))]:
            if 0xD800 <= cp <= 0xDFFF:
                continue
            enc = chr(cp).encode()
            hits = [s for s in seqs if len(s) == len(enc) and all(a <= b <= c for (a, c), b in zip(s, enc))]
            assert len(hits) == 1, (hex(cp), hits)
        # nothing outside the range, and no surrogate, is encoded
        for s in seqs:
            lo_b, hi_b = bytes(a for a, _ in s), bytes(b for _, b in s)
            assert lo <= ord(lo_b.decode()) and ord(hi_b.decode()) <= hi


@pytest.mark.parametrize("name", GBNF_NAMES)
def test_gbnf_grammars_agree_with_lark_on_examples(name, lark_parsers):
    examples = {
        "json": ['{"a": [1, -2.5e3, "x\\u00e9\\n", true, null], "b": {}}', '[]', ' "caf\u00e9 \u65e5\u672c" ',
                 '{"a" 1}', '[1,]', '01', '"\x01"', '{"k": tru}', '[1, 2]\n'],
        "arithmetic": ["1+2=3\n", "(a + b)*c= 4\nx=y\n", "1+=3\n", "a=b", "a_1 = (2)\n"],
        "list": ["- milk\n- eggs\n", "- \u00e9t\u00e9\n", "-milk\n", "- a\n- b\n- c\n- d\n- e\n- f\n", "- \n"],
        "chess": ["1. e4 e5\n2. Nf3 Nc6\n", "1. O-O-O Qxd8#\n", "1. e9 e5\n", "1. exd8=Q Kxe2+\n", "1. e4\n"],
    }[name]
    a, parser = automaton(gbnf(name)), lark_parsers[name]
    verdicts = [matches(a, e.encode()) for e in examples]
    assert verdicts == [lark_accepts(parser, e) for e in examples]
    assert any(verdicts) and not all(verdicts)


def random_walk(a: Automaton, rng: random.Random, max_bytes: int = 400) -> bytes | None:
    """A random string of the grammar, byte by byte through the matcher (None if it ran too long)."""
    m, out = Matcher(a), bytearray()
    for _ in range(max_bytes):
        if m.is_complete and rng.random() < 0.25:
            return bytes(out)
        a.fill_row(m.state)
        allowed = np.nonzero(a.table[m.state] > 0)[0].tolist()
        if not allowed:
            return bytes(out) if m.is_complete else None
        b = rng.choice(allowed)
        m.feed(bytes([b]))
        out.append(b)
    return None


@pytest.mark.parametrize("name", GBNF_NAMES)
def test_random_strings_of_gbnf_grammars_parse_with_lark(name, lark_parsers):
    a, parser = automaton(gbnf(name)), lark_parsers[name]
    rng = random.Random(17)
    done = 0
    for _ in range(30):
        s = random_walk(a, rng)
        if s is None:
            continue
        text = s.decode("utf-8")  # every string the byte matcher completes is valid UTF-8
        assert lark_accepts(parser, text), text
        if name == "json":
            json.loads(text)
        done += 1
    assert done >= 15


@pytest.mark.parametrize("text, message", [
    ('root ::= root "a" | "b"', "left-recursive"),
    ('root ::= x\nx ::= y "a" | "c"\ny ::= "b"? x', "left-recursive"),
    ('root ::= ("a"*)*', "left-recursive"),
    ('root ::= "a" root', "never finish"),
    ('root ::= "a', "unterminated string"),
    ('root ::= [a-', "unterminated character class"),
    ('root ::= foo', "undefined rule 'foo'"),
    ('root ::= "a"{3,2}', "maximum below its minimum"),
    ('root ::= "a"{20000}', "larger than 10000"),
    ("".join(f'r{i} ::= "a"{{10000}}\n' for i in range(60)) + "root ::= r0", "too large"),
    ('x ::= "a"', "no 'root' rule"),
    ('root ::= "a" )', r"unmatched '\)'"),
    ('root ::= "\\q"', "unknown escape"),
    ("", "empty"),
    ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "nests groups too deeply"),
])
def test_bad_grammars_are_refused_with_a_clear_error(text, message):
    tic = time.perf_counter()
    with pytest.raises(GrammarError, match=message):
        compile_constraint(grammar=text)
    assert time.perf_counter() - tic < 5


def test_long_rule_chains_and_runs_of_optional_items_compile():
    """Expanding them without reading a byte goes thousands of rules deep: no Python recursion limit."""
    chain = "".join(f'r{i} ::= r{i + 1}\n' for i in range(3000)) + 'r3000 ::= "a"\nroot ::= r0 "b"\n'
    assert matches(automaton(chain), b"ab")
    optional = automaton("root ::= " + '"a"? ' * 3000 + '"b"')
    assert matches(optional, b"aab") and matches(optional, b"b") and not matches(optional, b"")


def test_grammar_syntax_llama_cpp_features():
    g = r'''
root ::= greeting (", " name)? "!" # a comment
greeting ::= ("hello" | "hi") | [Hh] "ey"
name ::= [A-Z] [a-z]{1,8} | "\x41\u00e9\U0001F600" | [^a-z!,\n]+
'''
    a = automaton(g)
    for s, ok in [("hello!", True), ("hi, Bob!", True), ("Hey, A\u00e9\U0001F600!", True), ("hey, \u65e5\u672c!", True),
                  ("hey, bob!", False), ("hello", False), ("hi, B!", True)]:
        assert matches(a, s.encode()) == ok, s


# ---------------------------------------------------------------------------------------------
# the vocabulary mask


def test_trie_masks_equal_a_brute_force_check_of_every_token(tokenizer):
    """The numpy trie walk allows exactly the tokens whose bytes keep the matcher alive."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}
    a = compile_constraint(json_schema=schema)
    trie = vocab_trie(tokenizer, tokenizer.vocab_size)
    token_bytes = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    for prefix in [b"", b'{"name": "J', b'{"name": "Jo\xc3', b'{"name":"x","n":12']:
        m = Matcher(a)
        m.feed(prefix)
        mask = trie.mask(a, m.state)
        brute = np.array([bool(tb) and m.accepts(tb) for tb in token_bytes])
        brute[tokenizer.end_of_text_id] = m.is_complete
        assert (mask == brute).all(), prefix
        assert mask.sum() > 0


# ---------------------------------------------------------------------------------------------
# JSON schemas

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["love", "death", "king", 3, None]}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["city", "zip"]},
        "alive": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "home"],
}
SCHEMAS = [
    NESTED,
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 250}, "minItems": 2, "maxItems": 4},
    {"enum": ["red", "green", "blue", 42, {"a": [1, 2]}]},
    {"anyOf": [{"type": "number"}, {"type": "object", "properties": {"x": {"const": "y"}}, "required": ["x"]}]},
    {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v", "kids"]}},
     "$ref": "#/$defs/node"},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-\\d{1,3}$"},
                                      "ok": {"type": ["boolean", "null"]}}, "required": ["id", "ok"],
     "additionalProperties": False},
]


@pytest.mark.slow
def test_demo_model_under_schemas_always_produces_valid_json(demo):
    """Many (schema, seed) rows in one batch; every row that ends is a JSON document the schema accepts,
    and a row cut by max_tokens is reported as "length"."""
    model, tokenizer = demo
    rows = [(s, seed) for s in SCHEMAS for seed in range(2)]
    # top_p 1 skips the 65,536-entry sort, the costliest part of a CPU step here
    samplings = [SamplingParams(seed=seed, top_p=1.0, json_schema=s) for s, seed in rows]
    texts, finish = [""] * len(rows), [None] * len(rows)
    for r in rwkv_mlx.stream_batch_generate(model, tokenizer, ["ROMEO:"] * len(rows), samplings=samplings,
                                            max_tokens=96):
        texts[r.row] += r.text
        finish[r.row] = r.finish_reason or finish[r.row]
    ended = 0
    for (schema, seed), text, why in zip(rows, texts, finish):
        assert why in ("eot", "length")
        a = compile_constraint(json_schema=schema)
        if why == "eot":
            jsonschema.validate(json.loads(text), schema)
            assert matches(a, text.encode())
            ended += 1
        else:  # no claim of validity, but every byte emitted keeps the output viable
            assert Matcher(a).accepts(text.encode())
    assert ended >= len(rows) // 2, finish


def test_constraint_composes_with_penalties_top_k_bans_and_chat(demo):
    model, tokenizer = demo
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer"}},
              "required": ["answer", "n"]}
    for params in [SamplingParams.chat(seed=3, json_schema=schema),  # chat bans end-of-text: still ends
                   SamplingParams(seed=4, top_k=5, presence_penalty=2.0, frequency_penalty=1.0, json_schema=schema,
                                  banned_tokens=(0, 11)),
                   SamplingParams.greedy(json_schema=schema)]:
        pieces = list(rwkv_mlx.stream_generate(model, tokenizer, "User: yes or no?\n\nAssistant:", max_tokens=120,
                                               sampling=params))
        text = "".join(p.text for p in pieces)
        assert pieces[-1].finish_reason == "eot", text
        jsonschema.validate(json.loads(text), schema)


def test_max_tokens_cuts_an_incomplete_output_with_finish_reason_length(demo):
    model, tokenizer = demo
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 5}
    pieces = list(rwkv_mlx.stream_generate(model, tokenizer, "ROMEO:", max_tokens=6,
                                           sampling=SamplingParams(seed=0, json_schema=schema)))
    text = "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(text)
    assert text.startswith("[") and Matcher(compile_constraint(json_schema=schema)).accepts(text.encode())


def test_batch_rows_each_follow_their_own_constraint(demo):
    model, tokenizer = demo
    samplings = [SamplingParams(seed=1, grammar='root ::= ("yes" | "no") "!"'),
                 SamplingParams(seed=2, json_schema={"enum": [1, 2, 3]}),
                 SamplingParams(seed=5),
                 SamplingParams.greedy(grammar=gbnf("chess"))]
    out = rwkv_mlx.batch_generate(model, tokenizer, ["ROMEO:", "JULIET:", "ROMEO:", "1."], samplings=samplings,
                                  max_tokens=[20, 20, 8, 60])
    assert out[0] in ("yes!", "no!") and json.loads(out[1]) in (1, 2, 3)
    assert out[2] == rwkv_mlx.generate(model, tokenizer, "ROMEO:", max_tokens=8, sampling=SamplingParams(seed=5))
    chess = lark.Lark((GRAMMARS / "chess.lark").read_text(), parser="earley", lexer="dynamic")
    assert lark_accepts(chess, out[3]), out[3]


@pytest.mark.slow
def test_demo_model_under_gbnf_grammars_matches_lark(demo, lark_parsers):
    """Every grammar twice in one batch; each output that ends parses with the independent Lark grammar."""
    model, tokenizer = demo
    rows = [(name, seed) for name in GBNF_NAMES for seed in range(2)]
    samplings = [SamplingParams(seed=seed, top_p=1.0, grammar=gbnf(name)) for name, seed in rows]
    texts, finish = [""] * len(rows), [None] * len(rows)
    for r in rwkv_mlx.stream_batch_generate(model, tokenizer, ["ROMEO:"] * len(rows), samplings=samplings,
                                            max_tokens=64):
        texts[r.row] += r.text
        finish[r.row] = r.finish_reason or finish[r.row]
    for (name, _), text, why in zip(rows, texts, finish):
        if why == "eot":
            assert lark_accepts(lark_parsers[name], text), (name, text)
    assert finish.count("eot") >= len(rows) // 2, list(zip(rows, finish))


# a property test over random schemas: every prefix of the output is viable, every end is valid

_SCALARS = st.one_of(st.integers(-1000, 1000), st.sampled_from(["a", "b c", "\u00e9t\u00e9", "\"q\"", ""]),
                     st.booleans(), st.none())
_LEAVES = st.one_of(
    st.sampled_from([{"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(_SCALARS, min_size=1, max_size=5).map(lambda v: {"enum": v}),
    _SCALARS.map(lambda v: {"const": v}),
)


def _objects(children):
    return st.dictionaries(st.sampled_from(["a", "b", "key", "\u00fcber", "x y"]), children, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props) or ["a"]), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": [r for r in req if r in props],
                         "additionalProperties": False}))


SCHEMA_TREES = st.recursive(_LEAVES, lambda children: st.one_of(
    st.tuples(children, st.integers(0, 3)).map(lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}),
    _objects(children),
    st.lists(children, min_size=1, max_size=3).map(lambda alts: {"anyOf": alts}),
), max_leaves=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMA_TREES, seed=st.integers(0, 2**32 - 1))
def test_every_prefix_of_constrained_output_stays_viable(schema, seed, tokenizer):
    """Random schema, random logits: sample tokens through the constraint's masks; each token's bytes
    keep a fresh byte-level matcher alive, and the finished text validates with jsonschema."""
    V = tokenizer.vocab_size
    c = GrammarConstraint(compile_constraint(json_schema=schema), tokenizer, V)
    check = Matcher(compile_constraint(json_schema=schema))
    rng = np.random.default_rng(seed)
    out = b""
    for _ in range(1000):
        allowed = np.nonzero(np.asarray(c.state[0])[0])[0]
        assert allowed.size
        t = int(rng.choice(allowed))
        if t == tokenizer.end_of_text_id:
            break
        data = tokenizer.token_bytes(t)
        assert check.accepts(data), (out, data)
        check.feed(data)
        out += data
        c.advance([t])
    else:
        pytest.fail(f"no end after 1000 tokens: {out[:200]!r}")
    assert check.is_complete
    jsonschema.validate(json.loads(out.decode("utf-8")), schema)


def test_schema_features_accept_and_refuse_the_right_documents():
    cases = [
        (NESTED, '{"name":"x","age":-3,"tags":[],"home":{"city":"a","zip":"12345"}}', True),
        (NESTED, '{"name":"x","age":1.5,"tags":[],"home":{"city":"a","zip":"12345"}}', False),
        (NESTED, '{"name":"x","age":1,"tags":["queen"],"home":{"city":"a","zip":"12345"}}', False),
        (NESTED, '{"name":"x","age":1,"tags":[],"home":{"city":"a","zip":"1234"}}', False),
        (NESTED, '{"age":1,"tags":[],"home":{"city":"a","zip":"12345"}}', False),
        ({"type": "string", "pattern": "ab+c"}, '"xxabbbcyy"', True),  # unanchored: searched, as JSON Schema says
        ({"type": "string", "pattern": "^ab+c$"}, '"xabc"', False),
        ({"type": "string", "pattern": "^a\"b\\\\$"}, '"a\\"b\\\\"', True),
        ({"type": "string", "minLength": 2, "maxLength": 3}, '"\u00e9\u00e9\u00e9"', True),
        ({"type": "string", "minLength": 2, "maxLength": 3}, '"abcd"', False),
        ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": 1, "b": 2}', True),
        ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"a": "1"}', False),
        ({"type": "object", "properties": {"a": {}}, "additionalProperties": False}, '{}', True),
        ({"type": ["integer", "string"]}, '"x"', True),
        ({"type": ["integer", "string"]}, "true", False),
        ({"oneOf": [{"type": "null"}, {"type": "boolean"}]}, "false", True),
        ({"type": "array", "items": {"const": 1}, "minItems": 2}, "[1]", False),
        ({}, '[{"deep": [null, 1e5, "x"]}]', True),
    ]
    for schema, doc, ok in cases:
        a = compile_constraint(json_schema=schema)
        assert matches(a, doc.encode()) == ok, (schema, doc)
        if ok:
            jsonschema.validate(json.loads(doc), schema)


@pytest.mark.parametrize("lo, hi", [(0, 0), (5, 123), (-40, 17), (-1000, -3), (None, 7), (13, None), (None, -250),
                                    (-7, None), (0, 10**20), (1, 99999)])
def test_integer_ranges_are_exact(lo, hi):
    """Checked against the bounds themselves for every integer near the edges and a random sample."""
    schema = {"type": "integer", **({"minimum": lo} if lo is not None else {}),
              **({"maximum": hi} if hi is not None else {})}
    a = compile_constraint(json_schema=schema)
    rng = random.Random(0)
    values = set(range(-1100, 1100)) | {rng.randint(-10**17, 10**17) for _ in range(200)} | {10**16 - 1, -10**15}
    for v in values:
        inside = (lo is None or v >= lo) and (hi is None or v <= hi) and abs(v) < 10**16  # 16 digits at most
        assert matches(a, str(v).encode()) == inside, v
    assert not matches(a, b"-0") and not matches(a, b"007")
    if lo is not None and (hi is None or hi > lo):  # an exclusive bound below lo changes nothing; at lo excludes it
        assert matches(compile_constraint(json_schema={**schema, "exclusiveMinimum": lo - 0.5}), str(lo).encode())
        assert not matches(compile_constraint(json_schema={**schema, "exclusiveMinimum": lo}), str(lo).encode())


HOSTILE = [
    ({"$ref": "#"}, "never finish"),
    ({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, "left-recursive"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "never finish"),
    ({"enum": list(range(20_000))}, "limit is 10000"),
    ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
    ({"type": "string", "pattern": "a(?=b)"}, "lookahead"),
    ({"type": "string", "pattern": "(?<!x)a"}, "lookahead/lookbehind"),
    ({"type": "string", "pattern": "a{100000}"}, "above 10000"),
    ({"type": "string", "pattern": "(?i)abc"}, "not supported"),
    ({"type": "string", "pattern": "a\\bb"}, "word boundary"),
    ({"type": "string", "pattern": "(("}, "not a valid regular expression"),
    ({"type": "array", "maxItems": 10**9}, "above the supported"),
    ({"type": "integer", "multipleOf": 3}, "'multipleOf' is not supported"),
    ({"type": "number", "maximum": 5}, "bounds on a number"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer of at most 16 digits"),
    ({"type": "integer", "minimum": 1e20}, "no integer of at most 16 digits"),
    ({"type": "integer", "maximum": float("inf")}, "must be a number"),
    ({"enum": ["a", "bb"], "maxLength": 1}, "enum/const next to 'maxLength'"),
    ({"$ref": "http://example.com/s.json"}, "not supported"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    (False, "no value can satisfy"),
    (json.loads('{"items":' * 100 + "{}" + "}" * 100), "nests deeper"),
]


@pytest.mark.parametrize("schema, message", HOSTILE, ids=[m for _, m in HOSTILE])
def test_hostile_schemas_are_refused_within_bounds(schema, message):
    tracemalloc.start()
    tic = time.perf_counter()
    try:
        with pytest.raises(GrammarError, match=message) as info:
            compile_constraint(json_schema=schema)
        assert isinstance(info.value, InvalidArgumentError) and info.value.exit_code == 2
    finally:
        seconds = time.perf_counter() - tic
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < 5 and peak < 200e6, (seconds, peak)


def test_huge_but_legal_enum_stays_one_parse_per_state(tokenizer):
    """10,000 values sharing prefixes compile to a prefix trie: after a prefix the matcher holds one parse
    per possible next character (10 digits here), not one per value still possible (1,000)."""
    values = [f"item-{i:05d}" for i in range(10_000)]
    a = compile_constraint(json_schema={"enum": values})
    m = Matcher(a)
    m.feed(b'"item-0')
    assert len(a.stacks[m.state]) == 10
    assert matches(a, b'"item-09999"') and not matches(a, b'"item-10000"')


def test_state_table_reset_keeps_matchers_going(tokenizer, monkeypatch):
    """Past MAX_STATES the table is cleared; matchers re-intern their parses and carry on correctly."""
    import rwkv_mlx.text.grammar.matcher as matcher_module

    monkeypatch.setattr(matcher_module, "MAX_STATES", 30)
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 40}}, "required": ["s"]}
    a = Automaton(lower(parse_gbnf(schema_to_gbnf(schema))))
    c = GrammarConstraint(a, tokenizer, tokenizer.vocab_size)
    rng, out = np.random.default_rng(0), b""
    for _ in range(300):
        t = int(rng.choice(np.nonzero(np.asarray(c.state[0])[0])[0]))
        if t == tokenizer.end_of_text_id:
            break
        out += tokenizer.token_bytes(t)
        c.advance([t])
    assert a.generation > 2
    jsonschema.validate(json.loads(out), schema)


# ---------------------------------------------------------------------------------------------
# API surfaces


def test_sampling_params_validation():
    with pytest.raises(InvalidArgumentError, match="not both"):
        SamplingParams(json_schema={}, grammar="root ::= \"a\"").validate()
    with pytest.raises(InvalidArgumentError, match="json_schema must be"):
        SamplingParams(json_schema=3).validate()
    assert hash(SamplingParams(json_schema={"type": "object"}))  # a dict field does not break hashing
    assert SamplingParams(json_schema={"a": 1}) == SamplingParams(json_schema={"a": 1})


def test_response_format_entry_points(tokenizer):
    assert sampling_fields_for_response_format(None) == {}
    assert sampling_fields_for_response_format({"type": "text"}) == {}
    assert sampling_fields_for_response_format({"type": "json_object"}) == {"json_schema": {"type": "object"}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}
    assert sampling_fields_for_response_format(rf) == {"json_schema": schema}
    assert sampling_fields_for_response_format(None, grammar='root ::= "a"') == {"grammar": 'root ::= "a"'}
    for bad, msg in [({"type": "xml"}, "not supported"), ({"type": "json_schema"}, "json_schema.schema"),
                     ("json", "must be an object"), ({"type": "json_schema", "json_schema": {"schema": {"not": {}}}},
                                                     "not supported")]:
        with pytest.raises(GrammarError, match=msg):
            sampling_fields_for_response_format(bad)
    with pytest.raises(GrammarError, match="not both"):
        sampling_fields_for_response_format({"type": "json_object"}, grammar='root ::= "a"')
    assert processor_for_response_format({"type": "text"}, tokenizer) is None
    proc = processor_for_response_format(rf, tokenizer)
    allowed = np.asarray(proc.state[0])[0]
    assert allowed[tokenizer.encode("{")[0]] and not allowed[tokenizer.encode("[")[0]]
    logits = mx.zeros((1, tokenizer.vocab_size))
    assert int(mx.argmax(proc(logits), axis=-1).item()) in np.nonzero(allowed)[0]


def test_schema_to_gbnf_is_readable_gbnf():
    text = schema_to_gbnf({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})
    assert text.startswith("root ::= ") and '"\\"a\\""' in text
    parse_gbnf(text)


def test_cli_json_schema_and_grammar(tmp_path, capsys):
    from rwkv_mlx.cli import run

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer"}},
              "required": ["answer", "n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.gbnf").write_text('root ::= ("yes" | "no") "."\n')
    common = ["generate", "-p", "ROMEO:", "-n", "80", "--seed", "2", "--no-stats", "--device", "cpu"]
    assert run(common + ["--json-schema", str(tmp_path / "s.json")]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    assert run(common + ["--grammar", str(tmp_path / "g.gbnf")]) == 0
    assert capsys.readouterr().out.strip() in ("yes.", "no.")

    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "hostile.json").write_text('{"$ref": "#"}')
    (tmp_path / "left.gbnf").write_text('root ::= root "a" | "b"\n')
    for args, code, msg in [(["--json-schema", str(tmp_path / "missing.json")], 3, "cannot read it"),
                            (["--json-schema", str(tmp_path / "bad.json")], 3, "not valid JSON"),
                            (["--json-schema", str(tmp_path / "hostile.json")], 2, "never finish"),
                            (["--grammar", str(tmp_path / "left.gbnf")], 2, "left-recursive"),
                            (["--grammar", str(tmp_path / "g.gbnf"), "--json-schema", str(tmp_path / "s.json")], 2,
                             "not both")]:
        assert run(common + args) == code
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
