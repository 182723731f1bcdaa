"""The bundled demo model is what the README and issue 8 say it is.

It was trained on Tiny Shakespeare with the last 10% of the tokens held out; here it must
predict those held-out tokens far better than a unigram model fitted on the training tokens
(a model that learned nothing sits near the unigram figure, an untrained one near 65536),
and ``rwkv-mlx generate --prompt "ROMEO:"`` with no --model must write English-looking text.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from conftest import REPO

import rwkv_mlx
import rwkv_mlx.loader
from rwkv_mlx import DEMO_MODEL, ModelFileError
from rwkv_mlx.loader import load
from rwkv_mlx.train import perplexity, tokenize_corpus, unigram_perplexities

from rwkv_mlx.testing import fuzz_gguf as F

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
HELD_OUT_TOKENS = 1024  # enough for a stable figure, cheap on the CPU backend


@pytest.fixture(scope="module")
def demo():
    assert DEMO_MODEL.is_file(), f"the bundled demo model is missing: {DEMO_MODEL}"
    return load(DEMO_MODEL)


def test_bundled_model_is_small_and_has_the_promised_shape(demo):
    model, tokenizer = demo
    assert DEMO_MODEL.stat().st_size < 40e6
    assert model.args.vocab_size == tokenizer.vocab_size == 65536
    assert model.args.n_embd % 256 == 0 and 4 <= model.args.n_layer <= 6


def test_load_without_a_path_is_the_demo_model(demo, monkeypatch):
    """rwkv_mlx.load() loads what the commands run without --model; an installation without it says so."""
    model, tokenizer = demo
    again, tokenizer2 = rwkv_mlx.load()
    tokens = mx.array([tokenizer.encode("ROMEO:\nWhat")])
    assert again.args == model.args and tokenizer2.encode("ROMEO:") == tokenizer.encode("ROMEO:")
    assert mx.array_equal(again(tokens)[0], model(tokens)[0]).item()
    monkeypatch.setattr(rwkv_mlx.loader, "DEMO_MODEL", DEMO_MODEL.with_name("gone.gguf"))
    with pytest.raises(ModelFileError, match="gone.gguf: the bundled demo model is missing"):
        rwkv_mlx.load()


@pytest.mark.slow
def test_bundled_model_predicts_held_out_shakespeare(demo):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    model, tokenizer = demo
    splits = tokenize_corpus(SHAKESPEARE, tokenizer)  # the training run's split: last 10% held out
    held_out = splits.val[: HELD_OUT_TOKENS + 1]
    ours = perplexity(model, held_out, seq_len=256).ppl
    unigram = unigram_perplexities(splits.train, held_out[1:], tokenizer.vocab_size)["train_add1"]
    assert math.isfinite(ours) and ours < 150, ours
    assert ours < unigram / 4, (ours, unigram)


def test_generate_with_no_model_writes_shakespeare_like_text():
    proc = F.run_cli(["generate", "--prompt", "ROMEO:", "--max-tokens", "48", "--greedy"])
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode("utf-8", errors="replace")
    words = text.split()
    assert len(words) >= 10, text
    # an untrained model picks among 65536 tokens, most of them not English: mostly ASCII letters here
    letters = np.mean([c.isascii() and (c.isalpha() or c.isspace() or c in ",.;:!?'-") for c in text])
    assert letters > 0.9, text
