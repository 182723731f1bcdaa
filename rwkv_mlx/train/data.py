"""Text in, token batches out: read a file or a folder, tokenize, split off validation, sample windows.

Documents (one per file) are tokenized with the world tokenizer and joined
with token 0 between them, RWKV's end-of-document mark.  The last
``val_fraction`` of the token stream is held out for validation, so the
validation text is never seen in training.

Training batches are windows of ``seq_len + 1`` tokens at random offsets
(inputs are the first ``seq_len``, targets the last).  The offsets of step
``n`` come from a generator seeded with ``(seed, n)``: a run resumed at step
``n`` draws exactly the batches the uninterrupted run would have drawn, with
no random-generator state to save.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, ModelFileError

TEXT_SUFFIXES = (".txt", ".md", ".text")
END_OF_DOCUMENT = 0


@dataclass
class TokenSplits:
    """A corpus as tokens: ``train`` and ``val`` are int32 arrays."""

    train: np.ndarray
    val: np.ndarray
    documents: int
    characters: int

    def describe(self) -> str:
        return (f"{self.documents} document(s), {self.characters:,} characters -> "
                f"{len(self.train):,} training + {len(self.val):,} validation tokens")


def world_tokenizer(vocab_size: int):
    """The world tokenizer for a model of ``vocab_size`` tokens.

    The world vocabulary is ordered by token length, so its first ids are the
    256 single bytes (ids 1..256) and then the shortest merges: a small model
    (tests, experiments) can use the first ``vocab_size`` ids and still
    encode any text.
    """
    from ..text.tokenizer import Tokenizer

    world = Tokenizer.from_vocab_file()
    if vocab_size >= world.vocab_size:
        return world
    if vocab_size < 257:
        raise InvalidArgumentError(f"vocab_size {vocab_size} is too small: the 256 byte tokens need ids 1..256")
    tokens = {i: world.token_bytes(i) for i in range(1, vocab_size) if world.token_bytes(i)}
    eot = world.eot_token_id if world.eot_token_id is not None and world.eot_token_id < vocab_size else None
    return Tokenizer(tokens, vocab_size, eot)


def text_files(path: str | os.PathLike) -> list[Path]:
    """The text files a ``--data`` argument names: the file itself, or every text file under a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ModelFileError(path, f"no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
        return files
    raise ModelFileError(path, "no such file or folder")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(path, f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read ({e.strerror or e})") from None


def tokenize_corpus(path: str | os.PathLike, tokenizer, val_fraction: float = 0.1) -> TokenSplits:
    """Tokenize every document under ``path`` and hold out the last ``val_fraction`` of the tokens."""
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgumentError(f"validation fraction must be in [0, 1), got {val_fraction}")
    pieces, chars = [], 0
    files = text_files(path)
    for i, f in enumerate(files):
        text = read_text(f)
        chars += len(text)
        if i:
            pieces.append(np.array([END_OF_DOCUMENT], np.int32))
        pieces.append(np.asarray(tokenizer.encode(text), dtype=np.int32))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    cut = len(tokens) - int(round(len(tokens) * val_fraction))
    return TokenSplits(tokens[:cut], tokens[cut:], len(files), chars)


def check_enough(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise InvalidArgumentError(f"the {what} split has {len(tokens)} tokens, fewer than one window "
                                   f"of --seq-len {seq_len} + 1: use more text or a shorter --seq-len")


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of step ``step``: (inputs, targets), int32 [batch_size, seq_len] each."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]]
    return windows[:, :-1], windows[:, 1:]


def unigram_perplexities(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Baselines for the validation perplexity: unigram models of the same text.

    ``train_add1``: token frequencies of the training split, add-one smoothed
    over the vocabulary (a real model: never sees the validation text).
    ``val_oracle``: the validation split's own frequencies, the lowest
    perplexity any unigram model can reach on that text.
    """
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    p = (counts + 1.0) / (counts.sum() + vocab_size)
    own = np.bincount(val, minlength=vocab_size).astype(np.float64)
    q = own / own.sum()
    return {
        "train_add1": float(np.exp(-np.log(p[val]).mean())),
        "val_oracle": float(np.exp(-np.log(q[val]).mean())),
    }
