#!/usr/bin/env python3
"""Train the bundled demo model: a small RWKV-7 from scratch on Tiny Shakespeare, in one command.

    python scripts/train_demo_model.py --data tinyshakespeare.txt --out OUT --work /tmp/demo \\
        --max-seconds 300 --quant-quality

Shape: 6 layers, n_embd 256, FFN 1024, LoRA ranks 32/32/32/64 (RWKV-LM's
suggestions for n_embd 256), head size 64, the full 65536-token world
vocabulary.  Data: the text's last 10% of tokens are held out.

A model this size overfits 300k tokens long before a GPU's minutes are up, so
the script makes one run per ``--epochs`` value (default 32, 16, 8 and 4
passes, longest first), each a full warm-up + cosine schedule, shares ``--max-seconds`` among
them in proportion to their epochs (a run that would not fit its share
shortens its schedule to fit, at the speed measured after its first steps),
evaluates on the held-out tokens during each, and ships the checkpoint with
the lowest validation loss of all runs.

Writes to OUT:
  rwkv7-demo-shakespeare.gguf   the best checkpoint in ``--ship-type`` (Q4_K_M: about 28 MB)
  demo_model.md                 validation loss and perplexity (and of unigram models of the same
                                text), training time and device, greedy and sampled text for "ROMEO:"
  train_log.jsonl               the loss log
  quant_quality.md              with --quant-quality: every quantization against the F16 checkpoint
With --split-mib N, files larger than N MiB are also written as numbered
parts (NAME.part00, NAME.part01, ...: ``cat NAME.part* > NAME`` joins them).
Heavy files (checkpoints, the F16 model, quantized variants) stay in --work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

try:
    import rwkv_mlx  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from rwkv_mlx.backend import device_name  # noqa: E402
from rwkv_mlx.errors import RwkvMlxError  # noqa: E402
from rwkv_mlx.export import export_gguf  # noqa: E402
from rwkv_mlx.generate import generate  # noqa: E402
from rwkv_mlx.loader import load  # noqa: E402
from rwkv_mlx.sample import SamplingParams  # noqa: E402
from rwkv_mlx.train import TrainConfig, chunked_wkv, perplexity, tokenize_corpus, train, unigram_perplexities  # noqa: E402
from rwkv_mlx.weights import LoadOptions  # noqa: E402

SHIP_NAME = "rwkv7-demo-shakespeare.gguf"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PROMPT = "ROMEO:"


def split_file(path: Path, mib: float) -> list[Path]:
    """Write ``path`` again as parts of at most ``mib`` MiB (for transports with a file-size limit)."""
    size = int(mib * 2**20)
    parts = []
    with open(path, "rb") as f:
        while chunk := f.read(size):
            part = path.with_name(f"{path.name}.part{len(parts):02d}")
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the demo RWKV-7 on Tiny Shakespeare and write its results.")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, required=True, help="where the deliverables go")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints and large files (default OUT/work)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="training-time budget (default 300)")
    ap.add_argument("--steps", type=int, default=100000, help="at most this many steps per run")
    ap.add_argument("--epochs", default="4,8,16,32",
                    help="comma-separated: one run per value, each a full schedule over that many passes over the "
                         "training tokens; the best by validation loss is shipped (default 4,8,16,32)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--ranks", default="32,32,32,64", help="decay,iclr,value,gate LoRA ranks")
    ap.add_argument("--vocab-size", type=int, default=65536)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--ship-type", default="Q4_K_M", help="GGUF type of the shipped file (default Q4_K_M)")
    ap.add_argument("--sample-tokens", type=int, default=200)
    ap.add_argument("--quant-quality", action="store_true", help="also write quant_quality.md")
    ap.add_argument("--split-mib", type=float, default=0, help="also split output files above this size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    try:
        return run(args, argv)
    except RwkvMlxError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(args, argv) -> int:
    t_start = time.perf_counter()
    out = args.out
    work = args.work or out / "work"
    out.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    shape = dict(vocab_size=args.vocab_size, n_embd=args.n_embd, n_layer=args.layers, ffn_dim=args.ffn,
                 decay_rank=ranks[0], iclr_rank=ranks[1], value_rank=ranks[2], gate_rank=ranks[3],
                 head_size=args.head_size)
    from rwkv_mlx.train.data import world_tokenizer

    splits = tokenize_corpus(args.data, world_tokenizer(args.vocab_size))
    steps_per_epoch = len(splits.train) / (args.batch_size * args.seq_len)
    # longest first: the one-time costs (kernel compilation) land in the run with the largest share
    sweep = sorted((float(e) for e in str(args.epochs).split(",")), reverse=True)
    runs = []
    for i, epochs in enumerate(sweep):
        # each run gets a share of what is left of the budget, in proportion to its epochs
        left = args.max_seconds - sum(r["seconds"] for r in runs)
        budget = left * epochs / sum(sweep[i:])
        steps = max(1, min(args.steps, int(round(epochs * steps_per_epoch))))
        cfg = TrainConfig(
            data=str(args.data), out=str(work / f"run-{i}"), shape=shape, seq_len=args.seq_len,
            batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, max(1, steps // 10)), steps=steps,
            max_seconds=budget, dtype=args.dtype, eval_every=(every := max(10, min(args.eval_every, steps // 20))),
            checkpoint_every=10 * every,
            eval_tokens=0, eval_streams=16, weight_decay=args.weight_decay, seed=args.seed, export_type="F16",
            compile=not args.no_compile, name="rwkv7-demo-shakespeare", log_every=50,
        )
        shutil.rmtree(cfg.out, ignore_errors=True)
        print(f"run {i + 1}/{len(sweep)}: {epochs:g} epochs = {steps} steps, budget {budget:.0f} s", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            result = train(cfg)
        except RwkvMlxError as e:  # a diverged run is reported, not fatal
            print(f"run {i + 1} failed: {e}", file=sys.stderr)
            runs.append(dict(epochs=epochs, steps=0, seconds=time.perf_counter() - t0, best=float("inf"),
                             best_step=None, out=None, error=str(e)))
            continue
        runs.append(dict(epochs=epochs, steps=result.steps, seconds=time.perf_counter() - t0, best=result.best_val_loss,
                         best_step=result.best_step, out=Path(cfg.out), tokens=result.tokens, error=None))
    chosen = min((r for r in runs if r["out"] is not None), key=lambda r: r["best"], default=None)
    if chosen is None:
        raise RwkvMlxError("every training run failed")
    shutil.copy(chosen["out"] / "log.jsonl", out / "train_log.jsonl")

    # The shipped file: the best checkpoint (F16, as llama-quantize starts from) in the ship type.
    f16 = chosen["out"] / "best.gguf"
    best, tokenizer = load(f16, LoadOptions(float_dtype="float32", affine=False, ggml_native=False))
    ship = out / SHIP_NAME
    export_gguf(best, ship, args.ship_type, tokenizer=tokenizer, name="rwkv7-demo-shakespeare")
    try:
        report(args, argv, out, work, splits, runs, chosen, best, tokenizer, ship, f16, t_start)
    finally:  # whatever failed after training, the model comes back
        if args.split_mib:
            for f in list(out.iterdir()):
                if f.is_file() and f.stat().st_size > args.split_mib * 2**20:
                    split_file(f, args.split_mib)
                    f.unlink()
    return 0


def attempt(what: str, fn, errors: list):
    """Run one reporting step; a failure is recorded in the report instead of losing the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported, and the trained model is already written
        errors.append(f"{what} failed: {type(e).__name__}: {e}")
        print(errors[-1], file=sys.stderr)
        return None


def report(args, argv, out, work, splits, runs, chosen, best, tokenizer, ship, f16, t_start) -> None:
    errors: list[str] = []
    shipped = attempt("loading the shipped file", lambda: load(ship)[0], errors)
    unigram = unigram_perplexities(splits.train, splits.val, tokenizer.vocab_size)
    val_bytes = len(tokenizer.decode_bytes(splits.val))

    def score(model):
        with chunked_wkv(model):
            return perplexity(model, splits.val, args.seq_len, streams=1)

    f16_score = attempt("scoring the F16 checkpoint", lambda: score(best), errors)
    ship_score = attempt("scoring the shipped file", lambda: score(shipped), errors) if shipped else None

    def sample(params):
        return PROMPT + generate(shipped, tokenizer, PROMPT, max_tokens=args.sample_tokens, sampling=params)

    greedy = attempt("greedy sampling", lambda: sample(SamplingParams.greedy()), errors) if shipped else None
    sampled = attempt("sampling", lambda: sample(SamplingParams(seed=0)), errors) if shipped else None
    if args.quant_quality:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import quant_quality

        table = attempt("the quantization report",
                        lambda: quant_quality.run(f16, args.data, 0.1, 0, args.seq_len, 1, work=work / "quant")[0],
                        errors)
        if table:
            (out / "quant_quality.md").write_text(table)

    def ppl(result, label):
        if result is None:
            return "(not measured: see the errors below)"
        return f"{label}{result.ppl:.2f}{label} (loss {result.nll:.4f} nats/token, {result.tokens:,} tokens)"

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    speeds = sorted(e["tokens_per_second"] for e in log if "tokens_per_second" in e)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    bpb = (f"{ship_score.nll * ship_score.tokens / val_bytes / math.log(2):.3f}" if ship_score else "-")
    md = [
        "# The bundled demo model: rwkv7-demo-shakespeare",
        "",
        f"A {args.layers}-layer RWKV-7 (n_embd {args.n_embd}, FFN {args.ffn}, LoRA ranks {args.ranks}, head size "
        f"{args.head_size}, vocabulary {args.vocab_size}) trained from scratch by `rwkv_mlx.train` on Tiny "
        f"Shakespeare ({splits.describe()}; the last 10% of the tokens held out), shipped as {args.ship_type} "
        f"({ship.stat().st_size / 2**20:.1f} MiB).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| validation perplexity, shipped {args.ship_type} | {ppl(ship_score, '**')} |",
        f"| validation perplexity, F16 best checkpoint | {ppl(f16_score, '')} |",
        f"| unigram perplexity, fitted on the training split (add-one) | {unigram['train_add1']:.1f} |",
        f"| unigram perplexity, fitted on the validation split itself (lowest possible) | {unigram['val_oracle']:.1f} |",
        f"| bits per byte of validation text (shipped) | {bpb} |",
        f"| shipped checkpoint | step {chosen['best_step']} of the {chosen['epochs']:g}-epoch run "
        f"(validation loss {chosen['best']:.4f} with 16 streams) |",
        f"| training | {len(runs)} run(s), {sum(r['steps'] for r in runs)} steps of {args.batch_size} x "
        f"{args.seq_len} tokens in {sum(r['seconds'] for r in runs):.0f} s |",
        f"| throughput (shipped run) | median {speeds[len(speeds) // 2] if speeds else 0:,.0f} tokens/s |",
        f"| optimizer | AdamW (0.9, 0.99), peak lr {args.lr}, warm-up min({args.warmup}, 10% of the steps), "
        f"cosine to 10%, weight decay {args.weight_decay}, clip 1.0, {args.dtype} |",
        f"| device | {device_name()} (MLX {mx.__version__}, {platform.system()}) |",
        f"| date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC |",
        f"| command | `{command}` |",
        "",
        "Runs (each a warm-up + cosine schedule over its epochs; the run with the lowest validation loss is shipped,",
        "so the shipped figure is selected on the validation split):",
        "",
        "| epochs | steps | seconds | best validation loss | at step |",
        "|---|---|---|---|---|",
        *(f"| {r['epochs']:g} | {r['steps']} | {r['seconds']:.0f} | "
          + (f"{r['best']:.4f} | {r['best_step']} |" if r["error"] is None else f"failed: {r['error']} | |")
          for r in runs),
        "",
        f"Greedy continuation of `{PROMPT}` ({args.sample_tokens} tokens, shipped file):",
        "",
        "```",
        greedy or "(not generated)",
        "```",
        "",
        "Sampled with the CLI defaults (top-p 0.85, presence/frequency penalty 0.2, seed 0):",
        "",
        "```",
        sampled or "(not generated)",
        "```",
        "",
        *(f"- {e}" for e in errors),
        f"Total wall time of the script: {time.perf_counter() - t_start:.0f} s.",
        "",
    ]
    (out / "demo_model.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
