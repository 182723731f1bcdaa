#!/usr/bin/env python3
"""How much each quantization costs a model: perplexity and mean KL divergence against its F16 weights.

    python scripts/quant_quality.py --model rwkv7-demo-F16.gguf --text tinyshakespeare.txt \\
        --tail 0.1 --out results/quant_quality.md

The reference is the F16 file computed in float32.  Every GGUF variant
(Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_NL, Q3_K_M, Q2_K by default) is
written from those weights with rwkv_mlx.formats.gguf_writer -- the per-tensor types
llama-quantize would choose -- and loaded back through rwkv_mlx.load; MLX's
own affine quantization (``mx.quantize``, what mlx-lm ships) is applied to the
same weights for comparison.  All models read the same tokens (by default the
last 10% of the text's tokens, the demo model's held-out split) in one pass; the table
gives perplexity, its change, mean KL(F16 || variant) per token and how often
both models rank the same token first.  Runs on any MLX backend.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

try:
    import rwkv_mlx  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mlx.backend import device_name  # noqa: E402
from rwkv_mlx.errors import RwkvMlxError  # noqa: E402
from rwkv_mlx.loader.export import dense_weight, export_gguf, module_at  # noqa: E402
from rwkv_mlx.layers import WeightFormat  # noqa: E402
from rwkv_mlx.loader import load  # noqa: E402
from rwkv_mlx.model import Model  # noqa: E402
from rwkv_mlx.progress import Progress  # noqa: E402
from rwkv_mlx.train.data import read_text  # noqa: E402
from rwkv_mlx.train.evaluate import chunked_wkv, compare  # noqa: E402
from rwkv_mlx.model.weights import LoadOptions  # noqa: E402

GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K")
MLX_VARIANTS = ((8, 64), (4, 64), (4, 32))  # (bits, group size): mlx-lm's q8 and q4 defaults, and q4 at group 32


def mlx_requantized(model: Model, bits: int, group_size: int) -> Model:
    """``model`` with every matrix (embedding and head included) through ``mx.quantize`` (affine)."""
    fmt = WeightFormat("affine", "float32", bits=bits, group_size=group_size)
    formats = {path: fmt for path in model.formats}
    quantized = Model(model.args, formats)
    weights = []
    for path, value in _flat(model.parameters()):
        layer = path.rsplit(".", 1)[0]
        if layer in formats:
            if path.endswith(".weight"):
                wq, scales, biases = mx.quantize(dense_weight(module_at(model, layer)), group_size, bits)
                weights += [(layer + ".weight", wq), (layer + ".scales", scales), (layer + ".biases", biases)]
        else:
            weights.append((path, value))
    quantized.load_weights(weights, strict=True)
    mx.eval(quantized.parameters())
    return quantized


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def matrix_bits_per_weight(model: Model) -> float:
    """Bits per weight of the affine matrices as mlx-lm stores them (16-bit scale and bias per group)."""
    bits = weights = 0
    for path, fmt in model.formats.items():
        scales = module_at(model, path).scales
        weights += scales.size * fmt.group_size
        bits += scales.size * (fmt.group_size * fmt.bits + 32)
    return bits / weights


def run(model_path: Path, text_path: Path, tail: float, max_tokens: int, seq_len: int, streams: int,
        types=GGUF_TYPES, work: Path | None = None, quiet: bool = False) -> tuple[str, list[dict]]:
    """Measure every variant; returns (markdown report, rows)."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    exact = LoadOptions(float_dtype="float32", affine=False, ggml_native=False)
    reference, tokenizer = load(model_path, exact)
    tokens = tokenizer.encode(read_text(text_path))
    tokens = tokens[len(tokens) - int(round(len(tokens) * tail)):]  # the training split's held-out tokens
    tokens = tokens[: max_tokens + 1 if max_tokens else None]
    say(f"scoring {len(tokens) - 1} tokens of {text_path.name} with {model_path.name} and its variants")

    names, models, sizes = [], [], []
    with contextlib.ExitStack() as stack:
        folder = work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rwkv-quant-")))
        folder.mkdir(parents=True, exist_ok=True)
        n_weights = sum(v.size for _, v in _flat(reference.parameters()))
        for t in types:
            t0 = time.perf_counter()
            path = folder / f"{model_path.stem}-{t}.gguf"
            export_gguf(reference, path, t, tokenizer=tokenizer)
            model, _ = load(path, LoadOptions.for_backend())
            names.append(f"GGUF {t}")
            models.append(model)
            sizes.append(f"{path.stat().st_size / 2**20:.1f} MiB, {path.stat().st_size * 8 / n_weights:.2f} bpw")
            say(f"  {t}: written and loaded in {time.perf_counter() - t0:.1f} s")
        for bits, group in MLX_VARIANTS:
            model = mlx_requantized(reference, bits, group)
            names.append(f"MLX affine {bits}-bit g{group}")
            models.append(model)
            sizes.append(f"matrices {matrix_bits_per_weight(model):.2f} bpw")

        for m in (reference, *models):
            stack.enter_context(chunked_wkv(m))
        bar = Progress("scoring", 1, " pieces", enabled=not quiet)
        t0 = time.perf_counter()
        results = compare(reference, models, tokens, seq_len, streams,
                          progress=lambda d, n: (setattr(bar, "total", n), bar.update(d)))
        bar.close()
    seconds = time.perf_counter() - t0

    ref_ppl = results[0].ref_ppl if results else float("nan")
    rows = [dict(variant="F16 (reference)", size=f"{model_path.stat().st_size / 2**20:.1f} MiB", ppl=ref_ppl,
                 delta=0.0, kl=0.0, top1=1.0)]
    for name, size, r in zip(names, sizes, results):
        rows.append(dict(variant=name, size=size, ppl=r.ppl, delta=100 * (r.ppl / ref_ppl - 1), kl=r.kl, top1=r.top1))
    n_tokens = results[0].tokens if results else 0
    lines = [
        f"# Quantization quality: {model_path.name}",
        "",
        f"Held-out text: the last {tail:.0%} of the tokens of `{text_path.name}`, {n_tokens:,} scored "
        f"({streams} stream(s), pieces of {seq_len} tokens, state carried). Reference: the F16 file computed in "
        "float32. KL is the mean KL(F16 || variant) in nats per token; top-1 is the share of positions where the "
        "variant ranks the same token first as F16. GGUF variants are written by `rwkv_mlx.formats.gguf_writer` with "
        "llama-quantize's per-tensor types; MLX variants quantize every matrix (embedding and head too) "
        "with `mx.quantize` (sizes count 16-bit scales and biases).",
        "",
        "| variant | size | perplexity | change | mean KL | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['size']} | {r['ppl']:.3f} | {r['delta']:+.2f}% | {r['kl']:.5f} | "
                     f"{100 * r['top1']:.2f}% |")
    lines += ["", f"Device: {device_name()}; scoring took {seconds:.1f} s; "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", ""]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Perplexity and KL divergence of quantized variants against F16.")
    ap.add_argument("--model", type=Path, required=True, help="the F16 (or F32) GGUF file: the reference")
    ap.add_argument("--text", type=Path, required=True, help="text to score")
    ap.add_argument("--tail", type=float, default=0.1,
                    help="score only the last fraction of the text's tokens (default 0.1: the demo's held-out split)")
    ap.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens (0: all)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--streams", type=int, default=1, help="rows scored side by side (1: exact full context)")
    ap.add_argument("--types", default=",".join(GGUF_TYPES), help="GGUF file types to measure")
    ap.add_argument("--work", type=Path, default=None, help="keep the variant files here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: stdout)")
    args = ap.parse_args(argv)
    try:
        types = tuple(t.strip() for t in args.types.split(",") if t.strip())
        report, _ = run(args.model, args.text, args.tail, args.max_tokens, args.seq_len, args.streams, types,
                         args.work)
    except RwkvMlxError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.out:
        tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        tmp.write_text(report)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
