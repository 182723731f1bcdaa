"""What sets a decode step's pace, step by step: the host's replay and queueing of each step, in one process.

    python scripts/decode_pace.py MODEL.gguf [--sequence 1 16 1 16] [--tokens 128] [--alone 16]

A development aid for issue 14's bars (results/kernel_log.md step 29). One tree's 16-row decode ran at
2,213-2,442 tok/s in some processes and 3,167-3,491 in others, while its one stream ran fastest in the
processes where 16 rows ran slowest (step 28). This runs the batch sizes of ``--sequence`` one after the
other in one process, the same greedy loop as batch_decode (no step waits for a token), and prints for each
run: the wall time a step; the host's time a step to replay the compiled step (``model.step``) and to queue
it (``mx.async_eval``: it blocks while MLX has more than ten command buffers in flight, so a queue time far
above the host-alone one is time spent waiting for the GPU); the CPU time a step; the process's context
switches a step (involuntary ones: the thread waited for a CPU); the CPU the main thread ran on; the time the
hypervisor stole from the process's CPUs (every CPU it may run on, summed; /proc/stat). Then, for
each batch size, the host alone: each step queued after the one before it finished (kernel_profile's
"host alone", measure.host_alone). Where host alone is well below the wall time a step, the GPU sets the pace; but on an H100 host
alone came out longer than the pipelined steps at 16 rows (step 29), so it is not the host's work alone either.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics

import mlx.core as mx

import rwkv_mlx
from rwkv_mlx.bench.measure import greedy_steps, host_alone
from batch_decode import start  # (run as scripts/decode_pace.py: scripts/ is on the path)


def cpu_now() -> int:
    """The CPU the calling thread last ran on (/proc's stat, field 39), or -1."""
    try:
        with open("/proc/thread-self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


def steal_ticks() -> dict[int, int]:
    """Each CPU's stolen time so far (/proc/stat, clock ticks): time the hypervisor ran something else while
    this VM's CPU had work. Empty where /proc/stat has no such column."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name != "cpu" and len(fields) >= 8:
                    out[int(name[3:])] = int(fields[7])
    except (OSError, ValueError):
        pass
    return out


def paced_run(model, batch: int, n_tokens: int) -> dict:
    """One run of n_tokens pipelined greedy steps of ``batch`` rows (batch_decode's loop), timed step by step."""
    _, token, state = start(model, batch)
    for _ in range(3):  # compile and warm the step for this batch size
        logits, after = model.step(token, state)
        mx.eval(logits, *after.arrays())
    usage0, first_cpu, steal0, timings = resource.getrusage(resource.RUSAGE_SELF), cpu_now(), steal_ticks(), {}
    rows, wall = greedy_steps(model, token, state, n_tokens, timings)
    usage, steal = resource.getrusage(resource.RUSAGE_SELF), steal_ticks()
    stolen = sum(steal.get(c, 0) - steal0.get(c, 0) for c in os.sched_getaffinity(0)) / os.sysconf("SC_CLK_TCK")
    replay, queue = zip(*timings["steps"])
    return {"batch": batch, "tps": batch * n_tokens / wall, "wall_us": wall / n_tokens * 1e6,
            "replay_us": statistics.median(replay) * 1e6, "queue_us": statistics.median(queue) * 1e6,
            "queue_p90_us": statistics.quantiles(queue, n=10)[-1] * 1e6,
            "host_us": timings["host"] / n_tokens * 1e6, "cpu_us": timings["cpu"] / n_tokens * 1e6,
            "nvcsw": (usage.ru_nvcsw - usage0.ru_nvcsw) / n_tokens,
            "nivcsw": (usage.ru_nivcsw - usage0.ru_nivcsw) / n_tokens,
            "cpus": f"{first_cpu}->{cpu_now()}", "steal_ms": stolen / n_tokens * 1e3,
            "first": [r[0] for r in rows[:4]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sequence", type=int, nargs="+", default=[1, 16, 1, 16, 1, 16])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--alone", type=int, default=16, help="steps of host alone a batch size (0: none)")
    ap.add_argument("--clear-cache", action="store_true", help="empty MLX's buffer cache before each run: on CUDA "
                    "a buffer the host has read is moved to managed memory, and the cache hands it to any later "
                    "array of its size, a GPU kernel's output included (mlx/backend/cuda/allocator.cpp)")
    args = ap.parse_args()
    model, _ = rwkv_mlx.load(args.model)
    print(f"| {args.model} | B | tok/s | wall us a step | replay us | queue us (p90) | host us | cpu us "
          "| ctx switches (invol.) a step | CPU | stolen ms a step | first tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.sequence:
        if args.clear_cache:
            mx.clear_cache()
        r = paced_run(model, batch, args.tokens)
        print(f"| | {batch} | {r['tps']:,.1f} | {r['wall_us']:,.0f} | {r['replay_us']:,.0f} "
              f"| {r['queue_us']:,.0f} ({r['queue_p90_us']:,.0f}) | {r['host_us']:,.0f} | {r['cpu_us']:,.0f} "
              f"| {r['nvcsw']:.1f} ({r['nivcsw']:.2f}) | {r['cpus']} | {r['steal_ms']:.2f} | {r['first']} |",
              flush=True)
    for batch in sorted(set(args.sequence)) if args.alone else ():
        _, token, state = start(model, batch)
        alone = host_alone(model, token, state, args.alone, warm=2)
        print(f"host alone, {batch} rows: replay {alone['replay'] * 1e6:,.0f} us + queue {alone['queue'] * 1e6:,.0f} "
              "us a step", flush=True)


if __name__ == "__main__":
    main()
