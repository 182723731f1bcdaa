"""A fresh RWKV-7 with the initial values BlinkDL's RWKV-LM trains from (RWKV-v7/train_temp).

Restated from the public training code, in rwkv-mlx's layout (GGUF
orientation: LoRA matrices are (rank, C) / (C, rank) and used as ``x @ w.T``):

* token shift: ``x_r = 1 - (i/C)^(0.2 s)``, ``x_w = 1 - (i/C)^(0.9 s)``, ``x_k``, ``x_v`` with 0.7,
  ``x_a`` 0.9, ``x_g`` 0.2, where ``s = 1 - layer/L`` (deeper layers mix less of the
  previous token); channel-mix ``x_k = 1 - (i/C)^(s^4)``;
* decay bias ``w0``: a ramp from -6 at channel 0 to 0 at the last channel, bent
  by depth (exponent ``1 + (layer/(L-1))^0.3``), plus 0.5 and a per-head
  quadratic "zigzag" of amplitude 2.5, so each head spans fast and slow decays;
* ``a0 = -0.19 + 0.3 zigzag + 0.4 ramp``, ``v0 = 0.73 - 0.4 ramp`` with the
  ramp ``i/(C-1) - 0.5``; ``k_k = 0.71 - 0.1 ramp``, ``k_a = 1.02``, ``r_k = -0.04``;
* LoRAs: the first matrix zero, the second orthogonal with gain 0.1 (so every
  LoRA starts as its bias alone);
* receptance and value orthogonal (gain 1), key orthogonal gain 0.1, output
  and the channel-mix value zero (each block starts as the identity),
  channel-mix key orthogonal gain 1;
* ``ln_x`` weight ``((layer + 1)/L)^0.7``; every other norm weight 1, bias 0;
* embedding uniform in +-1e-4 (``ln0`` rescales it), head orthogonal with gain
  ``0.5 sqrt(V/C)``.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from ..arch import ModelArgs, check_model_args
from ..model import Model


def lora_rank_suggestion(n_embd: int, factor: float) -> int:
    """RWKV-LM's suggested LoRA rank: ``factor * sqrt(C)`` rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * n_embd ** 0.5 / 32)) * 32)


def suggested_args(n_layer: int, n_embd: int, vocab_size: int = 65536, ffn_dim: int | None = None,
                   head_size: int = 64) -> ModelArgs:
    """A shape with RWKV-LM's rank suggestions (decay/iclr 2.5, value 1.7, gate 5 times sqrt(C))."""
    return ModelArgs(
        vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, ffn_dim=ffn_dim or 4 * n_embd,
        decay_rank=lora_rank_suggestion(n_embd, 2.5), iclr_rank=lora_rank_suggestion(n_embd, 2.5),
        value_rank=lora_rank_suggestion(n_embd, 1.7), gate_rank=lora_rank_suggestion(n_embd, 5.0),
        head_size=head_size,
    )


def orthogonal(rng: np.random.Generator, rows: int, cols: int, gain: float) -> np.ndarray:
    """A uniformly random (rows, cols) matrix with orthonormal rows or columns (whichever are fewer), times ``gain``.

    A Gaussian matrix A (n x k, n >= k) times (A^T A)^(-1/2) has orthonormal
    columns and is uniformly distributed; it needs one k x k eigendecomposition
    instead of a QR of the tall matrix (65536 x 256 for the head: 10x faster).
    """
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    eigval, eigvec = np.linalg.eigh(a.T @ a)
    q = a @ (eigvec * eigval ** -0.5) @ eigvec.T
    q = q if rows >= cols else q.T
    return (gain * q).astype(np.float32)


def init_weights(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Module path -> float32 initial value for every parameter of ``Model(args)`` (read-only arrays)."""
    return _init_weights(tuple(sorted(args.to_dict().items())), seed)


@functools.lru_cache(maxsize=1)  # runs of one shape and seed (a sweep) share one initialisation
def _init_weights(key: tuple, seed: int) -> dict[str, np.ndarray]:
    args = ModelArgs.from_dict(dict(key))
    check_model_args(args)
    rng = np.random.default_rng(seed)
    C, L, N, V, F = args.n_embd, args.n_layer, args.head_size, args.vocab_size, args.ffn_dim
    i = np.arange(C, dtype=np.float64)
    frac = i / C
    ramp = i / max(C - 1, 1) - 0.5
    z = ((i % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * np.abs(z)
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)

    w: dict[str, np.ndarray] = {
        "emb.weight": rng.uniform(-1e-4, 1e-4, (V, C)).astype(np.float32),
        "ln0.weight": ones, "ln0.bias": zeros, "ln_out.weight": ones, "ln_out.bias": zeros,
        "head.weight": orthogonal(rng, V, C, 0.5 * (V / C) ** 0.5 if V > C else 0.5),
    }
    for layer in range(L):
        p = f"blocks.{layer}."
        depth = layer / max(L - 1, 1)  # 0 .. 1
        shallow = 1.0 - layer / L  # 1 .. ~0
        w0 = -6 + 6 * (i / max(C - 1, 1)) ** (1 + depth ** 0.3) + 0.5 + 2.5 * zigzag
        lerp = [1 - frac ** (e * shallow) for e in (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)]  # r, w, k, v, a, g
        w.update({
            p + "ln1.weight": ones, p + "ln1.bias": zeros, p + "ln2.weight": ones, p + "ln2.bias": zeros,
            p + "att.x_lerp": np.stack(lerp).astype(np.float32),
            p + "att.w0": w0.astype(np.float32),
            p + "att.w1": np.zeros((args.decay_rank, C), np.float32),
            p + "att.w2": orthogonal(rng, C, args.decay_rank, 0.1),
            p + "att.a0": (-0.19 + 0.3 * zigzag + 0.4 * ramp).astype(np.float32),
            p + "att.a1": np.zeros((args.iclr_rank, C), np.float32),
            p + "att.a2": orthogonal(rng, C, args.iclr_rank, 0.1),
            p + "att.g1": np.zeros((args.gate_rank, C), np.float32),
            p + "att.g2": orthogonal(rng, C, args.gate_rank, 0.1),
            p + "att.k_k": (0.71 - 0.1 * ramp).astype(np.float32),
            p + "att.k_a": np.full(C, 1.02, np.float32),
            p + "att.r_k": np.full(C, -0.04, np.float32),
            p + "att.receptance.weight": orthogonal(rng, C, C, 1.0),
            p + "att.key.weight": orthogonal(rng, C, C, 0.1),
            p + "att.value.weight": orthogonal(rng, C, C, 1.0),
            p + "att.output.weight": np.zeros((C, C), np.float32),
            p + "att.ln_x.weight": np.full(C, ((layer + 1) / L) ** 0.7, np.float32),
            p + "att.ln_x.bias": zeros,
            p + "ffn.x_k": (1 - frac ** (shallow ** 4)).astype(np.float32),
            p + "ffn.key.weight": orthogonal(rng, F, C, 1.0),
            p + "ffn.value.weight": np.zeros((C, F), np.float32),
        })
        if layer > 0:
            w.update({
                p + "att.v0": (0.73 - 0.4 * ramp).astype(np.float32),
                p + "att.v1": np.zeros((args.value_rank, C), np.float32),
                p + "att.v2": orthogonal(rng, C, args.value_rank, 0.1),
            })
    for value in w.values():
        value.flags.writeable = False
    return w


def init_model(args: ModelArgs, seed: int = 0) -> Model:
    """``Model(args)`` (dense float32) holding RWKV-LM's initial values."""
    model = Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in init_weights(args, seed).items()], strict=True)
    mx.eval(model.parameters())
    return model
