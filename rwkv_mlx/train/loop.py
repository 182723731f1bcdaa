"""The training loop: AdamW, warm-up and cosine decay, clipping, evaluation, checkpoints, resume.

Three modes share it:

* ``full``  -- every weight trains (a model from scratch, or a dense float32
  copy of a GGUF file);
* ``lora``  -- the model stays frozen as loaded (quantized or not) and
  low-rank adapters on its matrices train (``lora.py``);
* ``state`` -- the model stays frozen and only the initial WKV state of each
  layer trains (state tuning): what it learns is a prompt, without tokens.

Everything a run writes lives under its output folder::

    config.json           the run's settings (a resumed run reads them back)
    log.jsonl             one line per logged step and per evaluation
    checkpoints/step-N/   trainable weights, optimizer state and progress: resume point
    model.gguf, best.gguf the model at the last checkpoint / best validation loss
                          (full and lora: adapters merged), readable by generate and convert
    state.safetensors, best-state.safetensors   the trained state (state mode)

Batches are a pure function of (seed, step) (``data.batch_at``), the
learning rate a pure function of the step, and the optimizer state is saved
whole, so a resumed run continues the uninterrupted loss curve.  An interrupt
(Ctrl-C) saves a checkpoint at the last finished step before it stops.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..errors import InvalidArgumentError, ModelFileError
from ..io import atomic_write
from ..loader.export import export_gguf, export_state
from ..arch import GLOBAL_MATRICES, MATRIX_MODULES, ModelArgs
from ..progress import Progress
from ..model.state import State
from . import data as data_mod
from .evaluate import chunked_wkv, perplexity
from .init import init_model
from .lora import apply_lora, lora_parameters, parse_targets

MODES = ("full", "lora", "state")
DTYPES = ("float32", "bfloat16")
#: Peak learning rates by mode (from scratch, fine-tuning all weights, adapters, the state).
DEFAULT_LR = {"scratch": 2e-3, "full": 1e-5, "lora": 2e-4, "state": 1.0}


@dataclass
class TrainConfig:
    """Settings of one run (saved as config.json)."""

    data: str
    out: str
    mode: str = "full"
    init_from: str | None = None  # GGUF file or MLX folder; None: a new model of ``shape``
    shape: dict | None = None  # ModelArgs fields, for a model trained from scratch
    seq_len: int = 512
    batch_size: int = 8
    lr: float | None = None  # None: DEFAULT_LR for the mode
    final_lr_ratio: float = 0.1  # the cosine ends at lr * final_lr_ratio
    warmup: int = 50
    steps: int = 1000
    max_seconds: float | None = None  # the run fits its schedule into this much training time
    dtype: str = "float32"  # matrix products in bfloat16 (weights and optimizer stay float32)
    eval_every: int = 100
    eval_tokens: int = 65536  # validation tokens per evaluation (0: all)
    eval_streams: int = 8
    checkpoint_every: int | None = None  # None: eval_every
    weight_decay: float | None = None  # None: 0.1 for full, 0 otherwise (matrices only)
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    export_type: str = "F16"
    compile: bool = True
    log_every: int = 10
    name: str = "rwkv7 trained with rwkv-mlx"

    def validate(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise InvalidArgumentError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.mode != "full" and not self.init_from:
            raise InvalidArgumentError(f"--mode {self.mode} adapts an existing model: give --init-from MODEL")
        if self.init_from and self.shape:
            raise InvalidArgumentError("give either --init-from (fine-tune) or --shape (from scratch), not both")
        if not self.init_from and not self.shape:
            raise InvalidArgumentError("give --init-from MODEL to fine-tune or --shape to train from scratch")
        for name in ("seq_len", "batch_size", "steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.grad_clip <= 0 or not 0 < self.final_lr_ratio <= 1:
            raise InvalidArgumentError("warmup must be >= 0, grad clip > 0 and the final lr ratio in (0, 1]")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise InvalidArgumentError(f"--max-seconds must be positive, got {self.max_seconds}")
        return self

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR["scratch" if self.shape else self.mode]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.1 if self.mode == "full" else 0.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def learning_rate(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then a cosine down to peak * final_lr_ratio at ``total``."""
    peak = cfg.peak_lr
    if step < cfg.warmup:
        return peak * (step + 1) / (cfg.warmup + 1)
    span = max(1, total - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = peak * cfg.final_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TunableState(nn.Module):
    """The trainable initial WKV state of each layer (state tuning); token shifts start at zero."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wkv = [mx.zeros((args.n_head, args.head_size, args.head_size)) for _ in range(args.n_layer)]

    def initial_state(self, batch_size: int = 1) -> State:
        zero = State.zeros(self.args, batch_size)
        wkv = [mx.broadcast_to(w[None], (batch_size, *w.shape)) for w in self.wkv]
        return State(zero.att_x, zero.ffn_x, wkv)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    last_loss: float
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this call


# -- building the run ------------------------------------------------------------------


def load_base(path: str, mode: str):
    """The model to adapt: dense float32 for full fine-tuning, as stored for lora/state."""
    from ..loader import load
    from ..model.weights import LoadOptions

    if mode == "full":
        opts = LoadOptions(float_dtype="float32", affine=False, ggml_native=False)
    else:
        opts = LoadOptions.for_backend()
    return load(path, opts)


def build_model(cfg: TrainConfig):
    """(model, tokenizer, trainable module) for the run's mode."""
    if cfg.shape:
        args = ModelArgs.from_dict(cfg.shape)
        tokenizer = data_mod.world_tokenizer(args.vocab_size)
        model = init_model(args, seed=cfg.seed)
    else:
        model, tokenizer = load_base(cfg.init_from, cfg.mode)
    if cfg.mode == "full":
        model.unfreeze()
        target = model
    elif cfg.mode == "lora":
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, parse_targets(cfg.lora_targets), seed=cfg.seed)
        target = model
    else:
        model.freeze()
        target = TunableState(model.args)
    if cfg.dtype == "bfloat16" and cfg.mode != "full":
        # frozen weights need no float32 master copy: store them in bfloat16 once
        model.update(tree_map_with_path(lambda p, a: a.astype(mx.bfloat16) if _is_matrix(p, a) else a,
                                        model.parameters()))
    model.train(True)  # the differentiable (chunked) WKV path
    mx.eval(model.parameters(), target.parameters())
    return model, tokenizer, target


_MATRIX_PARENTS = (*GLOBAL_MATRICES, *MATRIX_MODULES)


def _is_matrix(path: str, a: mx.array) -> bool:
    """A big matrix (embedding, head, projection; an adapted layer's frozen base too)."""
    if a.ndim != 2 or a.dtype != mx.float32 or not path.endswith(".weight"):
        return False
    layer = path[: -len(".weight")]
    return layer.removesuffix(".base").endswith(_MATRIX_PARENTS)


def _decayed(path: str, a: mx.array) -> bool:
    """RWKV-LM's weight-decay group: the 2-D ``.weight`` matrices (embedding, head, projections)."""
    return path.endswith(".weight") and a.ndim == 2


def make_optimizer(cfg: TrainConfig):
    def adamw(wd):
        return optim.AdamW(learning_rate=cfg.peak_lr, betas=[cfg.beta1, cfg.beta2], eps=1e-8,
                           weight_decay=wd, bias_correction=True)

    if cfg.decay > 0:
        return optim.MultiOptimizer([adamw(cfg.decay), adamw(0.0)], [_decayed])
    return adamw(0.0)


def make_step(model, target, optimizer, cfg: TrainConfig) -> Callable:
    """step(inputs, targets) -> (loss, grad norm), updating ``target`` and the optimizer in place."""
    tunable = target if isinstance(target, TunableState) else None
    bf16 = cfg.dtype == "bfloat16" and cfg.mode == "full"

    def loss_of(params, x, y):
        if bf16:  # autocast: products in bfloat16, gradients flow back to the float32 masters
            params = tree_map_with_path(lambda p, a: a.astype(mx.bfloat16) if _is_matrix(p, a) else a, params)
        target.update(params)
        state = tunable.initial_state(x.shape[0]) if tunable is not None else None
        logits, _ = model(x, state)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    value_and_grad = mx.value_and_grad(loss_of)

    def step(x, y):
        params = target.trainable_parameters()
        loss, grads = value_and_grad(params, x, y)
        target.update(params)  # the float32 masters, whatever the forward used
        grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(target, grads)
        return loss, norm

    if not cfg.compile:
        return step  # target.update invalidates the model's decode runtime on every step
    tracked = [model.state, optimizer.state] + ([target.state] if tunable is not None else [])
    compiled = mx.compile(step, inputs=tracked, outputs=tracked)

    def compiled_step(x, y):
        # a compiled step writes the new weights back without calling update: the
        # decode runtime's plans and compiled graphs are stale after it
        out = compiled(x, y)
        model.runtime.invalidate()
        return out

    return compiled_step


# -- checkpoints -------------------------------------------------------------------------


def trainable_arrays(target) -> dict[str, mx.array]:
    if isinstance(target, TunableState):
        return {f"wkv.{i}": w for i, w in enumerate(target.wkv)}
    flat = dict(tree_flatten(target.trainable_parameters()))
    lora = lora_parameters(target)
    return lora if lora else flat


def _save_tree(path: Path, arrays: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), arrays)


def save_checkpoint(out: Path, step: int, target, optimizer, progress: dict, keep: int = 1) -> Path:
    """Write checkpoints/step-N (progress.json last: a folder without it is incomplete)."""
    root = out / "checkpoints"
    folder = root / f"step-{step:07d}"
    root.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder, directory=True) as tmp:
        _save_tree(tmp / "trainable.safetensors", trainable_arrays(target))
        _save_tree(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        (tmp / "progress.json").write_text(json.dumps({**progress, "step": step}, indent=2))
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def complete_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "progress.json").is_file())


def restore_checkpoint(folder: Path, target, optimizer) -> dict:
    try:
        arrays = mx.load(str(folder / "trainable.safetensors"))
        opt_state = mx.load(str(folder / "optimizer.safetensors"))
        progress = json.loads((folder / "progress.json").read_text())
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(folder, f"unreadable checkpoint ({e})") from None
    if isinstance(target, TunableState):
        target.wkv = [arrays[f"wkv.{i}"] for i in range(len(target.wkv))]
    else:
        target.load_weights(list(arrays.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    optimizer.init(target.trainable_parameters())
    mx.eval(target.parameters(), optimizer.state)
    return progress


# -- the loop ----------------------------------------------------------------------------


class _Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **entry) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _prepare_out(cfg: TrainConfig, resume: bool) -> tuple[TrainConfig, int | None]:
    """Check the output folder against the run; returns the config and, when resuming, the run's new total steps.

    Resuming keeps the checkpoint's schedule unless ``--steps`` differs from the run's: then the
    run is extended (or shortened) to that many steps, the cosine stretched from the step reached.
    A run that has nothing left to do is refused before anything is written.
    """
    out = Path(cfg.out)
    saved = out / "config.json"
    total = None
    if resume and saved.is_file():
        old = TrainConfig.from_dict(json.loads(saved.read_text()))
        for key in ("mode", "init_from", "shape", "seq_len", "batch_size", "seed", "data", "lora_rank", "lora_targets"):
            if getattr(old, key) != getattr(cfg, key):
                raise InvalidArgumentError(f"--resume: {key} differs from the run in {out} "
                                           f"({getattr(old, key)!r} there, {getattr(cfg, key)!r} now)")
        checkpoints = complete_checkpoints(out)
        if checkpoints:
            try:
                progress = json.loads((checkpoints[-1] / "progress.json").read_text())
                step, total = int(progress["step"]), int(progress["total"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelFileError(checkpoints[-1] / "progress.json", f"unreadable ({e})") from None
            total = cfg.steps if cfg.steps != old.steps else total
            if total <= step:
                raise InvalidArgumentError(
                    f"--resume: the run in {out} is complete at step {step}"
                    f"{f' (--steps {cfg.steps})' if cfg.steps != old.steps else ''}; "
                    f"pass --steps N with N > {step} to extend it")
    elif not resume and complete_checkpoints(out):
        raise InvalidArgumentError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not complete_checkpoints(out):  # a fresh start: no stale log lines from an earlier attempt
        (out / "log.jsonl").unlink(missing_ok=True)
    saved.write_text(cfg.to_json())
    return cfg, total


def train(cfg: TrainConfig, *, resume: bool = False, on_step: Callable[[int, float], None] | None = None,
          quiet: bool = False) -> TrainResult:
    """Run (or continue, with ``resume``) the training ``cfg`` describes."""
    cfg, resume_total = _prepare_out(cfg.validate(), resume)
    out = Path(cfg.out)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    mx.random.seed(cfg.seed)

    model, tokenizer, target = build_model(cfg)
    splits = data_mod.tokenize_corpus(cfg.data, tokenizer, cfg.val_fraction)
    data_mod.check_enough(splits.train, cfg.seq_len, "training")
    val = splits.val[: cfg.eval_tokens] if cfg.eval_tokens else splits.val
    say(f"data: {splits.describe()}")

    optimizer = make_optimizer(cfg)
    optimizer.init(target.trainable_parameters())
    n_params = sum(a.size for _, a in tree_flatten(target.trainable_parameters()))
    say(f"model: {model.args.n_layer} layers, n_embd {model.args.n_embd}, mode {cfg.mode}, "
        f"{n_params:,} trainable parameters")

    start, total, elapsed, best, best_step, tokens_seen = 0, cfg.steps, 0.0, None, None, 0
    checkpoints = complete_checkpoints(out) if resume else []
    if checkpoints:
        progress = restore_checkpoint(checkpoints[-1], target, optimizer)
        start, total, elapsed = progress["step"], progress["total"], progress["elapsed"]
        best, best_step, tokens_seen = progress.get("best"), progress.get("best_step"), progress.get("tokens", 0)
        say(f"resumed from {checkpoints[-1]} at step {start}"
            + (f"; the run now ends at step {resume_total} (was {total}), the cosine stretched from here"
               if resume_total not in (None, total) else ""))
        total = resume_total or total
    step_fn = make_step(model, target, optimizer, cfg)
    tunable_state = (lambda: target.initial_state(1)) if isinstance(target, TunableState) else (lambda: None)

    log = _Log(out / "log.jsonl")
    files: dict[str, Path] = {}
    losses: list[float] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    every_ckpt = cfg.checkpoint_every or cfg.eval_every
    bar = Progress("train", total, " steps", enabled=not quiet)
    if not quiet:  # evaluations and notes go above the progress line, never into it
        say = bar.print_above
    step_times: list[float] = []
    eval_seconds, val_loss, loss = 0.0, None, float("nan")
    last_eval = None
    best_params: list = []  # the trainable arrays at the best evaluation not yet written

    def evaluate(step: int) -> float:
        nonlocal eval_seconds, best, best_step, last_eval
        last_eval = step
        t0 = time.perf_counter()
        with chunked_wkv(model):
            result = perplexity(model, val, cfg.seq_len, cfg.eval_streams, tunable_state())
        eval_seconds = time.perf_counter() - t0
        improved = best is None or result.nll < best
        log.write(step=step, val_loss=result.nll, val_ppl=result.ppl, val_tokens=result.tokens,
                  eval_seconds=round(eval_seconds, 3))
        say(f"step {step}: validation loss {result.nll:.4f}, perplexity {result.ppl:.2f} "
            f"({result.tokens} tokens, {eval_seconds:.1f} s){' *' if improved else ''}")
        if improved:
            best, best_step = result.nll, step
            best_params[:] = [target.trainable_parameters()]  # arrays are values: a reference is a snapshot
        return result.nll

    def checkpoint(step: int) -> None:
        progress = dict(total=total, elapsed=elapsed, best=best, best_step=best_step, tokens=tokens_seen)
        save_checkpoint(out, step, target, optimizer, progress)
        files.update(write_model_files(model, target, tokenizer, out, cfg, best=False))
        if best_params:  # improved since the last checkpoint: write the best model too
            current = target.trainable_parameters()
            target.update(best_params.pop())
            files.update(write_model_files(model, target, tokenizer, out, cfg, best=True))
            target.update(current)

    step = start
    try:
        while step < total:
            if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                say(f"time budget of {cfg.max_seconds:.0f} s reached at step {step}")
                break
            lr = learning_rate(step, total, cfg)
            optimizer.learning_rate = lr
            x, y = data_mod.batch_at(splits.train, step, cfg.batch_size, cfg.seq_len, cfg.seed)
            t0 = time.perf_counter()
            loss_arr, norm_arr = step_fn(mx.array(x), mx.array(y))
            mx.eval(loss_arr, norm_arr, target.parameters(), optimizer.state)
            dt = time.perf_counter() - t0
            elapsed += dt
            step += 1
            tokens_seen += tokens_per_step
            loss = loss_arr.item()
            losses.append(loss)
            if not math.isfinite(loss):
                raise InvalidArgumentError(f"training diverged at step {step} (loss {loss}): lower --lr")
            step_times.append(dt)
            if step % cfg.log_every == 0 or step == total:
                log.write(step=step, loss=loss, lr=lr, grad_norm=norm_arr.item(), tokens=tokens_seen,
                          seconds=round(elapsed, 3), tokens_per_second=round(tokens_per_step / dt))
                if not bar.tty and not quiet:
                    say(f"step {step}/{total} loss {loss:.4f} lr {lr:.2e} {tokens_per_step / dt:,.0f} tok/s")
            bar.total = total
            bar.update(step, f"loss {loss:.3f} {tokens_per_step / dt:,.0f} tok/s")
            if on_step is not None:
                on_step(step, loss)
            if step % cfg.eval_every == 0 or step == total:
                t0 = time.perf_counter()
                val_loss = evaluate(step)
                elapsed += time.perf_counter() - t0
            if step % every_ckpt == 0 and step < total:
                t0 = time.perf_counter()
                checkpoint(step)
                elapsed += time.perf_counter() - t0
            if cfg.max_seconds is not None and (len(step_times) == 8 or step == last_eval) and step < total:
                total = _fit_schedule(cfg, step, elapsed, step_times, eval_seconds)
    except KeyboardInterrupt:
        if step > start:
            checkpoint(step)
            say(f"interrupted: checkpoint saved at step {step}; continue with --resume")
        log.close()
        raise
    if last_eval != step and step > start:  # a resumed run that was already complete was evaluated then
        val_loss = evaluate(step)
    checkpoint(step)
    log.close()
    bar.close(f"{step} steps, loss {loss:.4f}" if losses else f"{step} steps: the run was already complete")
    return TrainResult(step, tokens_seen, elapsed, loss, val_loss, best, best_step, out, files, losses)


def _fit_schedule(cfg: TrainConfig, step: int, elapsed: float, step_times: list[float], eval_seconds: float) -> int:
    """The total steps that fit the time budget at the measured speed (never beyond cfg.steps).

    Called once the speed is measured (8 steps) and after each evaluation, so
    the cosine's length changes rarely.  The first steps (compilation) are
    left out of the speed; evaluations and the final one are charged to the
    budget.  The time check at the top of the loop is the hard stop.
    """
    recent = step_times[3:][-50:] or step_times
    per_step = float(np.median(recent)) + eval_seconds / cfg.eval_every
    left = cfg.max_seconds - elapsed - eval_seconds
    return int(min(cfg.steps, step + max(1, left // per_step)))


def write_model_files(model, target, tokenizer, out: Path, cfg: TrainConfig, best: bool) -> dict[str, Path]:
    """The files generate/convert/chat read: a GGUF (full, lora: merged on the fly) or a state file."""
    prefix = "best" if best else "model"
    if isinstance(target, TunableState):
        path = out / ("best-state.safetensors" if best else "state.safetensors")
        export_state(target.initial_state(1), path, model, metadata={"trained_from": str(cfg.init_from)})
        return {"best_state" if best else "state": path}
    path = out / f"{prefix}.gguf"
    export_gguf(model, path, cfg.export_type, tokenizer=tokenizer, name=cfg.name)
    return {prefix: path}
