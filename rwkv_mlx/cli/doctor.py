"""``rwkv-mlx doctor``: what runs on this machine, in one paste.

The environment (rwkv-mlx, MLX, Python, platform, backend, device), then each
custom kernel on a small model: does it build here, does it agree with the
pure-MLX path, and how long one launch takes. A kernel that does not build
leaves its layers on the pure path (with one warning line): the table says
which, so a report from a user's machine tells us what works there.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import DEVICE_OPTION, MODEL_OPTION, load_for_cli, print_table, select_device

AGREEMENT = 1e-4  # relative error vs the pure path; the GPU tests hold kernels to 1e-5


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _launch_us(fn, repeats: int) -> float:
    """Wall time per call of ``fn`` with ``repeats`` calls queued and evaluated together, in us:
    the host's cost of a launch and the device's time for it, without a round trip per call."""
    import mlx.core as mx

    mx.eval(fn())  # warm: the kernel is compiled by now
    start = time.perf_counter()
    mx.eval([fn() for _ in range(repeats)])
    return (time.perf_counter() - start) / repeats * 1e6


class _Failures(logging.Handler):
    """Collects the kernels' build warnings, so the table can show them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def kernel_rows(model, repeats: int) -> list[tuple[str, str, str, str]]:
    """(kernel, builds, max relative error vs the pure path, us per launch) for block 1 and the head."""
    import mlx.core as mx
    import numpy as np

    from ..kernels import kernel_backend, kernels_disabled
    from ..kernels.decode import BlockPlan
    from ..model.wkv import time_mix_core_reference
    from ..kernels.wkv7 import prefill

    backend = kernel_backend()
    rng = np.random.default_rng(0)
    layer = 1 if len(model.blocks) > 1 else 0  # layer 0 has no value LoRA
    block = model.blocks[layer]
    C = model.args.n_embd
    N = model.args.head_size
    H = C // N
    rows = []

    def arr(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    x, att, ffn = arr(1, 1, C), arr(1, C), arr(1, C)
    wkv, v_first = arr(1, H, N, N, scale=0.3), arr(1, 1, C)
    plan = BlockPlan(block, 1, backend)
    if plan.ok:
        fused = plan(x, att, ffn, wkv, v_first)
        with kernels_disabled():
            pure = block(x, att, ffn, wkv, v_first)
        err = max(_rel(f, p) for f, p in zip(fused[:4], pure[:4]))
        x0 = x[:, 0]
        proj, hidden = plan.proj(x0, att)[0], arr(1, model.args.ffn_dim)
        mx.eval(x0, proj, hidden)
        launches = [("matvec r|k|v|LoRA down (LN prologue)", lambda: plan.proj(x0, att)),
                    ("wkv7 decode (LoRA up, WKV, norm, gate)", lambda: plan._time_mix(proj, v_first, wkv)),
                    ("matvec W_o + residual", lambda: plan.out(x0, residual=x)),
                    ("matvec FFN key (LN, relu^2)", lambda: plan.key(x0, ffn)),
                    ("matvec FFN value + residual", lambda: plan.value(hidden, residual=x))]
        for name, fn in launches:
            rows.append((name, "yes", f"{err:.1e} (block)", f"{_launch_us(fn, repeats):.0f}"))
    else:
        rows.append(("decode block (5 launches)", "no: pure-MLX path", "-", "-"))

    T = 64
    seq = [arr(1, T, C) for _ in range(6)]
    chan = [arr(C, scale=0.5) for _ in range(5)]
    state = arr(1, H, N, N, scale=0.3)
    out = prefill(*seq, *chan, state, N, backend)
    if out is None:
        rows.append((f"wkv7 prefill ({T} tokens)", "no: pure-MLX path", "-", "-"))
    else:
        with kernels_disabled():
            ref = time_mix_core_reference(*seq, *chan, state, N)
        err = max(_rel(out[0], ref[0]), _rel(out[1], ref[1]))
        us = _launch_us(lambda: prefill(*seq, *chan, state, N, backend), repeats)
        rows.append((f"wkv7 prefill ({T} tokens, with packing)", "yes", f"{err:.1e}", f"{us:.0f}"))

    xh = arr(1, 1, C)
    head = model.runtime.head(xh)
    if head is None:
        rows.append(("matvec head (LN prologue)", "no: pure-MLX path", "-", "-"))
    else:
        with kernels_disabled():
            ref = model.head(model.ln_out(xh))
        us = _launch_us(lambda: model.runtime.head(xh), repeats)
        rows.append(("matvec head (LN prologue)", "yes", f"{_rel(head, ref):.1e}", f"{us:.0f}"))
    return rows


@app.command(help="Print the backend, device and versions, then check each custom kernel on a small model: "
                  "does it build, does it agree with the pure-MLX path, how long a launch takes. "
                  "Paste its output into bug reports.")
def doctor(
    model: Optional[Path] = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    repeats: int = typer.Option(20, "--repeats", help="Launches timed per kernel."),
) -> None:
    import mlx.core as mx

    from ..version import __version__
    from ..backend import active_backend, device_name
    from ..kernels import kernel_backend

    select_device(device)
    env = [("rwkv-mlx", __version__), ("mlx", mx.__version__), ("python", platform.python_version()),
           ("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
           ("backend", active_backend()), ("device", device_name())]
    backend = kernel_backend()
    env.append(("custom kernels", backend or "none on this backend: the pure-MLX path runs (it is the reference)"))
    print_table(env, header=("what", "here"))
    if backend is None:
        return
    failures = _Failures()
    logging.getLogger("rwkv_mlx").addHandler(failures)
    try:
        loaded, _, _ = load_for_cli(model, quiet=True)
        rows = kernel_rows(loaded, max(1, repeats))
    finally:
        logging.getLogger("rwkv_mlx").removeHandler(failures)
    sys.stdout.write("\n")
    print_table(rows, header=("kernel", "builds", "rel. error vs pure", f"us / launch ({repeats} queued)"))
    bad = [r for r in rows if r[1] != "yes" or float(r[2].split()[0]) > AGREEMENT]
    for message in failures.messages:
        sys.stdout.write(f"\n{message}\n")
    sys.stdout.write(f"\n{len(rows) - len(bad)} of {len(rows)} kernel checks pass (agreement within {AGREEMENT:g}).\n")
