"""RWKV-7 ("x070") as mlx.nn modules: hyper-parameters, GGUF names, and the forward pass.

The math follows ../shared/spec/rwkv7.md section 1; the sequence path (T tokens)
and the one-token path are the same code with T = 1.  Module names follow
BlinkDL's checkpoints (``blocks.N.att.key``), so state-tuning files and .pth
weights map onto them directly; ``sanitize`` is the only place that knows
llama.cpp's GGUF names.
"""

from __future__ import annotations

from types import MappingProxyType
from dataclasses import asdict, dataclass, fields
from typing import Literal

import mlx.core as mx
import mlx.nn as nn

from ..backend import active_backend
from ..errors import ModelFileError
from ..layers import WeightFormat, make_linear
from .state import State
from ..kernels import compiled_decode_step, fused_block_step, fused_head
from .wkv import time_mix_core



@dataclass
class ModelArgs:
    vocab_size: int
    n_embd: int
    n_layer: int
    ffn_dim: int
    decay_rank: int
    iclr_rank: int
    value_rank: int
    gate_rank: int
    head_size: int = 64
    norm_eps: float = 1e-5

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The matrices stored as layers (quantizable); everything else is a small float array.
MATRIX_MODULES = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")

_GGUF_GLOBAL = {
    "token_embd.weight": "emb.weight",
    "token_embd_norm.weight": "ln0.weight",
    "token_embd_norm.bias": "ln0.bias",
    "output_norm.weight": "ln_out.weight",
    "output_norm.bias": "ln_out.bias",
    "output.weight": "head.weight",
}
_GGUF_BLOCK = {
    "attn_norm.weight": "ln1.weight",
    "attn_norm.bias": "ln1.bias",
    "attn_norm_2.weight": "ln2.weight",
    "attn_norm_2.bias": "ln2.bias",
    "time_mix_lerp_fused.weight": "att.x_lerp",
    "time_mix_receptance.weight": "att.receptance.weight",
    "time_mix_key.weight": "att.key.weight",
    "time_mix_value.weight": "att.value.weight",
    "time_mix_output.weight": "att.output.weight",
    "time_mix_ln.weight": "att.ln_x.weight",
    "time_mix_ln.bias": "att.ln_x.bias",
    "channel_mix_lerp_k.weight": "ffn.x_k",
    "channel_mix_key.weight": "ffn.key.weight",
    "channel_mix_value.weight": "ffn.value.weight",
    **{f"time_mix_{p}.weight": f"att.{p}" for p in
       ("w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")},
}


_LAYER0_DUMMIES = {"time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight"}


def gguf_to_module_name(name: str) -> str | None:
    """Module path for a GGUF tensor name; None for tensors the model ignores."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_BLOCK:
        layer, rest = int(parts[1]), parts[2]
        if layer == 0 and rest in _LAYER0_DUMMIES:
            return None  # layer 0's v0/v1/v2 are converter dummies (copies of a0/a1/a2)
        return f"blocks.{layer}.{_GGUF_BLOCK[rest]}"
    raise KeyError(name)


def gguf_tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor an rwkv7 GGUF must hold, with its numpy shape (reversed GGUF dims)."""
    C, V, F = args.n_embd, args.vocab_size, args.ffn_dim
    shapes = {
        "token_embd.weight": (V, C), "output.weight": (V, C),
        "token_embd_norm.weight": (C,), "token_embd_norm.bias": (C,),
        "output_norm.weight": (C,), "output_norm.bias": (C,),
    }
    for i in range(args.n_layer):
        dv = args.iclr_rank if i == 0 else args.value_rank
        per_layer = {
            "attn_norm.weight": (C,), "attn_norm.bias": (C,),
            "attn_norm_2.weight": (C,), "attn_norm_2.bias": (C,),
            "time_mix_lerp_fused.weight": (6, 1, 1, C),
            "time_mix_w0.weight": (C,), "time_mix_w1.weight": (args.decay_rank, C), "time_mix_w2.weight": (C, args.decay_rank),
            "time_mix_a0.weight": (C,), "time_mix_a1.weight": (args.iclr_rank, C), "time_mix_a2.weight": (C, args.iclr_rank),
            "time_mix_v0.weight": (C,), "time_mix_v1.weight": (dv, C), "time_mix_v2.weight": (C, dv),
            "time_mix_g1.weight": (args.gate_rank, C), "time_mix_g2.weight": (C, args.gate_rank),
            "time_mix_k_k.weight": (C,), "time_mix_k_a.weight": (C,), "time_mix_r_k.weight": (C,),
            "time_mix_receptance.weight": (C, C), "time_mix_key.weight": (C, C),
            "time_mix_value.weight": (C, C), "time_mix_output.weight": (C, C),
            "time_mix_ln.weight": (C,), "time_mix_ln.bias": (C,),
            "channel_mix_lerp_k.weight": (C,), "channel_mix_key.weight": (F, C), "channel_mix_value.weight": (C, F),
        }
        shapes.update({f"blk.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def _mm(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T in w's dtype (LoRA matrices may be float16), result float32."""
    return (x.astype(w.dtype) @ w.T).astype(mx.float32)


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
            v = v + (v_first - v) * mx.sigmoid(self.v0 + _mm(_mm(xv, self.v1), self.v2))
        w_raw = self.w0 + _mm(mx.tanh(_mm(xw, self.w1)), self.w2)  # decay, before sigmoid
        a_raw = self.a0 + _mm(_mm(xa, self.a1), self.a2)  # in-context learning rate, before sigmoid
        g = _mm(mx.sigmoid(_mm(xg, self.g1)), self.g2)
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
        if x.shape[1] == 1 and not self.training:
            fused = fused_block_step(self, x, att_shift, ffn_shift, wkv_state, v_first)
            if fused is not None:
                return fused
        xn = self.ln1(x)
        dx, wkv_state, v_first = self.att(xn, att_shift, wkv_state, v_first)
        x = x + dx
        xf = self.ln2(x)
        x = x + self.ffn(xf, ffn_shift)
        return x, xn[:, -1], xf[:, -1], wkv_state, v_first


def default_formats(args: ModelArgs, dtype: str = "float32") -> dict[str, WeightFormat]:
    """Every matrix dense in ``dtype``: the layout of a freshly initialised model."""
    dense = WeightFormat("dense", dtype)
    names = ["emb", "head"] + [f"blocks.{i}.{m}" for i in range(args.n_layer) for m in MATRIX_MODULES]
    return {n: dense for n in names}


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
        self.train(False)  # inference unless a trainer says otherwise

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

    def initial_state(self, batch_size: int = 1) -> State:
        return State.zeros(self.args, batch_size).owned_by(self)

    def step(self, tokens: mx.array, state: State) -> tuple[mx.array, State]:
        """One token per row (tokens [B]): (logits [B, V] float32, next state).

        The decode loop's call: one compiled graph of fused kernels on GPUs,
        ``self(tokens[:, None], state, logits="last")`` elsewhere.
        """
        compiled = compiled_decode_step(self, tokens.shape[0])
        if compiled is None:
            logits, state = self(tokens[:, None], state, logits="last")
            return logits[:, -1], state
        logits, *arrays = compiled(tokens, *state.arrays())
        return logits, State.from_arrays(arrays, state.model_id)

    def __call__(self, tokens: mx.array, state: State | None = None,
                 logits: Literal["all", "last", "none"] = "all", *, eval_each_block: bool = False):
        """tokens: int array [B, T] (or [T]); returns (logits [B, T|1, V] float32 or None, new state).

        ``eval_each_block`` keeps at most two blocks queued on the device: a GPU holds every
        buffer of the work queued ahead of it, so a prompt chunk queued whole keeps all its
        blocks' temporaries (and, on CUDA, expanded weights) alive at once. The host builds
        block i + 1 while the device runs block i, so the device does not wait for it.
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
        if state is None:
            state = self.initial_state(tokens.shape[0])
        x = self.ln0(self.emb.rows(tokens))
        v_first = None
        att_x, ffn_x, wkv = [], [], []
        queued = None
        for i, block in enumerate(self.blocks):
            x, a, f, s, v_first = block(x, state.att_x[i], state.ffn_x[i], state.wkv[i], v_first)
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
        out = fused_head(self.ln_out, self.head, x) if x.shape[1] == 1 else None
        if out is None:
            out = self.head(self.ln_out(x))
        return out.astype(mx.float32), new_state


def check_model_file_args(path, args: ModelArgs) -> None:
    """Refuse shapes the math cannot run (caught before any tensor is read)."""
    if args.head_size <= 0 or args.n_embd % args.head_size:
        raise ModelFileError(path, f"embedding length {args.n_embd} is not a multiple of head size {args.head_size}")
    for name in ("vocab_size", "n_embd", "n_layer", "ffn_dim", "decay_rank", "iclr_rank", "value_rank", "gate_rank"):
        if getattr(args, name) <= 0:
            raise ModelFileError(path, f"{name} must be positive, got {getattr(args, name)}")
