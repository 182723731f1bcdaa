"""Write an RWKV-7 GGUF of any shape with seeded random weights, in llama.cpp's layout.

Tests, fixtures and scripts/make_synthetic_model.py (the command line) all use this module.

Default shape = rwkv7-g1b-2.9b: 32 layers, n_embd 2560, ffn 10240, LoRA ranks
decay/iclr/value/gate 96/96/64/320, vocab 65536 (the full world vocabulary), head size 64.

    python scripts/make_synthetic_model.py --out /tmp/syn-2.9b-Q4_K_M.gguf --type Q4_K_M
    python scripts/make_synthetic_model.py --out tiny.gguf --type F16 --layers 2 --n-embd 256 \\
        --ffn 1024 --ranks 32,32,16,64 --vocab 4096

Weights follow the statistics of the oracle fixtures (which llama.cpp runs with logits of
rms about 3 and where every component of the block matters):

  token_embd N(0, 0.5)            norms: weight 1 + N(0, 0.1), bias N(0, 0.1)
  lerp_fused, channel_mix_lerp_k  U(0, 1)
  w0 U(-6, 1.5)  (decay from w0 alone spread over 0.61..0.998)
  w1, a1, v1, g1, key, value, receptance, channel_mix_key   N(0, 1/sqrt(fan_in))
  w2 N(0, 1.5/sqrt(Dw)), a2/v2 N(0, 0.5/sqrt(rank)), g2 N(0, 1/sqrt(Dg))
  time_mix_output N(0, 0.5/sqrt(C)), channel_mix_value N(0, 0.5/sqrt(F)), output N(0, 3/sqrt(C))
  a0, v0 U(-1, 1); k_k U(0.5, 1.2); k_a U(0.5, 1.5); r_k N(0, 0.1); ln_x weight U(0.5, 1.5), bias N(0, 0.1)
  layer 0 v0/v1/v2 = copies of a0/a1/a2 (as llama.cpp's converter writes them)

Every tensor has its own random stream (seed, tensor name, row block), so values do not
depend on the order tensors are written in (converter vs llama-quantize order) or on the
number of threads.  Tensors are produced lazily, one at a time, so the 2.9B model needs
about one float32 tensor of memory (the 65536 x 2560 embedding: 0.7 GB) plus the encoder's
chunks.

Measured on the 2-core development machine for the 2.9B shape (2.948 B parameters),
written to /tmp (wall time; the machine was shared, CPU time in brackets):

  Q4_K_M  1.75 GiB   66 s (111 s CPU)   peak RSS 0.87 GB
  Q8_0    3.03 GiB   43 s  (49 s CPU)   peak RSS 1.07 GB
  F16     5.53 GiB   50 s  (45 s CPU)   peak RSS 1.40 GB
  Q6_K    2.39 GiB   56 s  (94 s CPU)   peak RSS 0.89 GB
  IQ4_XS  1.67 GiB   68 s (117 s CPU)   peak RSS 0.89 GB
  Q2_K    1.16 GiB  155 s (125 s CPU; the machine was busy)

Most of the time goes to the K/IQ encoders and the Gaussian generator (2 threads each).
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..arch import LAYER0_COPIES, ModelArgs, check_model_args, gguf_tensor_shapes
from ..errors import RwkvMlxError
from ..formats.gguf_writer import FILE_TYPES, write_rwkv7_gguf

DEFAULT_VOCAB = 65536
G1B_2_9B = ModelArgs(vocab_size=DEFAULT_VOCAB, n_layer=32, n_embd=2560, ffn_dim=10240, decay_rank=96, iclr_rank=96,
                     value_rank=64, gate_rank=320, head_size=64)
# rwkv7-g1 7.2B; LoRA ranks by RWKV-7's rule max(32, round(f * C^p / 32) * 32): decay and iclr
# f 1.8 p 0.5, value f 1.3 p 0.5, gate f 0.6 p 0.8 (the rule also gives 2.9B's 96/96/64/320)
G1_7_2B = ModelArgs(vocab_size=DEFAULT_VOCAB, n_layer=32, n_embd=4096, ffn_dim=16384, decay_rank=128, iclr_rank=128,
                    value_rank=96, gate_rank=480, head_size=64)
_BLOCK_ELEMS = 1 << 21  # elements per independently seeded block of a tensor
_pool: ThreadPoolExecutor | None = None


def synthetic_args(
    n_layer: int = G1B_2_9B.n_layer,
    n_embd: int = G1B_2_9B.n_embd,
    ffn: int = G1B_2_9B.ffn_dim,
    ranks: tuple[int, int, int, int] = (96, 96, 64, 320),
    head_size: int = 64,
    norm_eps: float = 1e-5,
    vocab: int = DEFAULT_VOCAB,
) -> ModelArgs:
    """A model shape: ``ranks`` = (decay, iclr, value, gate) LoRA ranks."""
    dw, da, dv, dg = ranks
    args = ModelArgs(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, ffn_dim=ffn, decay_rank=dw, iclr_rank=da,
                     value_rank=dv, gate_rank=dg, head_size=head_size, norm_eps=norm_eps)
    check_model_args(args)
    return args


def _recipe(name: str, shape: tuple[int, ...], args: ModelArgs) -> tuple[str, float, float]:
    """(distribution, a, b): ("normal", mean, std) or ("uniform", low, high) for one tensor."""
    C, F = args.n_embd, args.ffn_dim
    fan_in = shape[-1]
    base = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if base == "token_embd.weight":
        return "normal", 0.0, 0.5
    if base == "output.weight":
        return "normal", 0.0, 3.0 / np.sqrt(C)
    if base in ("token_embd_norm.weight", "output_norm.weight", "attn_norm.weight", "attn_norm_2.weight"):
        return "normal", 1.0, 0.1
    if base.endswith(".bias"):
        return "normal", 0.0, 0.1
    table = {
        "time_mix_lerp_fused.weight": ("uniform", 0.0, 1.0),
        "channel_mix_lerp_k.weight": ("uniform", 0.0, 1.0),
        "time_mix_w0.weight": ("uniform", -6.0, 1.5),
        "time_mix_w2.weight": ("normal", 0.0, 1.5 / np.sqrt(fan_in)),
        "time_mix_a0.weight": ("uniform", -1.0, 1.0),
        "time_mix_v0.weight": ("uniform", -1.0, 1.0),
        "time_mix_a2.weight": ("normal", 0.0, 0.5 / np.sqrt(fan_in)),
        "time_mix_v2.weight": ("normal", 0.0, 0.5 / np.sqrt(fan_in)),
        "time_mix_k_k.weight": ("uniform", 0.5, 1.2),
        "time_mix_k_a.weight": ("uniform", 0.5, 1.5),
        "time_mix_r_k.weight": ("normal", 0.0, 0.1),
        "time_mix_ln.weight": ("uniform", 0.5, 1.5),
        "time_mix_output.weight": ("normal", 0.0, 0.5 / np.sqrt(C)),
        "channel_mix_value.weight": ("normal", 0.0, 0.5 / np.sqrt(F)),
    }
    if base in table:
        return table[base]
    # w1, a1, v1, g1, g2, key, value, receptance, channel_mix_key: unit gain
    return "normal", 0.0, 1.0 / np.sqrt(fan_in)


def _generate(seed: int, name: str, shape: tuple[int, ...], recipe: tuple[str, float, float]) -> np.ndarray:
    global _pool
    kind, a, b = recipe
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(-1)
    key = zlib.crc32(name.encode())
    starts = list(range(0, flat.size, _BLOCK_ELEMS))

    def fill(k: int) -> None:
        part = flat[starts[k] : starts[k] + _BLOCK_ELEMS]
        rng = np.random.default_rng([seed, key, k])
        if kind == "normal":
            rng.standard_normal(out=part, dtype=np.float32)
            part *= np.float32(b)
            part += np.float32(a)
        else:
            rng.random(out=part, dtype=np.float32)
            part *= np.float32(b - a)
            part += np.float32(a)

    if len(starts) > 1:
        if _pool is None:
            _pool = ThreadPoolExecutor(2, thread_name_prefix="rwkv-mlx-synth")
        list(_pool.map(fill, range(len(starts))))
    else:
        fill(0)
    return out


def value_source(name: str) -> str:
    """The tensor whose values ``name`` carries: layer 0's v0/v1/v2 copy a0/a1/a2, as llama.cpp writes them."""
    rest = name.removeprefix("blk.0.")
    return f"blk.0.{LAYER0_COPIES[rest]}" if name.startswith("blk.0.") and rest in LAYER0_COPIES else name


def synthetic_tensors(args: ModelArgs, seed: int = 0) -> dict[str, Callable[[], np.ndarray]]:
    """GGUF tensor name -> zero-argument callable producing its float32 values (numpy shape)."""
    shapes = gguf_tensor_shapes(args)
    out: dict[str, Callable[[], np.ndarray]] = {}
    for name, shape in shapes.items():
        src = value_source(name)
        recipe = _recipe(src, shapes[src], args)
        out[name] = (lambda s=src, sh=shapes[src], r=recipe: _generate(seed, s, sh, r))
    return out


def make_synthetic_model(
    out: str | Path,
    file_type: str = "Q4_K_M",
    args: ModelArgs | None = None,
    seed: int = 0,
    name: str | None = None,
    tokens=None,
    progress: Callable[[int, int, str, str], None] | None = None,
):
    """Write the synthetic model; returns the per-tensor GGML types."""
    args = args or G1B_2_9B
    label = name or f"rwkv7 synthetic L{args.n_layer} C{args.n_embd} seed {seed}"
    return write_rwkv7_gguf(out, args, synthetic_tensors(args, seed), file_type, tokens=tokens, name=label,
                            progress=progress)


def _parse_ranks(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("--ranks takes four integers: decay,iclr,value,gate (e.g. 96,96,64,320)")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write an RWKV-7 GGUF with seeded random weights in llama.cpp's layout "
        "(default shape: rwkv7-g1b-2.9b).",
    )
    ap.add_argument("--out", required=True, help="output .gguf path")
    ap.add_argument("--type", default="Q4_K_M", choices=list(FILE_TYPES), help="file type (default Q4_K_M)")
    ap.add_argument("--layers", type=int, default=G1B_2_9B.n_layer)
    ap.add_argument("--n-embd", type=int, default=G1B_2_9B.n_embd)
    ap.add_argument("--ffn", type=int, default=G1B_2_9B.ffn_dim)
    ap.add_argument("--ranks", type=_parse_ranks, default=(96, 96, 64, 320), help="decay,iclr,value,gate LoRA ranks")
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="vocabulary size (token list truncated or padded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="general.name (default describes the shape and seed)")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    last = [0.0]

    def progress(i: int, n: int, tname: str, ttype: str) -> None:
        now = time.perf_counter() - t0
        if i == n or now - last[0] >= 2.0:
            last[0] = now
            print(f"[{i:4d}/{n}] {now:7.1f}s  {tname} ({ttype})", flush=True)

    try:
        shape = synthetic_args(args.layers, args.n_embd, args.ffn, args.ranks, args.head_size, vocab=args.vocab)
        n_params = sum(int(np.prod(s)) for s in gguf_tensor_shapes(shape).values())
        if not args.quiet:
            print(f"writing {args.out}: {args.type}, {n_params / 1e9:.3f} B parameters, "
                  f"L={shape.n_layer} C={shape.n_embd} F={shape.ffn_dim} ranks={args.ranks} vocab={args.vocab} "
                  f"seed={args.seed}", flush=True)
        make_synthetic_model(args.out, args.type, shape, args.seed, args.name,
                             progress=None if args.quiet else progress)
    except RwkvMlxError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    if not args.quiet:
        size = Path(args.out).stat().st_size
        print(f"done: {args.out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0

