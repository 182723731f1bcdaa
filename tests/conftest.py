"""Shared test fixtures: where the oracle lives, and small helpers to read it."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # full float32 matmuls on GPUs, before MLX starts

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ.get("RWKV_MLX_ORACLE", REPO.parent / "shared" / "oracle"))
ORACLE_MISSING = f"oracle fixtures not found at {ORACLE} (set RWKV_MLX_ORACLE)"


def oracle_models() -> list[str]:
    """Names like 'fixa-Q4_K_M' for every oracle GGUF file (empty when absent)."""
    models = ORACLE / "models"
    return sorted(p.stem for p in models.glob("*.gguf")) if models.is_dir() else []


def oracle_tokens(name: str) -> list[int]:
    family = name.split("-", 1)[0]
    text = (ORACLE / "logits" / f"{family}.tokens.txt").read_text()
    return [int(t) for t in text.replace("\n", ",").split(",") if t.strip()]


def oracle_logits(name: str, kind: str) -> np.ndarray:
    return np.load(ORACLE / "logits" / f"{name}.{kind}.npy")


@pytest.fixture
def require_oracle():
    if not (ORACLE / "models").is_dir():
        pytest.skip(ORACLE_MISSING)
    return ORACLE
