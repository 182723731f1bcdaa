"""JSON Schema -> GBNF, the way llama.cpp's ``json-schema-to-grammar`` does it (a fresh implementation).

Supported: ``type`` (one or a list), ``properties`` / ``required`` /
``additionalProperties``, ``items`` / ``minItems`` / ``maxItems``, strings with
``minLength`` / ``maxLength`` or ``pattern`` (:mod:`.pattern`), ``enum`` and
``const`` of any JSON values, ``anyOf`` / ``oneOf``, a one-element ``allOf``,
``$ref`` to ``#`` or a JSON pointer inside the same document (recursion is
allowed; a recursion that can never finish or never consumes text is refused
when the grammar is checked), integer ranges (``minimum`` / ``maximum`` /
``exclusiveMinimum`` / ``exclusiveMaximum``; on numbers only ``minimum: 0``),
and the annotations (``title``, ``description``,
``format``, ``default``, ...), which constrain nothing.  Any other validation
keyword (``multipleOf``, ``not``, ``if``, ``prefixItems``,
``patternProperties``, ...) is refused with a :class:`GrammarError` rather
than silently ignored, so a grammar never claims more than it enforces.

The grammar is sound, not complete: every output validates, but some valid
documents are out of reach.  Properties come in the order the schema lists
them (optional ones may be left out); when ``properties`` are given, keys not
listed are never generated (even when ``additionalProperties`` allows them);
``oneOf`` is compiled as ``anyOf`` (exact when its branches do not overlap);
numbers have at most 16 integer and 16 fraction digits and a 2-digit exponent;
whitespace is limited to one space or a newline with up to 20 spaces/tabs.
"""

from __future__ import annotations

import json
import math
import re
from urllib.parse import unquote

from .gbnf import MAX_REPEAT, GrammarError
from .pattern import gbnf_literal, pattern_to_gbnf

MAX_ENUM = 10_000  # values in one enum
MAX_ENUM_CHARS = 1_000_000  # their total JSON text
MAX_SCHEMA_NODES = 20_000  # subschemas visited
MAX_SCHEMA_DEPTH = 64  # nesting of subschemas (refs do not count: they become rules)

ANNOTATIONS = frozenset({
    "$schema", "$id", "$comment", "$anchor", "$defs", "definitions", "title", "description", "default",
    "examples", "format", "readOnly", "writeOnly", "deprecated", "contentMediaType", "contentEncoding",
})
VALIDATION = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
    "const", "pattern", "minLength", "maxLength", "anyOf", "oneOf", "allOf", "$ref",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_DIGITS = 16  # integer digits the grammar writes (same as the "integer" and "number" rules)
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# The building blocks, emitted only when used.
PRIMITIVES = {
    "ws": r'| " " | "\n" [ \t]{0,20}',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,15})',
    "number": r'"-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?',
    "boolean": r'"true" | "false"',
    "null": r'"null"',
    "value": r"object | array | string | number | boolean | null",
    "object": r'"{" ws (string ws ":" ws value ws ("," ws string ws ":" ws value ws)*)? "}"',
    "array": r'"[" ws (value ws ("," ws value ws)*)? "]"',
}
_DEPENDS = {"string": ["char"], "value": ["object", "array", "string", "number", "boolean", "null"],
            "object": ["ws", "string", "value"], "array": ["ws", "value"]}


class _Compiler:
    def __init__(self, root_schema):
        self.root = root_schema
        self.rules: dict[str, str] = {}
        self.ref_rules: dict[str, str] = {}
        self.nodes = 0

    # -- rules -------------------------------------------------------------------

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for dep in _DEPENDS.get(name, []):
                self.primitive(dep)
        return name

    def add_rule(self, hint: str, body: str) -> str:
        base = re.sub(r"[^A-Za-z0-9-]+", "-", hint).strip("-") or "document"
        name, i = base, 1
        while name in self.rules or name in PRIMITIVES:
            i += 1
            name = f"{base}-{i}"
        self.rules[name] = body
        return name

    # -- schemas -----------------------------------------------------------------

    def visit(self, schema, path: str, depth: int) -> str:
        """A GBNF expression (usually a rule name) for the values ``schema`` accepts."""
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise GrammarError(f"JSON schema is too large: more than {MAX_SCHEMA_NODES} subschemas")
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels at {path}")
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise GrammarError(f"JSON schema at {path} is false: no value can satisfy it")
        if not isinstance(schema, dict):
            raise GrammarError(f"JSON schema at {path} must be an object or a boolean, got {schema!r}")
        unknown = sorted(k for k in schema if k not in VALIDATION and k not in ANNOTATIONS)
        if unknown:
            raise GrammarError(f"JSON schema at {path}: keyword {unknown[0]!r} is not supported")
        if "$ref" in schema:
            others = sorted(k for k in schema if k in VALIDATION and k != "$ref")
            if others:
                raise GrammarError(f"JSON schema at {path}: $ref next to {others[0]!r} is not supported")
            return self.ref(schema["$ref"], path)
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                return self.combination(schema, key, path, depth)
        if "const" in schema or "enum" in schema:
            rest = sorted(k for k in schema if k in VALIDATION and k not in ("const", "enum", "type"))
            if rest or ("const" in schema and "enum" in schema):
                other = rest[0] if rest else "enum"
                raise GrammarError(f"JSON schema at {path}: enum/const next to {other!r} is not supported")
        if "const" in schema:
            return self.enum([schema["const"]], schema, path)
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise GrammarError(f"JSON schema at {path}: enum must be a non-empty list")
            return self.enum(schema["enum"], schema, path)
        types = schema.get("type")
        if types is None:
            types = self.implied_type(schema)
        if isinstance(types, list):
            if not types or any(t not in TYPES for t in types):
                raise GrammarError(f"JSON schema at {path}: type must be one of {', '.join(TYPES)}, got {types!r}")
            if len(types) > 1:
                alts = [self.typed(t, schema, f"{path}/{t}", depth) for t in dict.fromkeys(types)]
                return self.add_rule(path, " | ".join(alts))
            types = types[0]
        if types not in TYPES and types is not None:
            raise GrammarError(f"JSON schema at {path}: unknown type {types!r}")
        return self.typed(types, schema, path, depth) if types else self.primitive("value")

    @staticmethod
    def implied_type(schema: dict):
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            return "object"
        if any(k in schema for k in ("items", "minItems", "maxItems")):
            return "array"
        if any(k in schema for k in ("pattern", "minLength", "maxLength")):
            return "string"
        return None

    def typed(self, t: str, schema: dict, path: str, depth: int) -> str:
        if t == "object":
            return self.object(schema, path, depth)
        if t == "array":
            return self.array(schema, path, depth)
        if t == "string":
            return self.string(schema, path)
        if t in ("integer", "number") and any(k in schema for k in BOUNDS):
            return self.bounded_number(t, schema, path)
        return self.primitive(t)

    def bounded_number(self, t: str, schema: dict, path: str) -> str:
        """Integers in any [minimum, maximum] range, exactly (digit-range alternatives, as llama.cpp
        does); numbers only with a lower bound of 0 (no minus sign), the common "non-negative"."""
        for k in BOUNDS:
            v = schema.get(k)
            # (a Python int is finite however large; math.isfinite would overflow converting it)
            if k in schema and (isinstance(v, bool) or not isinstance(v, (int, float))
                                or not (isinstance(v, int) or math.isfinite(v))):
                raise GrammarError(f"JSON schema at {path}: {k} must be a number, got {v!r}")
        if t == "number":
            if set(schema) & set(BOUNDS) == {"minimum"} and schema["minimum"] == 0:
                return self.add_rule(f"{path}-number",
                                     '("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?')
            raise GrammarError(f"JSON schema at {path}: bounds on a number are supported only as minimum 0 "
                               "(use type integer for other ranges)")
        lo = hi = None
        if "minimum" in schema:
            lo = math.ceil(schema["minimum"])
        if "exclusiveMinimum" in schema:
            x = math.floor(schema["exclusiveMinimum"]) + 1
            lo = x if lo is None else max(lo, x)
        if "maximum" in schema:
            hi = math.floor(schema["maximum"])
        if "exclusiveMaximum" in schema:
            x = math.ceil(schema["exclusiveMaximum"]) - 1
            hi = x if hi is None else min(hi, x)
        alts = integer_range_gbnf(lo, hi)
        if not alts:
            raise GrammarError(f"JSON schema at {path}: no integer of at most {MAX_DIGITS} digits lies between "
                               "the bounds")
        return self.add_rule(f"{path}-integer", " | ".join(alts))

    def combination(self, schema: dict, key: str, path: str, depth: int) -> str:
        subs = schema[key]
        if not isinstance(subs, list) or not subs:
            raise GrammarError(f"JSON schema at {path}: {key} must be a non-empty list")
        rest = sorted(k for k in schema if k in VALIDATION and k != key)
        if rest:
            raise GrammarError(f"JSON schema at {path}: {key} next to {rest[0]!r} is not supported")
        if key == "allOf":
            if len(subs) != 1:
                raise GrammarError(f"JSON schema at {path}: allOf with more than one schema is not supported")
            return self.visit(subs[0], f"{path}/allOf/0", depth + 1)
        alts = [self.visit(s, f"{path}/{key}/{i}", depth + 1) for i, s in enumerate(subs)]
        return self.add_rule(path, " | ".join(alts))

    def ref(self, ref, path: str) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise GrammarError(f"JSON schema at {path}: $ref {ref!r} is not supported (only '#' and "
                               "'#/...' pointers into the same document)")
        if ref in self.ref_rules:
            return self.ref_rules[ref]
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise GrammarError(f"JSON schema at {path}: $ref {ref!r} points to nothing")
        name = self.add_rule("ref" + ref[1:], "")  # named before the visit so recursion finds it
        self.ref_rules[ref] = name
        self.rules[name] = self.visit(target, ref, 0)
        return name

    def enum(self, values: list, schema: dict, path: str) -> str:
        if len(values) > MAX_ENUM:
            raise GrammarError(f"JSON schema at {path}: enum has {len(values)} values; the limit is {MAX_ENUM}")
        types = schema.get("type")
        if types is not None:
            allowed = set(types if isinstance(types, list) else [types])
            values = [v for v in values if _json_type(v) in allowed or (
                _json_type(v) == "integer" and "number" in allowed)]
        texts = list(dict.fromkeys(json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values))
        if sum(map(len, texts)) > MAX_ENUM_CHARS:
            raise GrammarError(f"JSON schema at {path}: enum is longer than {MAX_ENUM_CHARS} characters")
        if not texts:
            raise GrammarError(f"JSON schema at {path}: no enum value has the required type")
        return self.literal_trie(texts, path)

    def literal_trie(self, texts: list[str], path: str) -> str:
        """Alternatives of literal strings, factored by common prefixes so the matcher holds one parse.

        Iterative (post-order over the branching nodes of a character trie), so
        long values cannot exhaust the Python stack and the work is linear.
        """
        end = ""
        root: dict = {}
        for t in texts:
            node = root
            for ch in t:
                node = node.setdefault(ch, {})
            node[end] = {}

        def edges(node: dict):
            out = []
            for ch, child in node.items():
                if ch == end:
                    out.append((None, None))
                    continue
                run = [ch]
                while len(child) == 1 and end not in child:  # a chain without branches
                    (c, child), = child.items()
                    run.append(c)
                out.append(("".join(run), None if child == {end: {}} else child))
            return out

        exprs: dict[int, str] = {}
        todo = [(root, False)]
        while todo:
            node, ready = todo.pop()
            if not ready:
                todo.append((node, True))
                todo += [(child, False) for _, child in edges(node) if child is not None]
                continue
            alts = ['""' if run is None else gbnf_literal(run) + (f" {exprs[id(child)]}" if child else "")
                    for run, child in edges(node)]
            exprs[id(node)] = alts[0] if len(alts) == 1 else self.add_rule(f"{path}-enum", " | ".join(alts))
        body = exprs[id(root)]
        return body if re.fullmatch(r"[A-Za-z0-9-]+", body) else self.add_rule(f"{path}-enum", body)

    def string(self, schema: dict, path: str) -> str:
        lo, hi = _bounds(schema, "minLength", "maxLength", path)
        if "pattern" in schema:
            if lo or hi is not None:
                raise GrammarError(f"JSON schema at {path}: pattern together with minLength/maxLength "
                                   "is not supported")
            self.primitive("char")
            return self.add_rule(f"{path}-string", '"\\"" ' + pattern_to_gbnf(schema["pattern"], "char")
                                 + ' "\\""')
        if not lo and hi is None:
            return self.primitive("string")
        self.primitive("char")
        reps = f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
        return self.add_rule(f"{path}-string", f'"\\"" char{reps} "\\""')

    def array(self, schema: dict, path: str, depth: int) -> str:
        lo, hi = _bounds(schema, "minItems", "maxItems", path)
        items = schema.get("items", True)
        if isinstance(items, list):
            raise GrammarError(f"JSON schema at {path}: items as a list (tuple validation) is not supported")
        item = self.visit(items, f"{path}/items", depth + 1)
        self.primitive("ws")
        if hi == 0:
            return self.add_rule(path or "array", '"[" ws "]"')
        more_hi = "" if hi is None else str(hi - 1)
        more = f'("," ws {item} ws){{{max(lo - 1, 0)},{more_hi}}}'
        body = f"{item} ws {more}"
        body = f'"[" ws {body} "]"' if lo else f'"[" ws ({body})? "]"'
        return self.add_rule(path or "array", body)

    def object(self, schema: dict, path: str, depth: int) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict) or not isinstance(required, list) or not all(
                isinstance(r, str) for r in required):
            raise GrammarError(f"JSON schema at {path}: properties must be an object and required a list "
                               "of names")
        self.primitive("ws")
        names = list(props) + [r for r in dict.fromkeys(required) if r not in props]
        if not names:
            if extra is False:
                return self.add_rule(path or "object", '"{" ws "}"')
            if extra is True or extra == {}:
                return self.primitive("object")
            value = self.visit(extra, f"{path}/additionalProperties", depth + 1)
            self.primitive("string")
            kv = f'string ws ":" ws {value} ws'
            return self.add_rule(path or "object", f'"{{" ws ({kv} ("," ws {kv})*)? "}}"')
        kvs = {}
        for name in names:
            value = self.visit(props.get(name, True), f"{path}/properties/{name}", depth + 1)
            kvs[name] = self.add_rule(f"{path}-{name}-kv",
                                      f'{gbnf_literal(json.dumps(name, ensure_ascii=False))} ws ":" ws {value} ws')
        req = [n for n in names if n in required]
        opt = [n for n in names if n not in required]
        if req:
            tail = self.tail_from(opt, 0, kvs, path)
            body = ' "," ws '.join(kvs[n] for n in req) + (f" {tail}" if tail else "")
        else:  # the first optional property present has no comma before it
            firsts = [f"{kvs[name]} {self.tail_from(opt, i + 1, kvs, path)}".strip() for i, name in enumerate(opt)]
            body = "(" + " | ".join(firsts) + ")?"
        return self.add_rule(path or "object", f'"{{" ws {body} "}}"')

    def tail_from(self, opt: list[str], start: int, kvs: dict, path: str) -> str:
        """The rule for ``("," ws kv)?`` over ``opt[start:]`` in order (shared between alternatives)."""
        key = ("tail", tuple(opt[start:]), path)
        cache = self.__dict__.setdefault("_tails", {})
        if key in cache:
            return cache[key]
        if start >= len(opt):
            cache[key] = ""
            return ""
        rest = self.tail_from(opt, start + 1, kvs, path)
        cache[key] = self.add_rule(f"{path}-rest", f'("," ws {kvs[opt[start]]})? {rest}'.strip())
        return cache[key]


def _digit_runs(x: str, y: str) -> list[list[tuple[int, int]]]:
    """Digit-class sequences matching exactly the numbers x..y, written with the same number of digits."""
    n = len(x)
    if n == 1:
        return [[(int(x), int(y))]]
    if x[0] == y[0]:
        return [[(int(x[0]), int(x[0]))] + r for r in _digit_runs(x[1:], y[1:])]
    out, first, last = [], int(x[0]), int(y[0])
    if x[1:] != "0" * (n - 1):
        out += [[(first, first)] + r for r in _digit_runs(x[1:], "9" * (n - 1))]
        first += 1
    tail = []
    if y[1:] != "9" * (n - 1):
        tail = [[(last, last)] + r for r in _digit_runs("0" * (n - 1), y[1:])]
        last -= 1
    if first <= last:
        out.append([(first, last)] + [(0, 9)] * (n - 1))
    return out + tail


def _magnitudes(lo: int, hi: int | None) -> list[str]:
    """GBNF alternatives for the decimal numbers lo..hi (no sign; hi None: up to MAX_DIGITS digits)."""
    top = 10**MAX_DIGITS - 1
    hi = top if hi is None or hi > top else hi
    out = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(hi, 10**n - 1)
        if a > b:
            continue
        for run in _digit_runs(str(a), str(b)):
            out.append(" ".join(f"[{p}-{q}]" if p != q else f'"{p}"' for p, q in run))
    return out


def integer_range_gbnf(lo: int | None, hi: int | None) -> list[str]:
    """GBNF alternatives for the integers in [lo, hi] (None: unbounded, up to MAX_DIGITS digits); no "-0"."""
    alts = []
    if lo is None or lo < 0:  # negatives: magnitudes from max(1, -hi) up to -lo
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        alts += [f'"-" {a}' for a in _magnitudes(mag_lo, None if lo is None else -lo)]
    if hi is None or hi >= 0:
        alts += _magnitudes(0 if lo is None or lo < 0 else lo, hi)
    return alts


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _bounds(schema: dict, lo_key: str, hi_key: str, path: str) -> tuple[int, int | None]:
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
    for key, v in ((lo_key, lo), (hi_key, hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise GrammarError(f"JSON schema at {path}: {key} must be an integer >= 0, got {v!r}")
        if v is not None and v > MAX_REPEAT:
            raise GrammarError(f"JSON schema at {path}: {key} {v} is above the supported {MAX_REPEAT}")
    if hi is not None and hi < lo:
        raise GrammarError(f"JSON schema at {path}: {hi_key} {hi} is below {lo_key} {lo}")
    return lo, hi


def schema_to_gbnf(schema) -> str:
    """GBNF text for the JSON documents ``schema`` accepts (a dict, a bool, or JSON text)."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"JSON schema is not valid JSON: {e}") from None
    c = _Compiler(schema)
    try:
        root = c.visit(schema, "#", 0)
    except RecursionError:
        raise GrammarError("JSON schema nests too deeply") from None
    lines = [f"root ::= {root}"]
    lines += [f"{name} ::= {body}" for name, body in c.rules.items()]
    return "\n".join(lines) + "\n"
