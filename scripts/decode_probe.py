"""Quick decode probe: tok/s and graph primitives per decoded token, kernels on and off.

    python scripts/decode_probe.py MODEL.gguf [--tokens 64] [--prompt 16]

A development aid for kernel work; the numbers that count come from
`rwkv-mlx benchmark`, which also checks the output tokens.
"""

from __future__ import annotations

import argparse
import os
import time

import mlx.core as mx

import rwkv_mlx
from rwkv_mlx import layers
from rwkv_mlx.bench.measure import count_primitives, greedy_steps
from rwkv_mlx.text.generate import DEFAULT_PREFILL_CHUNK, prefill, stream_generate
from rwkv_mlx.kernels import fused_time_mix, kernels_disabled, layernorm_lerp
from rwkv_mlx.text.sample import SamplingParams


def probe_ids(model, n: int) -> list[int]:
    """The prompt every probe feeds: n token ids spread over the vocabulary (no tokenizer needed)."""
    return [(7 * i + 3) % model.args.vocab_size for i in range(n)]


def decode(model, n_prompt: int, n_tokens: int):
    tokens = mx.array([probe_ids(model, n_prompt)])
    logits, state = model(tokens, logits="last")
    mx.eval(logits, *state.arrays())
    token = mx.argmax(logits[:, -1], axis=-1)
    step_logits, step_state = model(token[:, None], state, logits="last")
    ops = count_primitives([step_logits, *step_state.arrays()])
    timings: dict = {}
    steal = stolen_seconds()
    rows, seconds = greedy_steps(model, token, state, n_tokens, timings)
    timings["steal"] = stolen_seconds() - steal
    return rows[0], n_tokens / seconds, ops, {k: v / n_tokens for k, v in timings.items()}


def stolen_seconds() -> float:
    """CPU time the hypervisor gave other guests while this machine's CPUs wanted it (/proc/stat "steal", all
    CPUs; 0 where the file is absent): one-row decode differed by up to 1.6x between processes of one tree on
    the lent H100s (results/kernel_log.md step 23), and a host that waits for a CPU is one suspect."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def launch_times(model, repeats: int = 50) -> None:
    """Each decode launch of block 1 alone: microseconds per launch and the bandwidth it reaches."""
    layer = min(1, len(model.blocks) - 1)
    block = model.blocks[layer]
    plan = model.runtime.block_plan(layer, 1)
    if plan is None or not plan.ok:
        print("no decode plan for block 1")
        return
    C = plan.C
    x = mx.random.normal((1, 1, C))
    shift = mx.random.normal((1, C))
    hidden = mx.random.normal((1, block.ffn.key.weight.shape[0]))
    y = mx.random.normal((1, C))
    state = mx.zeros((1, plan.H, plan.N, plan.N))
    mx.eval(x, shift, hidden, y, state)
    cases = [("proj", plan.proj, lambda: plan.proj(x, shift)[0]),
             ("out", plan.out, lambda: plan.out(y, residual=x)),
             ("ffn key", plan.key, lambda: plan.key(x, shift)[0]),
             ("ffn value", plan.value, lambda: plan.value(hidden, residual=x)),
             ("block", None, lambda: plan(x, shift, shift, state, x)[0])]
    for name, p, fn in cases:
        launch = p.inner if p is not None and p.pre is not None else p  # (the matvec launch of a split prologue)
        nbytes = sum({id(a): a.nbytes for a in launch.tail if a.size > 1}.values()) if launch else 0
        mx.eval(fn())
        tic = time.perf_counter()
        mx.eval([fn() for _ in range(repeats)])
        us = (time.perf_counter() - tic) / repeats * 1e6
        rate = f"{nbytes / us / 1e3:7.0f} GB/s" if nbytes else ""
        print(f"  {name:10s} {us:8.1f} us  {nbytes / 1e6:7.2f} MB  {rate}")


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: kernel compilation, allocator
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def prefill_times(model, n_tokens: int, expand_dtypes=("float32",), quantized_products: bool = True,
                  chunks=(DEFAULT_PREFILL_CHUNK,)) -> None:
    """Prompt tok/s with the quantized matmul and with weights expanded to each of ``expand_dtypes``
    for the GEMM (``layers.CUDA_EXPAND_DTYPE``), per prompt chunk length in ``chunks`` (CUDA expands
    every quantized matrix once a chunk), and the WKV kernel's share."""
    ids = probe_ids(model, n_tokens)
    saved = layers.CUDA_DEQUANT_MIN_ROWS, layers.CUDA_EXPAND_DTYPE
    routes = [("quantized matmul", 0, None)] if quantized_products else []
    routes += [(f"expanded {dtype}", 1, dtype) for dtype in expand_dtypes]
    for label, rows, dtype in routes:
        layers.CUDA_DEQUANT_MIN_ROWS, layers.CUDA_EXPAND_DTYPE = rows, dtype
        base = mx.get_active_memory()
        for chunk in chunks:
            mx.reset_peak_memory()
            s = _median_seconds(lambda: mx.eval(prefill(model, ids, chunk_size=chunk)[0]))
            extra = (mx.get_peak_memory() - base) / 1e6
            print(f"  prefill {n_tokens} ({label:18s}, chunks of {chunk:5d}) {n_tokens / s:9.1f} tok/s  "
                  f"{s * 1e3:8.1f} ms  peak {extra:8.1f} MB over the weights")
    layers.CUDA_DEQUANT_MIN_ROWS, layers.CUDA_EXPAND_DTYPE = saved
    C, N = model.args.n_embd, model.args.head_size
    H = C // N
    r, k, v, w, a, g = (mx.random.normal((1, n_tokens, C)) * 0.5 for _ in range(6))
    ch = [mx.random.normal((C,)) * 0.1 for _ in range(5)]
    st = mx.zeros((1, H, N, N))
    mx.eval(r, k, v, w, a, g, *ch, st)
    if fused_time_mix(r, k, v, w, a, g, *ch, st, N) is None:
        print("  no WKV kernel on this backend")
        return
    s = _median_seconds(lambda: mx.eval(*fused_time_mix(r, k, v, w, a, g, *ch, st, N)))
    print(f"  WKV kernel alone, T={n_tokens}, H={H}: {s * 1e3:.2f} ms per layer, "
          f"{s * model.args.n_layer * 1e3:.1f} ms for {model.args.n_layer} layers")


def stream_rate(model, tokenizer, n_prompt: int, n_tokens: int) -> None:
    """What the benchmark times: stream_generate's own decode rate (sampler, log-probs, host sync included)."""
    ids = probe_ids(model, n_prompt)
    for _ in range(2):
        for last in stream_generate(model, tokenizer, ids, max_tokens=n_tokens, sampling=SamplingParams.greedy(),
                                    stop_at_end_of_text=False):
            pass
    print(f"stream  : {last.generation_tps:8.1f} tok/s decode, {last.prompt_tps:8.1f} tok/s prompt ({n_prompt})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--launches", action="store_true", help="time each decode launch of one block")
    ap.add_argument("--prefill", type=int, nargs="+", default=[], help="also time prompts of these many tokens")
    ap.add_argument("--expand", nargs="+", default=["float32"], choices=["float32", "float16"],
                    help="the dtypes weights are expanded to for prefill's products, each timed")
    ap.add_argument("--no-quantized-products", action="store_true", help="skip prefill by MLX's quantized matmul")
    ap.add_argument("--chunks", type=int, nargs="+", default=[DEFAULT_PREFILL_CHUNK],
                    help="prompt chunk lengths to time prefill with (prefill's chunk_size)")
    ap.add_argument("--stream", action="store_true", help="also time stream_generate (what the benchmark times)")
    ap.add_argument("--separate", type=int, nargs="+", choices=[0, 1], default=[],
                    help="also decode with the LayerNorm prologues fused (0) and separate (1), alternating, "
                         "--rounds times, in this process (kernels/layernorm_lerp.py)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    t = time.perf_counter()
    model, tokenizer = rwkv_mlx.load(args.model)
    print(f"load {time.perf_counter() - t:.2f} s  {args.model}")
    decode(model, args.prompt, 4)  # compile kernels
    toks, tps, ops, per = decode(model, args.prompt, args.tokens)
    # host: what queueing a step took (greedy_steps waits for no token, but queueing blocks while the GPU is
    # behind): well below 1 / tok/s, the GPU sets the pace; close to it, either may. cpu: the process's CPU
    # time (every thread); steal: CPU time the machine's CPUs waited for while other guests ran (all CPUs)
    print(f"kernels : {tps:8.1f} tok/s  primitives/token {sum(ops.values())}  host {per['host'] * 1e6:6.0f} us/token "
          f"(of {1e6 / tps:6.0f}; cpu {per['cpu'] * 1e6:6.0f}, steal {per['steal'] * 1e6:5.0f})  first tokens {toks[:8]}")
    print("   ", dict(ops.most_common(12)))
    for r in range(args.rounds if args.separate else 0):
        for v in args.separate:
            layernorm_lerp.SEPARATE = v
            model.runtime.invalidate()  # the plans are built again, the prologue as $v says
            decode(model, args.prompt, 4)
            stoks, stps, sops, _ = decode(model, args.prompt, args.tokens)
            agree = sum(a == b for a, b in zip(toks, stoks))
            print(f"round {r + 1} separate prologue {v}: {stps:8.1f} tok/s  primitives/token {sum(sops.values())}  "
                  f"tokens as above {agree}/{len(toks)}")
    layernorm_lerp.SEPARATE = None
    model.runtime.invalidate()
    if args.launches:
        launch_times(model)
    if args.stream:
        stream_rate(model, tokenizer, 512, 128)
    for n in args.prefill:
        prefill_times(model, n, args.expand, not args.no_quantized_products, args.chunks)
    if not args.no_reference:
        with kernels_disabled():
            decode(model, args.prompt, 2)
            ref, rtps, rops, _ = decode(model, args.prompt, args.tokens)
        agree = sum(a == b for a, b in zip(toks, ref))
        print(f"mlx ops : {rtps:8.1f} tok/s  primitives/token {sum(rops.values())}  agree {agree}/{len(ref)}")


if __name__ == "__main__":
    main()
