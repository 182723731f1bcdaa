"""The decode runtime: every kernel launch plan and compiled step of one model, in one place.

A launch plan holds evaluated views of the weights it was built from
(kernels/matvec.py ``MatvecPlan``, kernels/decode.py ``BlockPlan``), and a compiled
step (a decoded token, or a block of a prompt chunk) captures the weights as
constants, so each is right only while the weights stay as they were.
``invalidate()`` drops them all; the model calls it whenever
its weights change through it (``update``, ``update_modules``, ``load_weights``,
``keep_tables_on_device``), and the trainer and the LoRA functions call it after
they change weights by other means (a compiled training step, a swapped module).
Code that assigns a submodule's arrays directly must call it too.

On the CPU backend (or inside ``kernels_disabled()``) nothing is built and every
call answers None: the pure-MLX path runs (compiled prompt blocks only where
``RWKV_MLX_COMPILED_PROMPT=1`` asks for them).
"""

from __future__ import annotations

import weakref
from typing import Callable

import mlx.core as mx

from ..kernels import head_plan, kernel_backend
from ..kernels.dialect import hook_active
from ..kernels.decode import BlockPlan
from ..kernels.matvec import HalfCopies
from ..settings import env_choice
from .state import State


class DecodeRuntime:
    """Plans and compiled steps of one model, keyed by backend, layer and batch size; dropped by ``invalidate``.

    Each plan also remembers the module it was built from: a block or head replaced by
    assignment (``model.blocks[3] = other``, which no method of the model sees) gets a new
    plan instead of decoding with the old weights.
    """

    def __init__(self, model):
        self._model = weakref.ref(model)  # the model owns its runtime; no cycle keeps its weights alive
        self._blocks: dict[tuple, tuple[object, BlockPlan]] = {}
        self._heads: dict[tuple, tuple[tuple, object]] = {}
        self._steps: dict[tuple, tuple[tuple, Callable]] = {}
        self._chunks: dict[tuple, tuple[object, Callable]] = {}
        self._halves = HalfCopies()  # float16 LoRA matrices of the matrix-unit plans, one copy for every batch size
        # (x, raw parts, residual, parts): the last block step's output x and the FFN value parts it sums, for the
        # next block's prologue launch to add itself (kernels/decode.py PARTS_IN_PROLOGUE); x is held, so an
        # array that merely reuses its id never matches
        self._handed: tuple | None = None
        self.invalidations = 0  # how often the weights changed (tests count it)

    def invalidate(self) -> None:
        """Drop every plan and compiled step: the weights changed."""
        self._blocks.clear()
        self._heads.clear()
        self._steps.clear()
        self._chunks.clear()
        self._halves = HalfCopies()
        self._handed = None
        self.invalidations += 1

    def cached(self) -> int:
        """How many plans and compiled steps are held now."""
        return len(self._blocks) + len(self._heads) + len(self._steps) + len(self._chunks)

    def block_plan(self, layer: int, batch: int) -> BlockPlan | None:
        """The launch plan of block ``layer`` for ``batch`` rows (built on first use), or None on the pure path."""
        backend = kernel_backend()
        if backend is None:
            return None
        block = self._model().blocks[layer]
        key = (backend, layer, batch)
        entry = self._blocks.get(key)
        if entry is None or entry[0] is not block:
            entry = self._blocks[key] = (block, BlockPlan(block, batch, backend, self._halves))
        return entry[1]

    def block_step(self, layer: int, x, att_shift, ffn_shift, wkv_state, v_first):
        """One token through block ``layer`` by the decode kernels: what ``Block.__call__`` returns, or None.

        Where the block before handed on its FFN value's parts of K (``BlockPlan.step``) and x is the sum
        they make, this block's prologue launch adds them itself; the last block hands nothing on, so the
        head and every other reader get x as an array."""
        plan = self.block_plan(layer, x.shape[0])
        handed, self._handed = self._handed, None
        if plan is None or not plan.ok:
            return None
        parts_of_x = handed[1:] if handed is not None and handed[0] is x else None
        out, parts = plan.step(x, att_shift, ffn_shift, wkv_state, v_first, parts_of_x)
        if parts is not None and layer + 1 < len(self._model().blocks):
            self._handed = (out[0], *parts)
        return out

    def block_chunk(self, layer: int, x, att_shift, ffn_shift, wkv_state, v_first):
        """A prompt chunk through block ``layer`` as one compiled graph: what ``Block.__call__`` returns, or None.

        Built op by op, a block of a 512-token chunk is dozens of operations of Python and MLX
        graph work, which the host must finish within the device's time for the block before
        (about 1 ms on an H100) or the device waits. A compiled graph is replayed instead, its
        elementwise chains fused (a Q4_K_M prompt on an H100: 14,598-16,831 tok/s against
        6,969-12,480 op by op, results/kernel_log.md step 22). MLX traces it once for each input
        shape, so the caller passes only chunks of one recurring length (``prefill``'s full
        chunks), never a prompt's remainder.
        """
        backend = kernel_backend()
        if env_choice("RWKV_MLX_COMPILED_PROMPT", "0" if backend is None else "1", ("0", "1")) == "0" or hook_active():
            return None
        block = self._model().blocks[layer]
        key = (backend, layer)
        entry = self._chunks.get(key)
        if entry is None or entry[0] is not block:
            def chunk(x, att_shift, ffn_shift, wkv_state, *v_first):  # layer 0 has no v_first yet
                return block(x, att_shift, ffn_shift, wkv_state, v_first[0] if v_first else None)

            entry = self._chunks[key] = (block, mx.compile(chunk))
        return entry[1](x, att_shift, ffn_shift, wkv_state, *(() if v_first is None else (v_first,)))

    def head(self, x):
        """logits = head(LayerNorm(x)) for one token in one launch, or None."""
        backend = kernel_backend()
        if backend is None:
            return None
        model = self._model()
        modules = (model.ln_out, model.head)
        key = (backend, x.shape[0])
        entry = self._heads.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], modules)):
            entry = self._heads[key] = (modules, head_plan(model.ln_out, model.head, x.shape[0], backend))
        plan = entry[1]
        return plan(x)[0] if plan.ok else None

    def step(self, batch: int):
        """``(tokens [B], *state arrays) -> (logits [B, V], *state arrays)`` as one compiled graph, or None.

        Replaying a compiled graph spares the host rebuilding ~250 launches per token
        in Python. The launch plans hold evaluated constants, so they are built by an
        eager warm-up call before tracing; the graph captures the weights, which is
        why ``invalidate`` drops it, and why it is rebuilt when a module was replaced.
        """
        backend = kernel_backend()
        if backend is None or hook_active():  # a launch hook needs concrete arrays
            return None
        model = self._model()
        modules = (model.emb, model.ln0, *model.blocks, model.ln_out, model.head)
        key = (backend, batch)
        entry = self._steps.get(key)
        if entry is None or len(entry[0]) != len(modules) or any(a is not b for a, b in zip(entry[0], modules)):
            model_ref = self._model
            model(mx.zeros((batch, 1), dtype=mx.uint32), model.initial_state(batch), logits="last")

            def one_token(tokens, *arrays):
                logits, state = model_ref()(tokens[:, None], State.from_arrays(list(arrays)), logits="last")
                return (logits.squeeze(1), *state.arrays())  # (logits[:, -1] would be a Gather: a kernel)

            entry = self._steps[key] = (modules, mx.compile(one_token))
        return entry[1]
