"""The quality gate, which makes a fast-but-wrong entry impossible.

The first 16 greedy tokens of every timed run must agree with each other, must
not be degenerate (at most 2 distinct ids), and must equal the *reference*
tokens for that file: the pure-MLX float32 path (kernels disabled) on the same
prompt from a zero state, computed once per model file and cached by the file's
fingerprint.  Otherwise :class:`QualityGateError` is raised and no speed is reported.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from ..backend import active_backend, device_name
from ..errors import ModelFileError, RwkvMlxError
from ..io import atomic_write_text
from ..kernels import kernels_disabled
from ..layers import exact_products
from ..loader import load
from ..model.weights import LoadOptions
from ..text.generate import prefill
from ..text.sample import greedy_sampler
from ..version import __version__
from .measure import local_now


QUALITY_TOKENS = 16  # greedy tokens the gate compares (and the entry lists)


CACHE_NAME = "reference_tokens.json"


REFERENCE_OPTIONS = LoadOptions(float_dtype="float32", ggml_native=False)


# A token the reference ranks within this many logits of its best counts as its choice: float32
# paths that sum in another order differ by about 1e-5..1e-4 on a 2.9B model, a broken one by whole units.
NEAR_TIE = 1e-3


class QualityGateError(RwkvMlxError):
    """The benchmarked path produced tokens that cannot be trusted: no speed is reported."""

    exit_code = 5

    def __init__(self, reason: str, rejected: dict | None = None):
        self.reason = reason
        self.rejected = rejected  # the JSON record of the rejected run (no speeds)
        super().__init__(f"quality gate: {reason}; no speed recorded")


def quality_hash(tokens: Sequence[int]) -> str:
    """First 16 hex digits of sha256 over the comma-joined ids (no spaces)."""
    return hashlib.sha256(",".join(str(int(t)) for t in tokens).encode()).hexdigest()[:16]


def degenerate_reason(tokens: Sequence[int]) -> str | None:
    """Why these greedy tokens look like a broken model (None when they do not)."""
    distinct = len(set(tokens))
    if distinct == 1:
        return f"degenerate tokens: one token ({tokens[0]}) repeated {len(tokens)} times"
    if distinct <= 2:
        return f"degenerate tokens: only {distinct} distinct ids in {len(tokens)} ({list(tokens)})"
    return None


def prompt_digest(prompt: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, prompt)).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """rwkv-mlx's cache folder: $RWKV_MLX_CACHE, else ~/.cache/rwkv-mlx."""
    env = os.environ.get("RWKV_MLX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rwkv-mlx"


@dataclass
class Reference:
    """The pure-MLX float32 greedy tokens for one (file, prompt), with their top-2 logit gaps."""

    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each step: a tiny gap explains a flip
    source: str  # "cached" or "computed"
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "margins": self.margins, "source": self.source, **self.info}


def reference_walk(path: str | os.PathLike, prompt: Sequence[int], n: int = QUALITY_TOKENS,
                   forced: Sequence[int] | None = None) -> tuple[list[int], list[float], list[float]]:
    """Walk ``n`` tokens on the pure-MLX float32 path (kernels off) from a zero state.

    Greedy, or along ``forced`` tokens (another engine's choices). Returns the tokens and, at
    each step, the reference's top-1 minus top-2 logit and its top-1 minus the chosen token's.
    Deliberately the plainest loop -- one evaluated model call per token, no pipelining -- so
    it shares nothing with the timed path but the model math.
    """
    with kernels_disabled(), exact_products():
        model, _ = load(path, REFERENCE_OPTIONS)
        logits, state = prefill(model, prompt)
        tokens, margins, gaps = [], [], []
        for i in range(n):
            token = greedy_sampler(logits) if forced is None else mx.array([forced[i]])
            top2 = mx.sort(logits[0])[-2:]
            mx.eval(token, top2)
            tokens.append(int(token.item()))
            margins.append(round(float(top2[1] - top2[0]), 6))
            gaps.append(float(top2[1] - logits[0, tokens[-1]]))
            if i + 1 < n:
                logits, state = model(token[:, None], state, logits="last")
                logits = logits[:, -1]
    del model, state, logits
    gc.collect()
    mx.clear_cache()
    return tokens, margins, gaps


def compute_reference(path: str | os.PathLike, prompt: Sequence[int], n: int = QUALITY_TOKENS) -> Reference:
    """Greedy tokens of the pure-MLX float32 path from a zero state (see ``reference_walk``)."""
    tokens, margins, _ = reference_walk(path, prompt, n)
    info = dict(device=device_name(), backend=active_backend(), mlx=mx.__version__, rwkv_mlx=__version__,
                date=local_now().isoformat(timespec="seconds"))
    return Reference(tokens, margins, "computed", info)


def path_gaps(path: str | os.PathLike, prompt: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """How far below the reference's best logit each of ``tokens`` lies, given the same prefix."""
    return reference_walk(path, prompt, len(tokens), forced=tokens)[2]


class ReferenceCache:
    """Reference tokens keyed by model fingerprint and prompt, in one JSON file (written atomically)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / CACHE_NAME

    @staticmethod
    def key(fingerprint: str, prompt: Sequence[int], n: int = QUALITY_TOKENS) -> str:
        return f"{fingerprint}:{len(prompt)}:{prompt_digest(prompt)}:{n}"

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ModelFileError(self.path, f"reference-token cache unreadable ({e}); delete it to rebuild") from None
        return data.get("entries", {}) if isinstance(data, dict) else {}

    def get(self, key: str) -> Reference | None:
        entry = self._read().get(key)
        if entry is None:
            return None
        return Reference(list(entry["tokens"]), list(entry.get("margins", [])), "cached", entry.get("info", {}))

    def put(self, key: str, ref: Reference) -> None:
        entries = self._read()
        entries[key] = {"tokens": ref.tokens, "margins": ref.margins, "info": ref.info}
        atomic_write_text(self.path, json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True) + "\n")

    def reference(self, path, fingerprint: str, prompt: Sequence[int], info: dict | None = None) -> Reference:
        """The cached reference, computing and storing it the first time."""
        key = self.key(fingerprint, prompt)
        ref = self.get(key)
        if ref is None:
            ref = compute_reference(path, prompt)
            ref.info.update(info or {})
            self.put(key, ref)
        return ref


def consistency_reason(runs: Sequence[Sequence[int]]) -> str | None:
    """Why the runs' first tokens cannot be right whatever the reference (None when they can)."""
    first = list(runs[0][:QUALITY_TOKENS])
    reason = degenerate_reason(first)
    if reason:
        return reason
    for i, other in enumerate(runs[1:], start=2):
        if list(other[:QUALITY_TOKENS]) != first:
            return f"run {i} produced other tokens than run 1 ({list(other[:QUALITY_TOKENS])} vs {first})"
    return None


def first_difference(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """The first position where ``tokens`` leave ``reference`` (the shorter length if one is a prefix)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def quality_verdict(runs: Sequence[Sequence[int]], reference: Reference,
                    gaps: Sequence[float] | None = None) -> str | None:
    """Why the runs' first tokens fail the gate (None when they pass).

    ``gaps``: for tokens that leave the reference's path, the reference's verdict on each of
    them along their own path (``path_gaps``); the tokens pass when every one is within
    NEAR_TIE of the reference's choice there (a near tie flipped, not a wrong token).
    """
    first = list(runs[0][:QUALITY_TOKENS])
    reason = consistency_reason(runs)
    if reason or first == reference.tokens:
        return reason
    at = first_difference(first, reference.tokens)
    gap = f"; the reference's top-2 logit gap there is {reference.margins[at]:.4g}" if at < len(reference.margins) else ""
    differ = f"greedy tokens differ from the float32 reference from position {at}"
    both = f"(got {first}, reference {reference.tokens})"
    if gaps is None:
        return f"{differ} {both}{gap}"
    worst = max(range(len(gaps)), key=lambda i: gaps[i])
    if gaps[worst] <= NEAR_TIE:
        return None
    return (f"{differ}{gap}; along their own path token {worst} ({first[worst]}) is {gaps[worst]:.4g} logits "
            f"below the reference's choice {both}")


def tie_note(tokens: Sequence[int], reference: Reference, gaps: Sequence[float] | None) -> str | None:
    """What the entry says when its tokens passed the gate through a near tie."""
    if gaps is None or list(tokens) == reference.tokens:
        return None
    at = first_difference(tokens, reference.tokens)
    return (f"near tie at token {at} (reference top-2 gap {reference.margins[at]:.2g}); every token within "
            f"{max(gaps):.2g} logits of the reference's choice along its own path")
