"""``rwkv-mlx train``: train from scratch, fine-tune, LoRA or state-tune on a text file or folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from ..arch import LORA_RANKS
from ..errors import InvalidArgumentError
from .common import DEVICE_OPTION, print_table, select_device


def parse_shape(shape: str, ffn: Optional[int], ranks: Optional[str], vocab_size: int, head_size: int) -> dict:
    """``6x256`` (layers x n_embd) -> ModelArgs fields; LoRA ranks follow RWKV-LM's suggestion unless given."""
    from ..train.init import suggested_args

    try:
        layers, n_embd = (int(p) for p in shape.lower().split("x"))
    except ValueError:
        raise InvalidArgumentError(f"--shape takes LAYERSxN_EMBD (e.g. 6x256), got {shape!r}") from None
    if layers < 1 or n_embd < 1 or n_embd % head_size:
        raise InvalidArgumentError(f"--shape {shape}: n_embd must be a positive multiple of the head size {head_size}")
    args = suggested_args(layers, n_embd, vocab_size, ffn, head_size).to_dict()
    if ranks:
        try:
            values = [int(r) for r in ranks.split(",")]
        except ValueError:
            values = []
        if len(values) != 4 or min(values) < 1:
            raise InvalidArgumentError("--ranks takes four positive integers: decay,iclr,value,gate")
        args.update(zip(LORA_RANKS, values))
    return args


@app.command(help="Train on a text file or a folder of text files: from scratch (--shape), full fine-tuning, LoRA "
                  "or state tuning (--init-from MODEL). Writes checkpoints, a loss log and model.gguf / best.gguf "
                  "(or state.safetensors) under --out; --resume continues an interrupted run.")
def train(
    data: Path = typer.Option(..., "--data", help="Text file, or folder of .txt/.md files (one document each)."),
    out: Path = typer.Option(..., "--out", help="Output folder (checkpoints, log.jsonl, model files)."),
    mode: str = typer.Option("full", "--mode", help="full, lora or state."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Model to start from (GGUF or MLX folder)."),
    shape: Optional[str] = typer.Option(None, "--shape", help="New model LAYERSxN_EMBD, e.g. 6x256 (from scratch)."),
    ffn: Optional[int] = typer.Option(None, "--ffn", help="With --shape: FFN width (default 4 x n_embd)."),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="With --shape: decay,iclr,value,gate LoRA ranks."),
    vocab_size: int = typer.Option(65536, "--vocab-size", help="With --shape: vocabulary (world tokenizer's first ids)."),
    head_size: int = typer.Option(64, "--head-size", help="With --shape: head size."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per training sequence."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 2e-3 scratch, 1e-5 full, "
                                                          "2e-4 lora, 1.0 state)."),
    warmup: int = typer.Option(50, "--warmup", help="Warm-up steps (linear), then cosine decay."),
    steps: int = typer.Option(1000, "--steps", help="Total steps (the cosine ends here)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Fit the schedule into this much time."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, or bfloat16 matrix products."),
    eval_every: int = typer.Option(100, "--eval-every", help="Evaluate on the held-out split every N steps."),
    eval_tokens: int = typer.Option(65536, "--eval-tokens", help="Held-out tokens per evaluation (0: all)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Default: --eval-every."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Last fraction of the tokens held out."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="On matrices (default 0.1 full, 0 else)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the global gradient norm."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="LoRA rank."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA scale numerator (scale = alpha / rank)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Comma list of att.receptance, att.key, "
                                               "att.value, att.output, ffn.key, ffn.value, head (default: all but head)."),
    export_type: str = typer.Option("F16", "--export-type", help="GGUF type of model.gguf / best.gguf."),
    log_every: int = typer.Option(10, "--log-every", help="Write the training loss to log.jsonl every N steps."),
    seed: int = typer.Option(0, "--seed", help="Initialisation, adapters and batch order."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="mx.compile the training step."),
    device: str = DEVICE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    from ..train import TrainConfig
    from ..train import train as run_train

    select_device(device)
    cfg = TrainConfig(
        data=str(data), out=str(out), mode=mode, init_from=str(init_from) if init_from else None,
        shape=parse_shape(shape, ffn, ranks, vocab_size, head_size) if shape else None,
        seq_len=seq_len, batch_size=batch_size, lr=lr, warmup=warmup, steps=steps, max_seconds=max_seconds,
        dtype=dtype, eval_every=eval_every, eval_tokens=eval_tokens, checkpoint_every=checkpoint_every,
        weight_decay=weight_decay, grad_clip=grad_clip, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=lora_targets, seed=seed, val_fraction=val_fraction, export_type=export_type, compile=compile,
        log_every=log_every,
    )
    result = run_train(cfg, resume=resume, quiet=quiet)
    if quiet:
        return
    rows = [
        ("steps", f"{result.steps} ({result.tokens:,} tokens)"),
        ("time", f"{result.seconds:.1f} s"),
        ("last training loss", f"{result.last_loss:.4f}"),
        ("validation loss", f"{result.val_loss:.4f}" if result.val_loss is not None else "-"),
        ("best validation loss", f"{result.best_val_loss:.4f} at step {result.best_step}"
         if result.best_val_loss is not None else "-"),
        *((name, str(path)) for name, path in sorted(result.files.items())),
    ]
    print_table(rows)
