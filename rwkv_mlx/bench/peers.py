"""Time a peer on the same weights, prompt and lengths as ``rwkv-mlx benchmark``; print the ratios.

    python scripts/bench_peers.py --model rwkv7-2.9b-Q4_K_M.gguf --mode 4bit
    python scripts/bench_peers.py --model fixa-f32.gguf --mode float32      # token agreement check
    python scripts/bench_peers.py --model rwkv7-2.9b-Q4_K_M.gguf --llama-bench /tmp/llama.cpp/build/bin/llama-bench

The peers: mlx-lm's RWKV-7 (below), and llama.cpp's llama-bench on the GGUF file as
stored (``--llama-bench PATH`` or ``--peer llama.cpp`` with $RWKV_MLX_LLAMA_BENCH;
rwkv_mlx/bench/llama_cpp.py says what it measures), at every prompt length of
``PREFILL_LENGTHS`` unless ``--prompt-tokens`` names others.

The GGUF tensors are dequantized exactly to float32 (rwkv-mlx's loader), mapped
onto mlx-lm's parameter names (``mlx_lm.models.rwkv7``), cast to the mode's
dtype and, for 4bit/8bit, quantized the way mlx-lm converts models
(``mlx_lm.utils.quantize_model``: affine, group 64, with the model's own
quant_predicate).  Decoding runs mlx-lm's own loop (``generate_step``, greedy)
and is timed the way mlx-lm's ``stream_generate`` times it.  The rwkv-mlx
figure comes from running rwkv-mlx's benchmark in the same process (its
quality gate included), or with ``--ours log`` from the latest matching entry
of benchmarks.jsonl.  Results: results/peers.md and ``"engine": "mlx-lm"``
lines in results/benchmarks.jsonl (``"engine": "llama.cpp"`` for llama.cpp, one per
prompt length).

Numerics mlx-lm does differently (its model file, 0.32.x): the WKV state and
the whole residual stream are in the weights' dtype (float16 in a float16 or
quantized model; rwkv-mlx keeps state, decay, norms and residual in float32);
the decay ``exp(-e^-0.5 sigmoid(.))`` is rounded to float16 before use; the
l2-norm epsilon is 1e-7 (rwkv-mlx 1e-12); quantized models are re-quantized
from the dequantized GGUF at group 64 (4-bit: a second rounding of Q4_K
weights), with embeddings and LoRA up-projections at 8 bits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import shlex
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from ..backend import select_device
from ..errors import InvalidArgumentError, ModelFileError, RwkvMlxError
from ..io import atomic_write_text
from ..formats.gguf_file import open_gguf
from ..loader.gguf import model_args_from_gguf, tokenizer_from_gguf
from ..loader.info import file_fingerprint
from ..model.weights import dense_float32
from ..backend import device_name
from . import llama_cpp
from .benchmark import GEN_TOKENS, PREFILL_LENGTHS, PROMPT_TOKENS, benchmark_prompt, check_counts, run_benchmark
from .measure import PrimitiveCount, Spread, count_primitives, environment
from .quality import QUALITY_TOKENS, first_difference, quality_hash
from .record import JSONL_NAME, append_jsonl, format_table, load_entries, log_line

MODES = ("float32", "float16", "bfloat16", "4bit", "8bit")
PEERS_NAME = "peers.md"
_LORAS = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}
_PROJECTIONS = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}


def mlx_lm_name(gguf_name: str) -> str | None:
    """mlx-lm's parameter name for a GGUF tensor (None: mlx-lm has no such parameter)."""
    fixed = {
        "token_embd.weight": "model.embeddings.weight",
        "token_embd_norm.weight": "model.layers.0.pre_norm.weight",
        "token_embd_norm.bias": "model.layers.0.pre_norm.bias",
        "output_norm.weight": "model.norm.weight",
        "output_norm.bias": "model.norm.bias",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    p = f"model.layers.{layer}."
    norms = {"attn_norm": "attn_norm", "attn_norm_2": "ffn_norm", "time_mix_ln": "attn.g_norm"}
    base, kind = rest.rsplit(".", 1)
    if base in norms:
        return p + norms[base] + "." + kind
    if base.startswith("time_mix_") and base[9:] in _PROJECTIONS:
        return p + "attn." + _PROJECTIONS[base[9:]] + ".weight"
    if base in ("time_mix_k_k", "time_mix_k_a", "time_mix_r_k"):
        return p + "attn." + base[9:]
    if base == "channel_mix_lerp_k":
        return p + "ffn.x_k"
    if base in ("channel_mix_key", "channel_mix_value"):
        return p + "ffn." + base[12:] + ".weight"
    lora = base[9:]  # w0, w1, w2, a0, ...
    if len(lora) == 2 and lora[0] in _LORAS and lora[1] in "012":
        if lora[0] == "v" and layer == "0":
            return None  # the converter's dummies: mlx-lm's layer 0 has no value LoRA
        target = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}[lora[1]]
        return f"{p}attn.{_LORAS[lora[0]]}.{target}"
    if base == "time_mix_lerp_fused":
        return p + "attn.x_{rwkvag}"  # split in mlx_lm_weights
    raise KeyError(gguf_name)


def mlx_lm_weights(g, args, dtype: mx.Dtype) -> list[tuple[str, mx.array]]:
    """Every GGUF tensor, dequantized exactly, reshaped and named for mlx-lm."""
    H, N, C = args.n_head, args.head_size, args.n_embd
    out = []
    for gguf_name, info in g.tensors.items():
        name = mlx_lm_name(gguf_name)
        if name is None:
            continue
        w = dense_float32(g.raw(gguf_name), info)
        if name.endswith("x_{rwkvag}"):
            for i, letter in enumerate("rwkvag"):
                out.append((name.replace("{rwkvag}", letter), w.reshape(6, 1, 1, C)[i].astype(dtype)))
            continue
        if name.endswith(("attn.k_k", "attn.k_a", "attn.r_k", "g_norm.weight", "g_norm.bias")):
            w = w.reshape(H, N)
        out.append((name, w.astype(dtype)))
    return out


def load_mlx_lm(path: Path, mode: str):
    """(mlx-lm model, our tokenizer, seconds) for a GGUF file in the given mode."""
    from mlx_lm.models import rwkv7
    from mlx_lm.utils import quantize_model

    tic = time.perf_counter()
    g = open_gguf(path)
    args = model_args_from_gguf(g)
    tokenizer = tokenizer_from_gguf(g, args.vocab_size)
    lm_args = rwkv7.ModelArgs(
        model_type="rwkv7", vocab_size=args.vocab_size, hidden_size=args.n_embd, intermediate_size=args.ffn_dim,
        norm_eps=args.norm_eps, head_dim=args.head_size, num_hidden_layers=args.n_layer,
        a_low_rank_dim=args.iclr_rank, v_low_rank_dim=args.value_rank, gate_low_rank_dim=args.gate_rank,
        decay_low_rank_dim=args.decay_rank,
    )
    model = rwkv7.Model(lm_args)
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}.get(mode, mx.float16)
    model.load_weights(mlx_lm_weights(g, args, dtype), strict=True)
    if mode in ("4bit", "8bit"):
        quantize_model(model, {}, group_size=64, bits=int(mode[0]))
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer, time.perf_counter() - tic


def time_mlx_lm(model, prompt: list[int], gen_tokens: int) -> dict:
    """One run of mlx-lm's generate_step, timed as mlx-lm's stream_generate does."""
    from mlx_lm.generate import generate_step

    tokens = []
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for n, (token, _) in enumerate(generate_step(mx.array(prompt), model, max_tokens=gen_tokens)):
        if n == 0:
            prompt_time = time.perf_counter() - tic
            tic = time.perf_counter()
        tokens.append(int(token))
    return {"prefill_tps": len(prompt) / prompt_time, "generation_tps": len(tokens) / (time.perf_counter() - tic),
            "peak": mx.get_peak_memory(), "tokens": tokens}


def mlx_lm_step_primitives(model, token: int) -> PrimitiveCount:
    """Primitives of one mlx-lm decode step (model + log-softmax + argmax, the cache update)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[token]]), cache=cache)
    states = [a for c in cache for a in c.cache if a is not None]
    mx.eval(states)
    logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    outputs = [mx.argmax(logprobs, axis=-1), logprobs, *[a for c in cache for a in c.cache if a is not None]]
    return PrimitiveCount.of(count_primitives(outputs), len(model.layers))


def ours_from_log(results_dir: Path, fingerprint: str, prompt_tokens: int, gen_tokens: int) -> dict:
    """Our figures for this file from the log: the latest matching entry, or, where the same title and commit
    logged several (each `rwkv-mlx benchmark` a process of its own), their median prefill and decode rates.
    One process's rates are one draw: on an H100 the decode loop of one tree ran at 190-266 tok/s from one
    process to the next (results/kernel_log.md step 14), a wider spread than the margins we compare."""
    matches = [e for e in load_entries(results_dir)
               if e.get("engine") == "rwkv-mlx" and e.get("fingerprint") == fingerprint
               and e.get("prompt_tokens") == prompt_tokens and e.get("gen_tokens") == gen_tokens
               and e.get("device") == device_name()]
    if not matches:
        raise InvalidArgumentError(f"no rwkv-mlx entry for this file ({fingerprint}), {prompt_tokens}/{gen_tokens} "
                                   f"tokens on {device_name()} in {results_dir / JSONL_NAME}: use --ours run")
    latest = matches[-1]
    same = [e for e in matches if all(e.get(k) == latest.get(k) for k in ("title", "commit", "commit_dirty"))]
    if len(same) == 1:
        return latest
    merged = {**latest, "processes": len(same)}
    for key in ("prefill_tps", "generation_tps"):
        merged[f"{key}_processes"] = sorted(e[key] for e in same)
        merged[key] = statistics.median(merged[f"{key}_processes"])
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time mlx-lm's RWKV-7 or llama.cpp's llama-bench on the same GGUF file; "
                                             "print rwkv-mlx / peer.")
    ap.add_argument("--model", required=True, type=Path, help="RWKV-7 GGUF file")
    ap.add_argument("--peer", choices=("mlx-lm", llama_cpp.ENGINE),
                    help="the peer to time (default mlx-lm; llama.cpp when --llama-bench is given)")
    ap.add_argument("--llama-bench", metavar="PATH", help=f"llama.cpp's llama-bench binary (default ${llama_cpp.BINARY_ENV}; "
                                                          "scripts/build_llama_bench.sh builds it)")
    ap.add_argument("--mode", default="float16", choices=MODES, help="mlx-lm's weights: dtype or 4bit/8bit (default float16)")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", metavar="N",
                    help=f"prompt length (default {PROMPT_TOKENS}); llama.cpp takes several (default "
                         f"{' '.join(map(str, PREFILL_LENGTHS))})")
    ap.add_argument("--gen-tokens", type=int, default=GEN_TOKENS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"))
    ap.add_argument("--ours", default="run", choices=("run", "log"),
                    help="rwkv-mlx figures: run the benchmark here (default) or take the latest matching log entry")
    ap.add_argument("--results-dir", type=Path, default=Path("results"))
    ap.add_argument("--title", help="title of the JSON lines (for --compare and the plot; default 'PEER peers')")
    ap.add_argument("--no-record", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    a.command = shlex.join(["python", "scripts/bench_peers.py", *argv])
    a.peer = a.peer or (llama_cpp.ENGINE if a.llama_bench else "mlx-lm")
    a.title = a.title or f"{a.peer} peers"
    try:
        if a.peer == llama_cpp.ENGINE:
            a.prompt_tokens = a.prompt_tokens or list(PREFILL_LENGTHS)
            return run_llama_cpp(a)
        a.prompt_tokens = (a.prompt_tokens or [PROMPT_TOKENS])
        if len(a.prompt_tokens) > 1:
            raise InvalidArgumentError("--prompt-tokens: mlx-lm is timed at one prompt length per call")
        a.prompt_tokens = a.prompt_tokens[0]
        return run(a)
    except RwkvMlxError as e:
        print(f"bench_peers: error: {e}", file=sys.stderr)
        return e.exit_code


def run(a) -> int:
    try:
        import mlx_lm
    except ModuleNotFoundError:
        raise InvalidArgumentError("mlx-lm is not installed: pip install 'rwkv-mlx[peers]' (mlx-lm 0.32.x)") from None
    select_device(a.device)
    check_counts(a.prompt_tokens, a.gen_tokens, a.runs, a.warmup)
    command = a.command

    if a.ours == "run":
        result = run_benchmark(a.model, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                                     runs=a.runs, warmup=a.warmup)
        ours = result.to_json()
    else:
        ours = ours_from_log(a.results_dir, file_fingerprint(a.model), a.prompt_tokens, a.gen_tokens)
    gc.collect()
    mx.clear_cache()

    model, tokenizer, load_seconds = load_mlx_lm(a.model, a.mode)
    prompt = benchmark_prompt(tokenizer, a.prompt_tokens)
    runs = [time_mlx_lm(model, prompt, a.gen_tokens) for _ in range(a.warmup + a.runs)][a.warmup:]
    dispatch = mlx_lm_step_primitives(model, prompt[-1])
    pre = Spread.of(r["prefill_tps"] for r in runs)
    gen = Spread.of(r["generation_tps"] for r in runs)
    theirs_tokens = runs[0]["tokens"][: QUALITY_TOKENS]
    reference = ours["reference"]["tokens"]
    agree = sum(x == y for x, y in zip(theirs_tokens, reference))
    prefix = first_difference(theirs_tokens, reference)
    env = environment()

    def ratio(x, y):
        return f"{x / y:.2f}x" if x and y else "-"

    rows = [
        ["prefill tok/s", f"{ours['prefill_tps']:.2f}", f"{pre.median:.2f} ({pre.min:.2f}-{pre.max:.2f})",
         ratio(ours["prefill_tps"], pre.median)],
        ["generation tok/s", f"{ours['generation_tps']:.2f}", f"{gen.median:.2f} ({gen.min:.2f}-{gen.max:.2f})",
         ratio(ours["generation_tps"], gen.median)],
        ["dispatches / token", str(ours["dispatches_per_token"]), str(dispatch.kernels),
         ratio(ours["dispatches_per_token"], dispatch.kernels)],
        ["peak memory MB", f"{max(ours['peak_memory_bytes'].values()) / 1e6:.1f}",
         f"{max(r['peak'] for r in runs) / 1e6:.1f}", ""],
        ["load ms", f"{ours['load_ms']:.1f}", f"{load_seconds * 1000:.1f} (dequantize + convert)", ""],
        ["first 16 tokens vs reference", "16/16 (gate)", f"{agree}/16 (same up to position {prefix})", ""],
    ]
    header = ["metric", f"rwkv-mlx ({ours['model']})", f"mlx-lm {mlx_lm.__version__} {a.mode}", "rwkv-mlx / mlx-lm"]
    table = format_table(header, rows)
    sys.stdout.write(table)
    print(f"mlx-lm tokens: {theirs_tokens}\nreference:     {reference}\ndevice: {env['device']} ({env['backend']})")

    if not a.no_record:
        when = dt.datetime.now().astimezone()
        change = f"mlx-lm {mlx_lm.__version__} {a.mode} on {a.model.name}"
        line = log_line(a.title, change, command, when, {
            "engine": "mlx-lm",
            "mlx_lm": mlx_lm.__version__, "mode": a.mode, "model": a.model.name, "model_path": str(a.model),
            "fingerprint": ours["fingerprint"], "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
            "runs": a.runs, "warmup": a.warmup, "load_ms": round(load_seconds * 1000, 3),
            "prefill_tps": round(pre.median, 3), "prefill_tps_min": round(pre.min, 3), "prefill_tps_max": round(pre.max, 3),
            "generation_tps": round(gen.median, 3), "generation_tps_min": round(gen.min, 3),
            "generation_tps_max": round(gen.max, 3), "peak_memory_bytes": {"decode": max(r["peak"] for r in runs)},
            "dispatches_per_token": dispatch.kernels, "primitives_per_token": dispatch.primitives,
            "primitives_by_name": dispatch.by_name, "quality_tokens": theirs_tokens,
            "quality_hash": quality_hash(theirs_tokens), "agreement_with_reference": agree,
            "ours": {k: ours[k] for k in ("prefill_tps", "generation_tps", "dispatches_per_token", "quality_hash",
                                              "device", "date") if k in ours},
            "ratio_prefill": round(ours["prefill_tps"] / pre.median, 4),
            "ratio_generation": round(ours["generation_tps"] / gen.median, 4),
            **env,
        })
        append_jsonl(a.results_dir, line)
        record_peers_md(a.results_dir, when, f"{line['change']} ({env['device']}, {env['backend']})",
                        f"{a.prompt_tokens} prompt tokens, {a.gen_tokens} generated, median of {a.runs} runs "
                        f"(+{a.warmup} warm-up); `{command}`", table)
    return 0


def record_peers_md(results_dir: Path, when: dt.datetime, heading: str, how: str, table: str) -> None:
    """Append one side-by-side entry to results/peers.md."""
    peers = results_dir / PEERS_NAME
    document = peers.read_text(encoding="utf-8") if peers.is_file() else (
        "# rwkv-mlx beside its peers (mlx-lm, llama.cpp) on the same weights\n\n"
        "Written by scripts/bench_peers.py (see docs/benchmarks.md). Each entry names its device.\n")
    entry = f"\n### {when.strftime('%Y-%m-%d %H:%M:%S')} - {heading}\n{how}\n\n{table}"
    atomic_write_text(peers, document.rstrip("\n") + "\n" + entry)
    print(f"recorded: {peers} and {results_dir / JSONL_NAME}", file=sys.stderr)


def _processes(ours: dict[int, dict]) -> str:
    """How many processes our figures are the median of, and their decode rates, where more than one."""
    spans = [f"{p}-token prompt: decode {', '.join(f'{v:.1f}' for v in e['generation_tps_processes'])}"
             for p, e in ours.items() if e.get("processes", 1) > 1]
    n = max((e.get("processes", 1) for e in ours.values()), default=1)
    return f", then the median over {n} processes ({'; '.join(spans)})" if spans else ""


def run_llama_cpp(a) -> int:
    """llama-bench on the same file and lengths, beside our figures (run here, or the log's with --ours log)."""
    binary = llama_cpp.find_binary(a.llama_bench)
    if not a.model.is_file():
        raise ModelFileError(a.model, "no such file")
    for p in a.prompt_tokens:
        check_counts(p, a.gen_tokens, a.runs, a.warmup)
    select_device(a.device)
    if a.ours == "run":
        ours = {p: run_benchmark(a.model, prompt_tokens=p, gen_tokens=a.gen_tokens, runs=a.runs,
                                 warmup=a.warmup).to_json() for p in a.prompt_tokens}
    else:
        fingerprint = file_fingerprint(a.model)
        ours = {p: ours_from_log(a.results_dir, fingerprint, p, a.gen_tokens) for p in a.prompt_tokens}
    gc.collect()
    mx.clear_cache()  # llama.cpp gets the GPU memory our run held

    command = llama_cpp.bench_command(binary, a.model, a.prompt_tokens, a.gen_tokens, a.runs)
    tests = llama_cpp.parse_output(llama_cpp.run_llama_bench(command), binary)
    prefill, decode = llama_cpp.speeds(tests, a.prompt_tokens, a.gen_tokens, binary)
    info = llama_cpp.about(tests)
    build = f"llama.cpp {info.get('build_commit', '?')} ({info.get('backends', '?')})"
    table = format_table(["metric", f"rwkv-mlx ({a.model.name})", f"{build}, mean ± sd", "rwkv-mlx / llama.cpp"],
                         llama_cpp.rows(ours, prefill, decode, a.gen_tokens))
    sys.stdout.write(table)
    env = environment()
    print(f"llama-bench: {shlex.join(command)}\ndevice: {env['device']} ({env['backend']})")

    if not a.no_record:
        when = dt.datetime.now().astimezone()
        change = f"{build} on {a.model.name}"
        for p in a.prompt_tokens:
            append_jsonl(a.results_dir, log_line(a.title, change, a.command, when, {
                **llama_cpp.log_figures(ours[p], prefill[p], decode, p, a.gen_tokens, info),
                "model": a.model.name, "model_path": str(a.model), "fingerprint": ours[p]["fingerprint"],
                "runs": a.runs, "llama_bench_command": shlex.join(command), **env,
            }))
        record_peers_md(a.results_dir, when, f"{change} ({env['device']}, {env['backend']})",
                        f"prompts of {', '.join(map(str, a.prompt_tokens))} tokens, {a.gen_tokens} generated; ours "
                        f"median of {a.runs} runs (+{a.warmup} warm-up){_processes(ours)}, llama-bench mean of "
                        f"{a.runs} (+1 warm-up); `{a.command}`", table)
    return 0

