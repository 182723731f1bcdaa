"""The recurrent state: everything RWKV-7 remembers, of constant size.

Per layer: the previous token's time-mix input (``att_x``, [B, C]), the previous
token's channel-mix input (``ffn_x``, [B, C]) and the WKV matrix (``wkv``,
[B, H, N, N], value-by-key, float32 always).  A State is a value: the model
returns a new one and never mutates the one it was given.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class State:
    att_x: list[mx.array]
    ffn_x: list[mx.array]
    wkv: list[mx.array]

    @classmethod
    def zeros(cls, args, batch_size: int = 1) -> "State":
        L, C, H, N = args.n_layer, args.n_embd, args.n_head, args.head_size
        return cls(
            [mx.zeros((batch_size, C)) for _ in range(L)],
            [mx.zeros((batch_size, C)) for _ in range(L)],
            [mx.zeros((batch_size, H, N, N)) for _ in range(L)],
        )

    @property
    def n_layer(self) -> int:
        return len(self.wkv)

    @property
    def batch_size(self) -> int:
        return self.wkv[0].shape[0]

    def arrays(self) -> list[mx.array]:
        """Flat list of every array (for mx.eval / mx.compile inputs)."""
        return [*self.att_x, *self.ffn_x, *self.wkv]

    @classmethod
    def from_arrays(cls, arrays: list[mx.array]) -> "State":
        n = len(arrays) // 3
        return cls(list(arrays[:n]), list(arrays[n : 2 * n]), list(arrays[2 * n :]))

    def copy(self) -> "State":
        """An independent copy (MLX arrays are immutable values, so sharing is safe; this is for clarity)."""
        return State(list(self.att_x), list(self.ffn_x), list(self.wkv))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())
