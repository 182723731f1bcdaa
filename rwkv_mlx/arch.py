"""RWKV-7 ("x070"), described once: hyper-parameters, tensors, their shapes and GGUF names, metadata keys.

The GGUF reader and writer, the loader, the converter, the exporter, the model
and the synthetic-model builder all read this module; none of them spells a
tensor name or a shape of its own.  Names follow llama.cpp's converter for
GGUF files (``blk.N.time_mix_key.weight``) and BlinkDL's checkpoints for the
model's modules (``blocks.N.att.key.weight``); shapes are numpy shapes
(reversed GGUF dims).  See ../shared/spec/rwkv7.md sections 1 and 3.3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import InvalidArgumentError, ModelFileError

ARCHITECTURE = "rwkv7"


@dataclass
class ModelArgs:
    """The hyper-parameters of an RWKV-7 model (the one spelling; GGUF keys in ``METADATA_KEYS``)."""

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


POSITIVE_ARGS = ("vocab_size", "n_embd", "n_layer", "ffn_dim", "decay_rank", "iclr_rank", "value_rank", "gate_rank")


def args_problem(args: ModelArgs) -> str | None:
    """Why the math cannot run these shapes (None: it can). Callers raise their own error kind."""
    for name in POSITIVE_ARGS:
        if getattr(args, name) <= 0:
            return f"{name} must be positive, got {getattr(args, name)}"
    if args.head_size <= 0 or args.n_embd % args.head_size:
        return f"embedding length {args.n_embd} is not a multiple of head size {args.head_size}"
    return None


def check_model_args(args: ModelArgs) -> None:
    """Refuse shapes the math cannot run, asked for by a caller (InvalidArgumentError)."""
    problem = args_problem(args)
    if problem:
        raise InvalidArgumentError(problem)


def check_model_file_args(path, args: ModelArgs) -> None:
    """Refuse shapes the math cannot run, naming the file (caught before any tensor is read)."""
    problem = args_problem(args)
    if problem:
        raise ModelFileError(path, problem)


# GGUF metadata: ModelArgs field -> key, in the order llama.cpp's converter writes them.
# vocab_size has no key (the embedding's rows); the ranks are also read from tensor shapes.
METADATA_KEYS = {
    "n_embd": f"{ARCHITECTURE}.embedding_length",
    "n_layer": f"{ARCHITECTURE}.block_count",
    "norm_eps": f"{ARCHITECTURE}.attention.layer_norm_epsilon",
    "head_size": f"{ARCHITECTURE}.wkv.head_size",
    "decay_rank": f"{ARCHITECTURE}.attention.decay_lora_rank",
    "iclr_rank": f"{ARCHITECTURE}.attention.iclr_lora_rank",
    "value_rank": f"{ARCHITECTURE}.attention.value_residual_mix_lora_rank",
    "gate_rank": f"{ARCHITECTURE}.attention.gate_lora_rank",
    "ffn_dim": f"{ARCHITECTURE}.feed_forward_length",
}
CONTEXT_LENGTH_KEY = f"{ARCHITECTURE}.context_length"
HEAD_COUNT_KEY = f"{ARCHITECTURE}.attention.head_count"
DEFAULT_NORM_EPS = 1e-5

# The matrices stored as layers (quantizable); everything else is a small float array.
MATRIX_MODULES = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
GLOBAL_MATRICES = ("emb", "head")
# LoRA matrices of the time mix (kept in their stored float dtype on GPUs: read every token).
LORA_MATRICES = ("a1", "a2", "v1", "v2", "g1", "g2")

# A shape is a tuple of dimension names (see ``_dims``) or literal sizes.
# Global tensors, in llama.cpp's converter order (the first three before the blocks, the rest after).
_GLOBAL_HEAD = (
    ("token_embd.weight", "emb.weight", ("V", "C")),
    ("token_embd_norm.weight", "ln0.weight", ("C",)),
    ("token_embd_norm.bias", "ln0.bias", ("C",)),
)
_GLOBAL_TAIL = (
    ("output_norm.weight", "ln_out.weight", ("C",)),
    ("output_norm.bias", "ln_out.bias", ("C",)),
    ("output.weight", "head.weight", ("V", "C")),
)
# The 28 tensors of every block: GGUF name after ``blk.N.``, module path after ``blocks.N.``, shape.
BLOCK_TENSORS = (
    ("attn_norm.weight", "ln1.weight", ("C",)),
    ("attn_norm.bias", "ln1.bias", ("C",)),
    ("attn_norm_2.weight", "ln2.weight", ("C",)),
    ("attn_norm_2.bias", "ln2.bias", ("C",)),
    ("time_mix_lerp_fused.weight", "att.x_lerp", (6, 1, 1, "C")),  # r, w, k, v, a, g; the model holds (6, C)
    ("time_mix_w0.weight", "att.w0", ("C",)),
    ("time_mix_w1.weight", "att.w1", ("Dw", "C")),
    ("time_mix_w2.weight", "att.w2", ("C", "Dw")),
    ("time_mix_a0.weight", "att.a0", ("C",)),
    ("time_mix_a1.weight", "att.a1", ("Da", "C")),
    ("time_mix_a2.weight", "att.a2", ("C", "Da")),
    ("time_mix_v0.weight", "att.v0", ("C",)),
    ("time_mix_v1.weight", "att.v1", ("Dv", "C")),
    ("time_mix_v2.weight", "att.v2", ("C", "Dv")),
    ("time_mix_g1.weight", "att.g1", ("Dg", "C")),
    ("time_mix_g2.weight", "att.g2", ("C", "Dg")),
    ("time_mix_k_k.weight", "att.k_k", ("C",)),
    ("time_mix_k_a.weight", "att.k_a", ("C",)),
    ("time_mix_r_k.weight", "att.r_k", ("C",)),
    ("time_mix_key.weight", "att.key.weight", ("C", "C")),
    ("time_mix_value.weight", "att.value.weight", ("C", "C")),
    ("time_mix_receptance.weight", "att.receptance.weight", ("C", "C")),
    ("time_mix_ln.weight", "att.ln_x.weight", ("C",)),
    ("time_mix_ln.bias", "att.ln_x.bias", ("C",)),
    ("time_mix_output.weight", "att.output.weight", ("C", "C")),
    ("channel_mix_lerp_k.weight", "ffn.x_k", ("C",)),
    ("channel_mix_key.weight", "ffn.key.weight", ("F", "C")),
    ("channel_mix_value.weight", "ffn.value.weight", ("C", "F")),
)
LERP_MODULE = "att.x_lerp"
# Layer 0 has no value-residual mix; llama.cpp's converter writes copies of a0/a1/a2 there.
LAYER0_COPIES = {"time_mix_v0.weight": "time_mix_a0.weight", "time_mix_v1.weight": "time_mix_a1.weight",
                 "time_mix_v2.weight": "time_mix_a2.weight"}

_GLOBAL_NAMES = {gguf: module for gguf, module, _ in _GLOBAL_HEAD + _GLOBAL_TAIL}
_BLOCK_NAMES = {gguf: module for gguf, module, _ in BLOCK_TENSORS}


def _dims(args: ModelArgs, layer: int | None) -> dict[str, int]:
    return {"C": args.n_embd, "F": args.ffn_dim, "V": args.vocab_size, "Dw": args.decay_rank,
            "Da": args.iclr_rank, "Dg": args.gate_rank,
            "Dv": args.iclr_rank if layer == 0 else args.value_rank}  # layer 0's v1/v2 copy a1/a2


def _shape(spec: tuple, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in spec)


def block_tensor_name(layer: int, name: str) -> str:
    return f"blk.{layer}.{name}"


def gguf_tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor an rwkv7 GGUF holds, with its numpy shape, in llama.cpp's converter order."""
    dims = _dims(args, None)
    shapes = {name: _shape(spec, dims) for name, _, spec in _GLOBAL_HEAD}
    for i in range(args.n_layer):
        dims = _dims(args, i)
        shapes.update({block_tensor_name(i, name): _shape(spec, dims) for name, _, spec in BLOCK_TENSORS})
    dims = _dims(args, None)
    shapes.update({name: _shape(spec, dims) for name, _, spec in _GLOBAL_TAIL})
    return shapes


def gguf_to_module_name(name: str) -> str | None:
    """Module path for a GGUF tensor name; None for tensors the model ignores; KeyError for strangers."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        layer, rest = int(parts[1]), parts[2]
        if layer == 0 and rest in LAYER0_COPIES:
            return None  # layer 0's v0/v1/v2 are converter dummies (copies of a0/a1/a2)
        return f"blocks.{layer}.{_BLOCK_NAMES[rest]}"
    raise KeyError(name)


# The LoRA ranks of ``ModelArgs``, in order, and the down matrix each is the size of.
LORA_RANKS = {"decay_rank": "att.w1", "iclr_rank": "att.a1", "value_rank": "att.v1", "gate_rank": "att.g1"}


def rank_sources(n_layer: int) -> dict[str, str]:
    """For each LoRA rank, the module path of the matrix a file gives it by: block 0's, but the value
    LoRA's from block 1 (layer 0 has none; a one-layer model's is the iclr rank, which its v1 copies)."""
    out = {field: f"blocks.0.{module}" for field, module in LORA_RANKS.items()}
    out["value_rank"] = "blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.a1"
    return out


def module_to_gguf_name(path: str) -> str:
    """The GGUF name of a module path (``blocks.0.att.w1`` -> ``blk.0.time_mix_w1.weight``)."""
    for gguf, module in _GLOBAL_NAMES.items():
        if module == path:
            return gguf
    _, layer, rest = path.split(".", 2)
    return block_tensor_name(int(layer), next(g for g, m in _BLOCK_NAMES.items() if m == rest))


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every model parameter (module path) with the shape the model holds: the file's, but lerp as (6, C)."""
    shapes = {}
    for name, shape in gguf_tensor_shapes(args).items():
        path = gguf_to_module_name(name)
        if path is not None:
            shapes[path] = (6, args.n_embd) if path.endswith(LERP_MODULE) else shape
    return shapes


def matrix_modules(args: ModelArgs) -> list[str]:
    """Module paths of every matrix stored as a layer (``emb``, ``head``, ``blocks.N.att.key``, ...)."""
    return [*GLOBAL_MATRICES, *(f"blocks.{i}.{m}" for i in range(args.n_layer) for m in MATRIX_MODULES)]


def matrix_weights(args: ModelArgs) -> set[str]:
    """The ``.weight`` paths of ``matrix_modules``: the tensors converted into a layer's storage form."""
    return {f"{m}.weight" for m in matrix_modules(args)}
