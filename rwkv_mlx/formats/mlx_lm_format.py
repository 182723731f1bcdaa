"""``--format mlx-lm``: a directory that ``mlx_lm.load`` runs with its ``rwkv7`` model (mlx-lm 0.32).

mlx-lm reads ``config.json`` (``model_type: rwkv7`` and its ``ModelArgs`` keys),
every ``model*.safetensors`` (fla-hub parameter names: ``model.layers.N.attn.r_proj``,
``attn.w_lora.lora.0`` ...) and a Hugging Face tokenizer (``AutoTokenizer``).
Quantized layers are ``nn.QuantizedLinear``/``QuantizedEmbedding`` whose group size
and bits mlx-lm infers per layer from the shapes of ``weight`` and ``scales``, so
mixed bits (8-bit embeddings, 4-bit matrices, exact GGUF group-32 layers) load as
they are.  GGUF-only block types (Q6_K, Q3_K, Q2_K) have no mlx-lm layer: the
policy dequantizes them (``--quantize keep``) or requantizes them (``--quantize N``).

The tokenizer needs no remote code and no network: ``tokenizer.json`` for the
``tokenizers`` library expresses the world tokenizer's greedy longest match
exactly -- a ByteLevel pre-tokenizer maps bytes to characters, a ``Split``
pre-tokenizer whose regex is the vocabulary's trie (at each position the leftmost
alternative that matches is the longest token) cuts the text into tokens, and a
``WordLevel`` model maps each piece to its id.  The ByteLevel decoder inverts it.
Id 0 (end-of-text) is the unknown token; no text encodes to it.  Text that is not
valid Unicode (lone surrogates) cannot be passed to ``tokenizers``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx

from ..layers import WeightFormat
from .mlx_dir import SHARD_BYTES, ConvertedTensor, ShardWriter, TokenList
from ..arch import ModelArgs
from ..version import __version__
from .vocab import byte_trie, trie_pattern

END_OF_TEXT = "<|endoftext|>"
_LERP = ("r", "w", "k", "v", "a", "g")
_ATT = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_LORA = {"1": "lora.0.weight", "2": "lora.2.weight", "0": "lora.2.bias"}


def mlx_lm_names(t: ConvertedTensor, args: ModelArgs) -> dict[str, mx.array]:
    """One of our parameters under mlx-lm's names and shapes."""
    arrays = t.named_arrays()
    name = t.name
    if name.endswith("att.x_lerp"):
        layer = name.split(".")[1]
        lerp = arrays[name]
        return {f"model.layers.{layer}.attn.x_{c}": lerp[i].reshape(1, 1, -1) for i, c in enumerate(_LERP)}
    out = {}
    for key, array in arrays.items():
        out[_rename(key)] = array.reshape(args.n_head, args.head_size) if key.endswith("att.r_k") else array
    return out


def _rename(key: str) -> str:
    if key.startswith("emb."):
        return "model.embeddings." + key[len("emb."):]
    if key.startswith("head."):
        return "lm_head." + key[len("head."):]
    if key.startswith("ln_out."):
        return "model.norm." + key[len("ln_out."):]
    if key.startswith("ln0."):
        return "model.layers.0.pre_norm." + key[len("ln0."):]
    _, layer, part, rest = key.split(".", 3)
    prefix = f"model.layers.{layer}."
    if part in ("ln1", "ln2"):
        return prefix + ("attn_norm." if part == "ln1" else "ffn_norm.") + rest
    if part == "ffn":
        return prefix + "ffn." + rest
    head, _, tail = rest.partition(".")
    if len(head) == 2 and head[0] in "wavg" and head[1] in _LORA:
        return prefix + f"attn.{head[0]}_lora.{_LORA[head[1]]}"
    return prefix + "attn." + _ATT.get(head, head) + ("." + tail if tail else "")


def mlx_lm_config(args: ModelArgs, formats: dict[str, WeightFormat], eos: list[int]) -> dict:
    config = {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.n_embd,
        "intermediate_size": args.ffn_dim,
        "norm_eps": args.norm_eps,
        "head_dim": args.head_size,
        "num_hidden_layers": args.n_layer,
        "a_low_rank_dim": args.iclr_rank,
        "v_low_rank_dim": args.value_rank,
        "gate_low_rank_dim": args.gate_rank,
        "decay_low_rank_dim": args.decay_rank,
        "tie_word_embeddings": False,
        "eos_token_id": eos,
    }
    affine = [f for f in formats.values() if f.kind == "affine"]
    if affine:
        # per-layer bits and group size are inferred from the tensors; these are only mlx-lm's defaults
        common = max(affine, key=lambda f: sum(g == f for g in affine))
        config["quantization"] = {"group_size": common.group_size, "bits": common.bits, "mode": "affine"}
        config["quantization_config"] = dict(config["quantization"])
    return config


# --------------------------------------------------------------------------------------
# the tokenizer


def _byte_chars() -> list[str]:
    """The ByteLevel (GPT-2) byte -> character table: printable Latin-1 as itself, the rest from U+0100 on."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


_BYTE_CHARS = _byte_chars()


def _regex_literal(data: bytes) -> str:
    # Oniguruma: a backslash before any ASCII punctuation makes it literal (inside classes too)
    return "".join("\\" + c if c.isascii() and not c.isalnum() else c for c in (_BYTE_CHARS[b] for b in data))


def trie_regex(tokens: Iterable[bytes]) -> str:
    """An Oniguruma regex over ByteLevel characters whose leftmost match is the longest token
    (the tokenizer's own trie alternation, written in this dialect)."""

    def byte_class(values: list[int]) -> str:
        return _regex_literal(bytes(values)) if len(values) == 1 else "[" + _regex_literal(bytes(values)) + "]"

    return trie_pattern(byte_trie(tokens), _regex_literal, byte_class)


def tokenizer_json(tokens: TokenList) -> dict:
    text = tokens.text_tokens()
    vocab = {END_OF_TEXT: 0}
    for token_id, data in text.items():
        vocab.setdefault("".join(_BYTE_CHARS[b] for b in data), token_id)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            byte_level,
            {"type": "Split", "pattern": {"Regex": trie_regex(text.values())}, "behavior": "Isolated", "invert": False},
        ]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": END_OF_TEXT},
    }


def write_hf_tokenizer(out_dir: Path, tokens: TokenList) -> None:
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens), ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,  # RWKV has no context limit
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


# --------------------------------------------------------------------------------------
# the writer


def save_mlx_lm_dir(out_dir: str | os.PathLike, args: ModelArgs, tensors: Iterable[ConvertedTensor], tokens: TokenList,
                    *, source: dict | Callable[[], dict] | None = None,
                    on_tensor: Callable[[ConvertedTensor], None] | None = None, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write an mlx-lm ``rwkv7`` directory into ``out_dir``; returns its config.json."""
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, shard_bytes)
    formats: dict[str, WeightFormat] = {}
    for t in tensors:
        if t.fmt is not None:
            if t.fmt.kind == "ggml":
                raise ValueError(f"{t.name}: GGUF block format reached the mlx-lm writer")  # the policy prevents it
            formats[t.module] = t.fmt
        writer.add(mlx_lm_names(t, args))
        if on_tensor:
            on_tensor(t)
    writer.close()
    eos = [0] + ([tokens.eot_token_id] if tokens.eot_token_id else [])
    config = mlx_lm_config(args, formats, eos)
    src = source() if callable(source) else source
    config["rwkv_mlx"] = {"version": __version__, "source": src or {}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    write_hf_tokenizer(out_dir, tokens)
    return {**config, "weight_bytes": writer.total_bytes}
