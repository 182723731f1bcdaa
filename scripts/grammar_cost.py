"""Per-token cost of constrained decoding (JSON schema / GBNF) against the plain model step.

    python scripts/grammar_cost.py [MODEL.gguf] [--tokens 128] [--seeds 3]

For each constraint it reports, in ms per generated token:

* ``model``: one ``model.step`` evaluated on its own (synchronously), the
  unconstrained decode cost without sampling;
* ``mask cold`` / ``mask warm``: the host work of the constraint for the same
  tokens -- advance the matcher by the sampled token, compute the next mask
  (trie walk or cache hit), hand it to MLX -- replayed on a fresh automaton
  (cold: a new grammar's first request) and again on the now-warm one (later
  requests with the same schema);
* ``e2e plain`` / ``e2e constrained``: ``stream_generate`` decode time per
  token (prefill excluded) without and with the constraint (same sampling,
  seeds, prompt).  In the
  decode loop the mask work overlaps the model step already queued on the
  device, so e2e grows by less than the mask time where the device is busy.

Without a model argument it runs the bundled demo model.  Write the output into
results/structured_output.md together with the device, commit and date.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import mlx.core as mx

import rwkv_mlx
from rwkv_mlx import SamplingParams
from rwkv_mlx.text.generate import prefill, stream_generate
from rwkv_mlx.text.grammar.bytegrammar import lower
from rwkv_mlx.text.grammar.gbnf import parse_gbnf
from rwkv_mlx.text.grammar.matcher import Automaton
from rwkv_mlx.text.grammar.processor import GrammarConstraint, grammar_text
from rwkv_mlx.text.grammar.vocab import vocab_trie

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "roles": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "roles", "address"],
}
ARITHMETIC = r'''
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
'''
CASES = [
    ("json_schema person", {"json_schema": PERSON}),
    ("json_object (any object)", {"json_schema": {"type": "object"}}),
    ("gbnf arithmetic", {"grammar": ARITHMETIC}),
]


def model_step_ms(model, tokenizer, prompt: str, n: int) -> float:
    logits, state = prefill(model, tokenizer.encode(prompt))
    token = mx.argmax(logits, axis=-1).astype(mx.uint32)
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        logits, state = model.step(token, state)
        token = mx.argmax(logits, axis=-1).astype(mx.uint32)
        mx.eval(token, *state.arrays())
        times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)


def e2e_ms(model, tokenizer, prompt: str, sampling: SamplingParams, n: int) -> tuple[float, list[int]]:
    """Decode time per generated token (prefill excluded), and the tokens."""
    tokens, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=n, sampling=sampling):
        tokens.append(last.token)
    return 1000 / last.generation_tps, tokens


def replay_ms(automaton: Automaton, tokenizer, vocab_size: int, tokens: list[int]) -> list[float]:
    """Host time of the constraint for each token: advance + next mask + handing it to MLX."""
    c = GrammarConstraint(automaton, tokenizer, vocab_size)
    times = []
    for t in tokens:
        tic = time.perf_counter()
        c.advance([t])
        mx.eval(*c.state)
        times.append(1000 * (time.perf_counter() - tic))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompt", default="User: Describe a person as JSON.\n\nAssistant:")
    args = ap.parse_args()
    path = args.model or rwkv_mlx.DEMO_MODEL
    model, tokenizer = rwkv_mlx.load(path)
    V = model.args.vocab_size
    print(f"model {path}  vocab {V}  device {mx.default_device()}  {platform.processor() or platform.machine()}")
    tic = time.perf_counter()
    trie = vocab_trie(tokenizer, V)
    built_ms = 1000 * (time.perf_counter() - tic)
    print(f"vocabulary trie: {trie.n_nodes} nodes, built in {built_ms:.0f} ms (once per tokenizer)")
    e2e_ms(model, tokenizer, args.prompt, SamplingParams(seed=0), 8)  # warm-up (compiles)
    step = model_step_ms(model, tokenizer, args.prompt, args.tokens)
    print(f"model step alone: {step:.2f} ms/token (median of {args.tokens})\n")
    print("| constraint | seeds | tokens | model ms/tok | mask cold ms/tok (max) | mask warm ms/tok | "
          "e2e plain ms/tok | e2e constrained ms/tok | added e2e |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, fields in CASES:
        text = grammar_text(**fields)
        tic = time.perf_counter()
        Automaton(lower(parse_gbnf(text)))
        compile_ms = 1000 * (time.perf_counter() - tic)
        cold, warm, plain, cons, total = [], [], [], [], 0
        for seed in range(args.seeds):
            params = SamplingParams(seed=seed, temperature=1.0, top_p=0.9)
            p_ms, _ = e2e_ms(model, tokenizer, args.prompt, params, args.tokens)
            c_ms, toks = e2e_ms(model, tokenizer, args.prompt, params.replace(**fields), args.tokens)
            automaton = Automaton(lower(parse_gbnf(text)))
            cold += replay_ms(automaton, tokenizer, V, toks)
            warm += replay_ms(automaton, tokenizer, V, toks)
            plain.append(p_ms)
            cons.append(c_ms)
            total += len(toks)
        m = statistics.mean
        print(f"| {name} (compile {compile_ms:.0f} ms) | {args.seeds} | {total} | {step:.2f} | {m(cold):.2f} "
              f"({max(cold):.1f}) | {m(warm):.2f} | {m(plain):.2f} | {m(cons):.2f} | "
              f"{100 * (m(cons) / m(plain) - 1):+.0f}% |")


if __name__ == "__main__":
    main()
