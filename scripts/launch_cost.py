"""What one kernel launch costs on this backend, split into host (encoding) and device time.

    python scripts/launch_cost.py [MODEL.gguf]

A development aid for kernel work (results/kernel_log.md): it times chains of
dependent launches -- a null custom kernel with 1 to 33 inputs, a small MLX
op, and, given a model, each decode launch of one block -- and prints, per
launch, how long the host spent encoding it and how long the whole chain took.
When the two are close, the host, not the GPU, sets the pace. Each launch reads
the same input, made to wait for the previous output by ``mx.depends`` (no copy
kernel in the chain). scripts/kernel_profile.py times a whole decode step.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

CHAIN = 200


def timed_chain(launch, x0) -> tuple[float, float]:
    """(host us, total us) per launch of a chain of CHAIN dependent launches, each on input x0."""
    mx.eval(launch(x0))  # compile, allocate
    best = (float("inf"), float("inf"))
    for _ in range(3):
        mx.synchronize()
        tic = time.perf_counter()
        out = launch(x0)
        for _ in range(CHAIN - 1):
            out = launch(mx.depends(x0, out))
        mx.async_eval(out)
        host = time.perf_counter() - tic
        mx.eval(out)
        total = time.perf_counter() - tic
        best = min(best, (host, total), key=lambda t: t[1])
    return best[0] / CHAIN * 1e6, best[1] / CHAIN * 1e6


def null_kernel(n_inputs: int, pad_kb: int = 0):
    """A kernel that does nearly nothing; ``pad_kb`` KB of comment lines in its header (the text MLX
    keeps, and hashes at every launch: mlx/backend/cuda/custom_kernel.cpp)."""
    names = [f"in{i}" for i in range(n_inputs)]
    body = ("if (threadIdx.x == 0 && blockIdx.x == 0) { float s = 0.0f; "
            + " ".join(f"s += {n}[0];" for n in names) + " out[0] = s; }")
    header = ("// " + "x" * 60 + "\n") * (pad_kb * 1024 // 64)
    kernel = mx.fast.cuda_kernel(name=f"null_{n_inputs}_{pad_kb}", input_names=names, output_names=["out"],
                                 source=body, header=header)
    extra = [mx.zeros((16,)) for _ in range(n_inputs - 1)]
    mx.eval(extra)

    def launch(x):
        return kernel(inputs=[x, *extra], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(16,)],
                      output_dtypes=[mx.float32])[0]

    return launch


def compiled_chain(launch, x0, n: int = 100) -> float:
    """Wall us per launch of a compiled chain of ``n`` dependent launches, replayed: no Python per launch,
    only what MLX does for each primitive when it evaluates (as in the compiled decode step)."""
    def chain(x):
        out = launch(x)
        for _ in range(n - 1):
            out = launch(mx.depends(x, out))
        return out

    fn = mx.compile(chain)
    mx.eval(fn(x0))
    best = float("inf")
    for _ in range(5):
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(fn(x0))
        best = min(best, time.perf_counter() - tic)
    return best / n * 1e6


def row(name: str, host: float, total: float) -> None:
    print(f"| {name} | {host:.1f} | {total:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    args = ap.parse_args()
    print("| launch | host us | total us |\n|---|---|---|")
    x0 = mx.zeros((16,))
    row("mx.add (16 floats)", *timed_chain(lambda x: x + 1.0, x0))
    if mx.cuda.is_available():
        for n in (1, 3, 9, 17, 33):
            row(f"null custom kernel, {n} inputs", *timed_chain(null_kernel(n), x0))
        for kb in (0, 16, 32, 64):  # the rendered matvec text: 28 KB before 420ca8c, 11 KB since (no blocks)
            print(f"| compiled chain, null kernel, source + {kb} KB | | {compiled_chain(null_kernel(1, kb), x0):.1f} |")
    from rwkv_mlx.kernels import kernel_backend

    if not args.model or kernel_backend() is None:
        return
    import rwkv_mlx

    model, _ = rwkv_mlx.load(args.model)
    plan = model.runtime.block_plan(1, 1)  # built here, evaluated constants and all
    C = plan.C
    x = mx.random.normal((1, 1, C))
    shift = mx.random.normal((1, C))
    state = mx.zeros((1, plan.H, plan.N, plan.N))
    mx.eval(x, shift, state)
    hidden = mx.random.normal((1, model.blocks[1].ffn.key.weight.shape[0]))
    mx.eval(hidden)
    row("proj (r, k, v, LoRA down)", *timed_chain(lambda v: plan.proj(v, shift)[0], x))
    row("out (W_o + residual)", *timed_chain(lambda v: plan.out(v.reshape(1, C), residual=v), x))
    row("ffn key", *timed_chain(lambda v: plan.key(v, shift)[0], x))
    row("ffn value", *timed_chain(lambda v: plan.value(hidden, residual=v), x))
    row("block (5 launches)", *timed_chain(lambda v: plan(v, shift, shift, state, v)[0], x))


if __name__ == "__main__":
    main()
