#!/usr/bin/env python3
"""Train (or finish training) the bundled demo model, ship it, and write its report.

    python scripts/train_demo_model.py --run /tmp/demo-run --out OUT

The recipe is the one the shipped file was made with: a 4-layer RWKV-7
(n_embd 256, FFN 1024, LoRA ranks 32/32/32/64, head size 64, the full
65536-token world vocabulary) trained from scratch on Tiny Shakespeare with the
last 10% of its tokens held out: 420 AdamW steps of 8 x 256 tokens (about 2.9
passes), warm-up 20, cosine to 10%, evaluation every 60 steps.  It is exactly

    rwkv-mlx train --data tinyshakespeare.txt --out RUN --shape 4x256 --ranks 32,32,32,64 \
        --seq-len 256 --batch-size 8 --steps 420 --warmup 20 --eval-every 60 --eval-tokens 8192 --seed 0

``--run`` is resumed when it already holds checkpoints of this recipe, so the
script can report on a finished run without training again (the training time
it reports is the run's own, from its log).  On a 2-core x86 CPU the run takes
about 70 minutes when MLX's CPU matrix products go through OpenBLAS (see
docs/training.md); the stock MLX CPU build is about 30x slower at them.

Writes to OUT:
  rwkv7-demo-shakespeare.gguf   the best checkpoint in ``--ship-type`` (Q4_K_M: 27.2 MB)
  demo_model.md                 validation perplexity of the shipped file and of the F16 checkpoint over
                                the whole held-out split, unigram baselines of the same text, the loss
                                curve, training time and device, greedy and sampled text for "ROMEO:"
  demo_model_loss.png           training and validation loss against tokens seen (with matplotlib)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

try:
    import rwkv_mlx  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from rwkv_mlx.backend import device_name  # noqa: E402
from rwkv_mlx.errors import RwkvMlxError  # noqa: E402
from rwkv_mlx.loader.export import export_gguf  # noqa: E402
from rwkv_mlx.text.generate import generate  # noqa: E402
from rwkv_mlx.loader import load  # noqa: E402
from rwkv_mlx.text.sample import SamplingParams  # noqa: E402
from rwkv_mlx.train import TrainConfig, chunked_wkv, perplexity, tokenize_corpus, train, unigram_perplexities  # noqa: E402
from rwkv_mlx.train.data import world_tokenizer  # noqa: E402
from rwkv_mlx.model.weights import LoadOptions  # noqa: E402

SHIP_NAME = "rwkv7-demo-shakespeare.gguf"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PROMPT = "ROMEO:"


RECIPE = dict(
    shape=dict(vocab_size=65536, n_embd=256, n_layer=4, ffn_dim=1024, decay_rank=32, iclr_rank=32,
               value_rank=32, gate_rank=64, head_size=64, norm_eps=1e-5),
    seq_len=256, batch_size=8, steps=420, warmup=20, eval_every=60, eval_tokens=8192, seed=0,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the demo RWKV-7 on Tiny Shakespeare, ship it and write its report.")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--run", type=Path, required=True, help="the training run's folder (resumed if it holds one)")
    ap.add_argument("--out", type=Path, required=True, help="where the shipped file and the report go")
    ap.add_argument("--steps", type=int, default=RECIPE["steps"], help="training steps (default: the recipe's 420)")
    ap.add_argument("--trained-on", default=None,
                    help="the training device, when the run was made elsewhere (default: this machine)")
    ap.add_argument("--ship-type", default="Q4_K_M", help="GGUF type of the shipped file (default Q4_K_M)")
    ap.add_argument("--sample-tokens", type=int, default=200)
    args = ap.parse_args(argv)
    try:
        return run(args, argv)
    except RwkvMlxError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(args, argv) -> int:
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(data=str(args.data), out=str(args.run), **{**RECIPE, "steps": args.steps})
    result = train(cfg, resume=True)
    splits = tokenize_corpus(args.data, world_tokenizer(cfg.shape["vocab_size"]))

    # The shipped file: the best checkpoint (F16, as llama-quantize starts from) in the ship type.
    f16 = args.run / "best.gguf"
    best, tokenizer = load(f16, LoadOptions(float_dtype="float32", affine=False, ggml_native=False))
    ship = args.out / SHIP_NAME
    export_gguf(best, ship, args.ship_type, tokenizer=tokenizer, name="rwkv7-demo-shakespeare")
    report(args, argv, cfg, result, splits, best, tokenizer, ship, t_start)
    return 0


def attempt(what: str, fn, errors: list):
    """Run one reporting step; a failure is recorded in the report instead of losing the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported, and the trained model is already written
        errors.append(f"{what} failed: {type(e).__name__}: {e}")
        print(errors[-1], file=sys.stderr)
        return None


def report(args, argv, cfg, result, splits, best, tokenizer, ship, t_start) -> None:
    errors: list[str] = []
    shipped = attempt("loading the shipped file", lambda: load(ship)[0], errors)
    unigram = unigram_perplexities(splits.train, splits.val, tokenizer.vocab_size)
    val_bytes = len(tokenizer.decode_bytes(splits.val))

    def score(model):  # the whole held-out split as one stream: every token sees all the text before it
        return score_slice(model, splits.val, cfg.seq_len)

    f16_score = attempt("scoring the F16 checkpoint", lambda: score(best), errors)
    ship_score = attempt("scoring the shipped file", lambda: score(shipped), errors) if shipped else None

    def sample(params):
        return PROMPT + generate(shipped, tokenizer, PROMPT, max_tokens=args.sample_tokens, sampling=params)

    # the held-out split is not one text: its quarters show where the model meets a play it never read
    edges = np.linspace(0, len(splits.val), 5).astype(int)
    quarters = attempt("scoring the quarters", lambda: [
        (a, b, score_slice(shipped, splits.val[a:b + 1], cfg.seq_len), tokenizer.decode(list(splits.val[a:a + 12])))
        for a, b in zip(edges[:-1], edges[1:])], errors) if shipped else None

    greedy = attempt("greedy sampling", lambda: sample(SamplingParams.greedy()), errors) if shipped else None
    sampled = attempt("sampling", lambda: sample(SamplingParams(seed=0)), errors) if shipped else None

    def ppl(res, label):
        if res is None:
            return "(not measured: see the errors below)"
        return f"{label}{res.ppl:.2f}{label} (loss {res.nll:.4f} nats/token, {res.tokens:,} tokens)"

    log = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    evals = [e for e in log if "val_loss" in e]
    tokens_at = {e["step"]: e["tokens"] for e in steps}
    speeds = sorted(e["tokens_per_second"] for e in steps)
    plot = attempt("the loss plot", lambda: plot_losses(steps, evals, tokens_at, args.out / "demo_model_loss.png"), errors)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    bpb = f"{ship_score.nll * ship_score.tokens / val_bytes / math.log(2):.3f}" if ship_score else "-"
    shape = cfg.shape
    md = [
        "# The bundled demo model: rwkv7-demo-shakespeare",
        "",
        f"A {shape['n_layer']}-layer RWKV-7 (n_embd {shape['n_embd']}, FFN {shape['ffn_dim']}, LoRA ranks "
        f"{shape['decay_rank']}/{shape['iclr_rank']}/{shape['value_rank']}/{shape['gate_rank']}, head size "
        f"{shape['head_size']}, vocabulary {shape['vocab_size']}) trained from scratch by `rwkv_mlx.train` on Tiny "
        f"Shakespeare ({splits.describe()}; the last 10% of the tokens held out), shipped as {args.ship_type} "
        f"({ship.stat().st_size / 2**20:.1f} MiB).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| validation perplexity, shipped {args.ship_type} | {ppl(ship_score, '**')} |",
        f"| validation perplexity, F16 best checkpoint | {ppl(f16_score, '')} |",
        f"| unigram perplexity, fitted on the training split (add-one) | {unigram['train_add1']:.1f} |",
        f"| unigram perplexity, fitted on the validation split itself (lowest any unigram model reaches) | "
        f"{unigram['val_oracle']:.1f} |",
        f"| bits per byte of validation text (shipped) | {bpb} |",
        f"| shipped checkpoint | step {result.best_step} of {result.steps} (validation loss {result.best_val_loss:.4f} "
        f"on the first {cfg.eval_tokens:,} held-out tokens, {cfg.eval_streams} streams) |",
        f"| training | {steps[-1]['step']} steps of {cfg.batch_size} x {cfg.seq_len} tokens "
        f"({steps[-1]['tokens']:,} tokens, {steps[-1]['tokens'] / len(splits.train):.1f} passes) in "
        f"{steps[-1]['seconds']:.0f} s |",
        f"| throughput | median {speeds[len(speeds) // 2]:,.0f} tokens/s |",
        f"| optimizer | AdamW ({cfg.beta1}, {cfg.beta2}), peak lr {cfg.peak_lr}, warm-up {cfg.warmup} steps, "
        f"cosine to {cfg.final_lr_ratio:g} of the peak, weight decay {cfg.decay}, clip {cfg.grad_clip}, {cfg.dtype} |",
        f"| trained on | {args.trained_on or f'{device_name()} (MLX {mx.__version__}, {platform.system()})'} |",
        f"| measured on | {device_name()} (MLX {mx.__version__}, {platform.system()}) |",
        f"| date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC |",
        f"| command | `{command}` |",
        "",
        "Validation loss during training (first "
        f"{cfg.eval_tokens:,} held-out tokens){'; plot: ' + plot.name if plot else ''}:",
        "",
        "| step | tokens seen | validation loss | perplexity |",
        "|---|---|---|---|",
        *(f"| {e['step']} | {tokens_at.get(e['step'], 0):,} | {e['val_loss']:.4f} | {math.exp(e['val_loss']):.1f} |"
          for e in evals),
        "",
        "Validation perplexity of the shipped file by quarter of the held-out split (each read from a fresh "
        "state). The last quarter is *The Tempest*, a play the training split never reaches: new characters, "
        "new names.",
        "",
        "| held-out tokens | perplexity | begins with |",
        "|---|---|---|",
        *(f"| {a:,}-{b:,} | {r.ppl:.1f} | {json.dumps(text)[1:-1]} |" for a, b, r, text in quarters or []),
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
    (args.out / "demo_model.md").write_text("\n".join(md))
    print("\n".join(md))


def score_slice(model, tokens, seq_len: int):
    with chunked_wkv(model):
        return perplexity(model, tokens, seq_len, streams=1)


def plot_losses(steps, evals, tokens_at, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e["tokens"] for e in steps], [e["loss"] for e in steps], lw=1, label="training (per logged step)")
    ax.plot([tokens_at.get(e["step"], 0) for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("rwkv7-demo-shakespeare")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
