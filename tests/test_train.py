"""Training: steps, gradients, LoRA merging, state tuning, resume, export, evaluation, CLI.

Tiny shapes throughout (2 layers, n_embd 32, two heads of 16, the world
vocabulary's first 512 ids) so the whole file runs in well under a minute on
a CPU.  Base models for fine-tuning are seeded random GGUF files written by
gguf_writer (rwkv_mlx.testing.synthetic), so every weight matters.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from rwkv_mlx import load
from rwkv_mlx.cli import run
from rwkv_mlx.errors import InvalidArgumentError
from rwkv_mlx.loader.export import export_gguf
from rwkv_mlx.model import ModelArgs
from rwkv_mlx.model.state import State
from rwkv_mlx.train import (TrainConfig, apply_lora, batch_at, init_model, init_weights, learning_rate, merge_lora,
                            perplexity, tokenize_corpus, train, unigram_perplexities)
from rwkv_mlx.train.data import world_tokenizer
from rwkv_mlx.train.loop import build_model, load_base, make_optimizer, make_step

from rwkv_mlx.testing import synthetic as synth  # seeded random models in llama.cpp's layout

TINY = dict(vocab_size=512, n_embd=32, n_layer=2, ffn_dim=64, decay_rank=8, iclr_rank=8, value_rank=8, gate_rank=8,
            head_size=16)
WORDS = ("the king my lord shall not be so and what is this fair sweet love death night day come go speak "
         "thou thee thy art hath doth upon heaven good gentle noble hand heart eyes").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 12 kB of word salad with line structure (a tokenizable, learnable text)."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(400):
        speaker = rng.choice(["KING", "ROMEO", "NURSE"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS, size=rng.integers(3, 9))) + ".\n")
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def base_files(tmp_path_factory) -> dict[str, Path]:
    """A seeded random model of the TINY shape as F32 and Q8_0 GGUF files."""
    folder = tmp_path_factory.mktemp("base")
    hp = synth.synthetic_args(TINY["n_layer"], TINY["n_embd"], TINY["ffn_dim"], (8, 8, 8, 8), TINY["head_size"],
                              vocab=TINY["vocab_size"])
    files = {}
    for ft in ("F32", "Q8_0"):
        files[ft] = folder / f"base-{ft}.gguf"
        synth.make_synthetic_model(files[ft], ft, hp, seed=1)
    return files


def tiny_config(corpus, out, **overrides) -> TrainConfig:
    base = dict(data=str(corpus), out=str(out), shape=dict(TINY), seq_len=32, batch_size=4, steps=6, warmup=2,
                eval_every=3, eval_tokens=256, eval_streams=4, lr=1e-2)
    return TrainConfig(**{**base, **overrides})


def fixed_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY["vocab_size"], size=(2, 33))
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# -- initialisation -----------------------------------------------------------------------


def test_fresh_model_blocks_are_identities():
    """RWKV-LM zero-initialises each block's output matrices: logits = head(ln_out(ln0(emb[t])))."""
    args = ModelArgs(**TINY)
    w = init_weights(args, seed=3)
    model = init_model(args, seed=3)
    tokens = [5, 17, 300, 2]
    logits, _ = model(mx.array([tokens]))

    def ln(x, g, b):
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * g + b

    x = ln(w["emb.weight"][tokens].astype(np.float64), w["ln0.weight"], w["ln0.bias"])
    want = ln(x, w["ln_out.weight"], w["ln_out.bias"]) @ w["head.weight"].T.astype(np.float64)
    assert rel_err(np.array(logits[0]), want) < 1e-5
    head = w["head.weight"].astype(np.float64)
    gain = 0.5 * (args.vocab_size / args.n_embd) ** 0.5
    assert np.allclose(head.T @ head, gain**2 * np.eye(args.n_embd), atol=1e-4)  # orthogonal columns
    assert np.abs(w["emb.weight"]).max() <= 1e-4
    assert (w["blocks.0.att.w0"].min() < -5) and (w["blocks.0.att.w0"].max() > 0)  # fast to slow decays


# -- one step -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode,dtype", [("full", "float32"), ("full", "bfloat16"), ("lora", "float32"),
                                        ("state", "float32")])
def test_one_step_lowers_loss_on_fixed_batch(mode, dtype, corpus, base_files, tmp_path):
    if mode == "full":
        cfg = tiny_config(corpus, tmp_path, dtype=dtype, lr=1e-2)
    else:
        cfg = tiny_config(corpus, tmp_path, shape=None, init_from=str(base_files["F32"]), mode=mode,
                          lr=1e-2 if mode == "lora" else 0.5)
    model, _, target = build_model(cfg.validate())
    optimizer = make_optimizer(cfg)
    optimizer.init(target.trainable_parameters())
    step = make_step(model, target, optimizer, cfg)
    x, y = fixed_batch()
    tunable = getattr(target, "initial_state", None)

    def loss():
        logits, _ = model(x, tunable(2) if tunable else None)
        return nn.losses.cross_entropy(logits, y, reduction="mean").item()

    before = loss()
    reported, _ = step(x, y)
    mx.eval(target.parameters(), optimizer.state)
    assert abs(reported.item() - before) < (5e-2 if dtype == "bfloat16" else 1e-4)
    assert loss() < before - 1e-3


# -- gradients through the whole model -------------------------------------------------------


def test_model_gradients_chunked_match_sequential(base_files):
    """Every parameter's gradient with the chunked WKV (training mode) equals autograd of the token loop."""
    model, _ = load_base(str(base_files["F32"]), "full")
    x, y = fixed_batch(1)

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x)[0], y, reduction="mean")

    grads = {}
    for training in (True, False):  # training mode: chunked; inference mode: wkv7_sequential
        model.train(training)
        _, g = nn.value_and_grad(model, lambda: loss_fn(model))()
        grads[training] = dict(tree_flatten(g))
    for name, want in grads[False].items():
        assert rel_err(grads[True][name], want) < 1e-4, name


# -- LoRA ---------------------------------------------------------------------------------


def test_lora_merge_gives_the_adapted_logits(base_files, tmp_path):
    """Adapters on a quantized (Q8_0 -> affine) base: merged weights, and an export, compute the same logits."""
    model, tokenizer = load_base(str(base_files["Q8_0"]), "lora")
    paths = apply_lora(model, rank=4, alpha=8.0, targets=("att.key", "att.output", "ffn.value", "head"), seed=2)
    assert len(paths) == 1 + 3 * TINY["n_layer"]
    rng = np.random.default_rng(3)
    for path, b in [(k, v) for k, v in tree_flatten(model.parameters()) if k.endswith("lora_b")]:
        model.load_weights([(path, mx.array(0.05 * rng.standard_normal(b.shape).astype(np.float32)))], strict=False)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    tokens = mx.array([[1, 40, 99, 300, 7, 12]])
    base_logits, _ = load(base_files["Q8_0"])[0](tokens)
    adapted, _ = model(tokens)
    assert rel_err(adapted, base_logits) > 1e-3  # the adapters do something
    export_gguf(model, tmp_path / "adapted.gguf", "F32", tokenizer=tokenizer)  # merged on the fly
    exported, _ = load(tmp_path / "adapted.gguf")[0](tokens)
    assert merge_lora(model) == len(paths)
    merged, _ = model(tokens)
    assert rel_err(merged, adapted) < 1e-5
    assert rel_err(exported, adapted) < 1e-5


# -- state tuning -------------------------------------------------------------------------


def test_state_tuned_file_loads_and_changes_the_output(corpus, base_files, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", shape=None, init_from=str(base_files["F32"]), mode="state",
                      steps=3, lr=0.5, eval_every=3)
    result = train(cfg, quiet=True)
    model, _ = load(base_files["F32"])
    state = State.load(result.files["state"], model)
    assert all(float(mx.abs(a).max()) == 0 for a in state.att_x + state.ffn_x)
    tokens = mx.array([[1, 40, 99, 300]])
    plain, _ = model(tokens)
    tuned, _ = model(tokens, state)
    assert float(mx.abs(tuned - plain).max()) > 1e-3
    saved = mx.load(str(sorted((Path(cfg.out) / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    for i, wkv in enumerate(state.wkv):  # the file holds exactly the trained arrays
        assert np.array_equal(np.array(wkv[0]), np.array(saved[f"wkv.{i}"]))
    other, _ = load(base_files["Q8_0"])
    with pytest.raises(Exception, match="belongs to"):  # a state is tied to its model's weights
        State.load(result.files["state"], other)


# -- resume -------------------------------------------------------------------------------


def test_resume_after_interruption_continues_the_loss_curve(corpus, tmp_path):
    straight = train(tiny_config(corpus, tmp_path / "a"), quiet=True)
    assert len(straight.losses) == 6

    def interrupt(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    cfg = tiny_config(corpus, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt, quiet=True)
    with pytest.raises(InvalidArgumentError, match="--resume"):
        train(cfg, quiet=True)  # refuses to overwrite a run
    resumed = train(cfg, resume=True, quiet=True)
    assert len(resumed.losses) == 2  # steps 5 and 6 only
    np.testing.assert_allclose(resumed.losses, straight.losses[4:], rtol=1e-5)
    np.testing.assert_allclose(resumed.best_val_loss, straight.best_val_loss, rtol=1e-5)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "val_loss" in e] == [3, 6]

    config = (tmp_path / "b" / "config.json").read_text()
    with pytest.raises(InvalidArgumentError, match=r"the run in .* is complete at step 6; pass --steps N with N > 6"):
        train(cfg, resume=True, quiet=True)  # complete: refused, nothing rewritten, nothing logged twice
    with pytest.raises(InvalidArgumentError, match=r"complete at step 6 \(--steps 5\)"):
        train(dataclasses.replace(cfg, steps=5), resume=True, quiet=True)
    assert (tmp_path / "b" / "config.json").read_text() == config
    assert (tmp_path / "b" / "log.jsonl").read_text().splitlines() == [json.dumps(e) for e in log]

    # --steps 8 extends the finished run: two more steps on the stretched cosine, then the new end
    extended = train(dataclasses.replace(cfg, steps=8), resume=True, quiet=True)
    assert len(extended.losses) == 2 and all(np.isfinite(extended.losses)) and extended.steps == 8
    last = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-2])  # the step-8 line, before its evaluation
    assert last["step"] == 8 and last["lr"] == pytest.approx(learning_rate(7, 8, cfg))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["steps"] == 8


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_evaluation_lines_go_above_the_progress_line(corpus, tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    train(tiny_config(corpus, tmp_path / "run"))
    out = term.getvalue()
    evals = [m.start() for m in re.finditer("validation loss", out)]
    assert len(evals) == 2
    for at in evals:  # each evaluation starts a cleared line and ends it; the bar is redrawn after it
        start = out.rindex("\r", 0, at)
        assert out[start:start + 4] == "\r\033[K" and out.startswith("step ", start + 4)
        end = out.index("\n", at)
        assert out.startswith("\rtrain [", end + 1)


# -- export ------------------------------------------------------------------------------


def test_exported_gguf_loads_back_with_the_same_logits(tmp_path):
    from reference_rwkv7 import ReferenceRWKV7

    # head size 64: llama.cpp (and the reference) fix the GroupNorm epsilon at 64e-5, right for 64 only
    source = tmp_path / "source.gguf"
    synth.make_synthetic_model(source, "F32", synth.synthetic_args(2, 64, 128, (8, 8, 8, 8), 64, vocab=512), seed=4)
    model, tokenizer = load(source)
    tokens = [1, 40, 99, 300, 7]
    want, _ = model(mx.array([tokens]))
    out = tmp_path / "again.gguf"
    export_gguf(model, out, "F32", tokenizer=tokenizer)
    again, tokenizer2 = load(out)
    got, _ = again(mx.array([tokens]))
    assert np.array_equal(np.array(got), np.array(want))
    assert tokenizer2.encode("the king, my lord") == tokenizer.encode("the king, my lord")
    ref, _ = ReferenceRWKV7(out).run(tokens)  # gguf-py + float64 numpy: llama.cpp's reading of the layout
    assert rel_err(np.array(got[0]), ref) < 1e-4


def test_quantized_export_reproduces_the_file(base_files, tmp_path):
    """Q8_0 -> MLX affine -> export Q8_0 gives back the same tensor bytes (exact dequantisation, same encoder)."""
    from gguf import GGUFReader

    model, tokenizer = load(base_files["Q8_0"])
    out = tmp_path / "again-Q8_0.gguf"
    export_gguf(model, out, "Q8_0", tokenizer=tokenizer)
    a, b = GGUFReader(str(base_files["Q8_0"])), GGUFReader(str(out))
    tensors_b = {t.name: t for t in b.tensors}
    for t in a.tensors:
        assert t.tensor_type == tensors_b[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(tensors_b[t.name].data)), t.name


# -- data, schedule, evaluation --------------------------------------------------------------


def test_data_split_batches_and_unigram(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world " * 20)
    (folder / "b.md").write_text("second document " * 10)
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    tok = world_tokenizer(65536)
    splits = tokenize_corpus(folder, tok, val_fraction=0.25)
    whole = np.concatenate([splits.train, splits.val])
    assert splits.documents == 2 and 0 in whole.tolist()  # end-of-document between the files
    assert len(splits.val) == round(len(whole) * 0.25)
    x, y = batch_at(whole, 7, 3, 5, seed=1)
    x2, _ = batch_at(whole, 7, 3, 5, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(x[:, 1:], y[:, :-1])
    assert not np.array_equal(x, batch_at(whole, 8, 3, 5, seed=1)[0])
    u = unigram_perplexities(np.array([1, 1, 2]), np.array([1, 2]), vocab_size=3)
    assert u["train_add1"] == pytest.approx(6**0.5)  # p(1) = 3/6, p(2) = 2/6
    assert u["val_oracle"] == pytest.approx(2.0)
    small = world_tokenizer(512)
    assert max(small.encode("thé king's men")) < 512 and small.decode(small.encode("thé king")) == "thé king"


def test_learning_rate_schedule():
    cfg = TrainConfig(data="x", out="y", shape=dict(TINY), lr=1.0, warmup=4, final_lr_ratio=0.1, steps=20)
    lrs = [learning_rate(s, 20, cfg) for s in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8)  # linear warm-up
    assert lrs[4] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert learning_rate(20, 20, cfg) == pytest.approx(0.1)  # cosine ends at the floor
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_perplexity_carries_the_state_between_pieces(base_files):
    model, _ = load(base_files["F32"])
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, 512, size=30)
    logits, _ = model(mx.array(tokens[None, :-1]))
    lp = np.array(logits[0], np.float64)
    lp -= np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lp.max(-1, keepdims=True)
    want = -lp[np.arange(29), tokens[1:]].mean()
    for seq_len in (7, 29):
        got = perplexity(model, tokens, seq_len=seq_len)
        assert got.tokens == 29 and got.nll == pytest.approx(want, rel=1e-5)
    two = perplexity(model, tokens, seq_len=7, streams=2)  # rows of 14: the second starts without context
    assert two.tokens == 28


# -- command line ------------------------------------------------------------------------------


def test_cli_train_and_perplexity(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", str(corpus), "--out", str(out), "--shape", "2x32", "--head-size", "16",
            "--ranks", "8,8,8,8", "--vocab-size", "512", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
            "--eval-every", "2", "--eval-tokens", "128", "--quiet"]
    assert run(args) == 0
    assert (out / "best.gguf").is_file() and (out / "model.gguf").is_file() and (out / "log.jsonl").is_file()
    capsys.readouterr()
    assert run(["perplexity", "--model", str(out / "best.gguf"), "--text", str(corpus), "--max-tokens", "64",
                "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert run(["train", "--data", str(corpus), "--out", str(tmp_path / "x"), "--mode", "lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-from" in err[0]
    assert run(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "y"), "--shape", "1x64",
                "--quiet"]) == 3
    assert "no such file" in capsys.readouterr().err


def test_compiled_step_follows_the_schedule(corpus, tmp_path):
    """mx.compile must read the learning rate (and optimizer state) each step, not freeze them."""
    compiled = train(tiny_config(corpus, tmp_path / "c", steps=5, eval_every=5), quiet=True)
    plain = train(tiny_config(corpus, tmp_path / "p", steps=5, eval_every=5, compile=False), quiet=True)
    np.testing.assert_allclose(compiled.losses, plain.losses, rtol=1e-4)
    frozen = train(tiny_config(corpus, tmp_path / "f", steps=5, eval_every=5, warmup=0, final_lr_ratio=1.0),
                   quiet=True)  # a constant learning rate gives another curve: the schedule matters
    assert abs(frozen.losses[-1] - plain.losses[-1]) > 1e-3
