"""RWKV-7 ("x070") as mlx.nn modules: the forward pass.

The math follows ../shared/spec/rwkv7.md section 1; the sequence path (T tokens)
and the one-token path are the same code with T = 1.  Module names follow
BlinkDL's checkpoints (``blocks.N.att.key``), so state-tuning files and .pth
weights map onto them directly; the hyper-parameters and the tensor list are
rwkv_mlx/arch.py's, and no file format is known here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

import mlx.core as mx
import mlx.nn as nn

from ..backend import active_backend
from ..arch import ModelArgs, matrix_modules
from ..layers import WeightFormat, make_linear, product
from .state import State
from .runtime import DecodeRuntime
from .wkv import time_mix_core


def token_shift(x: mx.array, prev: mx.array) -> mx.array:
    """The previous token's vector for each position; ``prev`` [B, C] precedes x[:, 0]."""
    if x.shape[1] == 1:
        return prev[:, None]
    return mx.concatenate([prev[:, None], x[:, :-1]], axis=1)


class TimeMix(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, formats: dict[str, WeightFormat], lora_dtype: mx.Dtype):
        super().__init__()
        C, N = args.n_embd, args.head_size
        self.layer = layer
        self.head_size = N

        def vec():
            return mx.zeros((C,))

        def lora(rank):
            return mx.zeros((rank, C), dtype=lora_dtype), mx.zeros((C, rank), dtype=lora_dtype)

        self.x_lerp = mx.zeros((6, C))  # r, w, k, v, a, g
        self.w0, self.a0, self.k_k, self.k_a, self.r_k = vec(), vec(), vec(), vec(), vec()
        self.w1, self.w2 = mx.zeros((args.decay_rank, C)), mx.zeros((C, args.decay_rank))  # float32 in every file
        self.a1, self.a2 = lora(args.iclr_rank)
        if layer > 0:
            self.v0 = vec()
            self.v1, self.v2 = lora(args.value_rank)
        self.g1, self.g2 = lora(args.gate_rank)
        prefix = f"blocks.{layer}.att."
        for name in ("receptance", "key", "value", "output"):
            setattr(self, name, make_linear(C, C, formats[prefix + name]))
        self.ln_x = nn.LayerNorm(C)  # its weight/bias scale the per-head GroupNorm in time_mix_core

    def __call__(self, xn, shift, wkv_state, v_first):
        d = token_shift(xn, shift) - xn
        xr, xw, xk, xv, xa, xg = (xn + d * self.x_lerp[i] for i in range(6))

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * mx.sigmoid(self.v0 + product(product(xv, self.v1), self.v2))
        w_raw = self.w0 + product(mx.tanh(product(xw, self.w1)), self.w2)  # decay, before sigmoid
        a_raw = self.a0 + product(product(xa, self.a1), self.a2)  # in-context learning rate, before sigmoid
        g = product(mx.sigmoid(product(xg, self.g1)), self.g2)
        y, wkv_state = time_mix_core(
            r, k, v, w_raw, a_raw, g, self.k_k, self.k_a, self.r_k, self.ln_x.weight, self.ln_x.bias,
            wkv_state, self.head_size, differentiable=self.training)
        return self.output(y), wkv_state, v_first


class ChannelMix(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, formats: dict[str, WeightFormat]):
        super().__init__()
        C, F = args.n_embd, args.ffn_dim
        self.x_k = mx.zeros((C,))
        self.key = make_linear(C, F, formats[f"blocks.{layer}.ffn.key"])
        self.value = make_linear(F, C, formats[f"blocks.{layer}.ffn.value"])

    def __call__(self, xf, shift):
        xk = xf + (token_shift(xf, shift) - xf) * self.x_k
        return self.value(mx.square(nn.relu(self.key(xk))))


class Block(nn.Module):
    def __init__(self, args, layer, formats, lora_dtype):
        super().__init__()
        self.ln1 = nn.LayerNorm(args.n_embd, eps=args.norm_eps)
        self.ln2 = nn.LayerNorm(args.n_embd, eps=args.norm_eps)
        self.att = TimeMix(args, layer, formats, lora_dtype)
        self.ffn = ChannelMix(args, layer, formats)

    def __call__(self, x, att_shift, ffn_shift, wkv_state, v_first):
        xn = self.ln1(x)
        dx, wkv_state, v_first = self.att(xn, att_shift, wkv_state, v_first)
        x = x + dx
        xf = self.ln2(x)
        x = x + self.ffn(xf, ffn_shift)
        return x, xn[:, -1], xf[:, -1], wkv_state, v_first


def default_formats(args: ModelArgs, dtype: str = "float32") -> dict[str, WeightFormat]:
    """Every matrix dense in ``dtype``: the layout of a freshly initialised model."""
    dense = WeightFormat("dense", dtype)
    return {n: dense for n in matrix_modules(args)}


class Model(nn.Module):
    """RWKV-7. ``model(tokens, state) -> (logits, state)``; state is never mutated in place."""

    def __init__(self, args: ModelArgs, formats: dict[str, WeightFormat] | None = None,
                 lora_dtype: mx.Dtype = mx.float32):
        super().__init__()
        formats = formats or default_formats(args)
        self.args = args
        self.emb = make_linear(args.n_embd, args.vocab_size, formats["emb"])
        self.ln0 = nn.LayerNorm(args.n_embd, eps=args.norm_eps)
        self.blocks = [Block(args, i, formats, lora_dtype) for i in range(args.n_layer)]
        self.ln_out = nn.LayerNorm(args.n_embd, eps=args.norm_eps)
        self.head = make_linear(args.n_embd, args.vocab_size, formats["head"])
        self.formats = MappingProxyType(dict(formats))  # not a dict: kept out of the parameter tree
        self.fingerprint = ""
        self.runtime = DecodeRuntime(self)  # kernel plans and compiled steps, dropped when weights change
        self.train(False)  # inference unless a trainer says otherwise

    # Every way nn.Module changes weights goes through these two (load_weights calls update).
    def update(self, parameters: dict, strict: bool = True) -> "Model":
        self.runtime.invalidate()
        return super().update(parameters, strict=strict)

    def update_modules(self, modules: dict, strict: bool = True) -> "Model":
        self.runtime.invalidate()
        return super().update_modules(modules, strict=strict)

    def keep_tables_on_device(self) -> None:
        """Rewrite the embedding table by a device kernel, so that the GPU owns its memory pages.

        MLX's CUDA backend allocates managed memory: an array filled on the host moves to the
        GPU page by page, at first touch. Matrices are read whole by the first token, but the
        embedding is read a row at a time, so each new token id faulted a page across (three
        gathers of about 240 us per decoded token on an H200, a tenth of the step).
        """
        if active_backend() != "cuda":
            return
        zero = mx.array(0, dtype=mx.uint8)
        for name, arr in self.emb.parameters().items():
            setattr(self.emb, name, (arr.view(mx.uint8) + zero).view(arr.dtype))
        mx.eval(self.emb.parameters())
        self.runtime.invalidate()  # a compiled step captured the old arrays

    def initial_state(self, batch_size: int = 1) -> State:
        return State.zeros(self.args, batch_size).owned_by(self)

    def step(self, tokens: mx.array, state: State) -> tuple[mx.array, State]:
        """One token per row (tokens [B]): (logits [B, V] float32, next state).

        The decode loop's call: one compiled graph of fused kernels on GPUs,
        ``self(tokens[:, None], state, logits="last")`` elsewhere.
        """
        compiled = self.runtime.step(tokens.shape[0])
        if compiled is None:
            logits, state = self(tokens[:, None], state, logits="last")
            return logits[:, -1], state
        logits, *arrays = compiled(tokens, *state.arrays())
        return logits, State.from_arrays(arrays, state.model_id)

    def __call__(self, tokens: mx.array, state: State | None = None,
                 logits: Literal["all", "last", "none"] = "all", *, eval_each_block: bool = False,
                 compiled_blocks: bool = False):
        """tokens: int array [B, T] (or [T]); returns (logits [B, T|1, V] float32 or None, new state).

        ``eval_each_block`` keeps at most two blocks queued on the device: a GPU holds every
        buffer of the work queued ahead of it, so a prompt chunk queued whole keeps all its
        blocks' temporaries (and, on CUDA, expanded weights) alive at once. The host builds
        block i + 1 while the device runs block i, so the device does not wait for it.

        ``compiled_blocks`` runs each block as a compiled graph (``DecodeRuntime.block_chunk``)
        where the settings allow: for a chunk length the caller will pass again and again.
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
        if state is None:
            state = self.initial_state(tokens.shape[0])
        x = self.ln0(self.emb.rows(tokens))
        v_first = None
        att_x, ffn_x, wkv = [], [], []
        queued = None
        one_token = tokens.shape[1] == 1 and not self.training
        chunk = compiled_blocks and tokens.shape[1] > 1 and not self.training
        for i, block in enumerate(self.blocks):
            inputs = (x, state.att_x[i], state.ffn_x[i], state.wkv[i], v_first)
            fused = self.runtime.block_step(i, *inputs) if one_token else None
            if chunk:
                fused = self.runtime.block_chunk(i, *inputs)
            x, a, f, s, v_first = fused if fused is not None else block(*inputs)
            if eval_each_block:
                mx.async_eval(x, a, f, s, v_first)
                if queued is not None:
                    mx.eval(queued)  # the block before has finished
                queued = [x, s]
            att_x.append(a)
            ffn_x.append(f)
            wkv.append(s)
        new_state = State(att_x, ffn_x, wkv, state.model_id)
        if logits == "none":
            return None, new_state
        if logits == "last":
            x = x[:, -1:]
        out = self.runtime.head(x) if x.shape[1] == 1 and not self.training else None
        if out is None:
            out = self.head(self.ln_out(x))
        return out.astype(mx.float32), new_state
