"""``--format mlx-lm``: ``mlx_lm.load`` runs our conversions with its own ``rwkv7`` model and tokenizer.

mlx-lm is an optional peer (``pip install rwkv-mlx[peers]``); without it these tests
skip.  Its logits are compared with ours on the same converted weights: float32
weights agree to float32 rounding (mlx-lm's l2-norm eps 1e-7 and decay literal
0.606531 differ from ours below that); with float16 scales mlx-lm's QuantizedEmbedding
dequantizes embedding rows in float16 (ours: float32), measured max 0.032 on fixa, 0.011 on fixb.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import ORACLE, TINY_TOKENS, oracle_tokens

import rwkv_mlx
from rwkv_mlx.loader.convert import convert
from rwkv_mlx.formats.mlx_dir import TokenList
from rwkv_mlx.formats.mlx_lm_format import tokenizer_json, trie_regex
from rwkv_mlx.text.tokenizer import Tokenizer
from rwkv_mlx.model.weights import LoadOptions

CPU = LoadOptions.for_backend("cpu")
TEXTS = [
    "User: Hello, world! 今天是美好的一天。\n\nAssistant: <think",
    "<s> <|endoftext|> \x00\x01\t\r\n \\x41 'quotes' \"double\" [brackets] (parens) {braces} a|b ^$*+?.",
    "Ünïcödé — emoji 😀🎉, Ελληνικά, русский, العربية, 日本語のテキスト",
]


@pytest.fixture(scope="module")
def mlx_lm():
    return pytest.importorskip("mlx_lm", reason="mlx-lm not installed (optional: pip install 'rwkv-mlx[peers]')")


@pytest.fixture(scope="module")
def float_source(tiny_gguf_files):
    """(GGUF path, tokens, dtype option) of a file whose conversion is all float32."""
    oracle = ORACLE / "models" / "fixa-f32.gguf"
    if oracle.is_file():
        return oracle, oracle_tokens("fixa"), None
    return tiny_gguf_files["F16"], TINY_TOKENS, "float32"


def _logits(model, tokens) -> np.ndarray:
    out = model(mx.array([tokens]))
    return np.array((out[0] if isinstance(out, tuple) else out).astype(mx.float32))[0]


def test_keep_round_trip_matches_ours(mlx_lm, float_source, tmp_path):
    src, tokens, dtype = float_source
    convert(src, tmp_path / "lm", fmt="mlx-lm", dtype=dtype)
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert config["model_type"] == "rwkv7" and "quantization" not in config and config["eos_token_id"] == [0, 261]
    model, tokenizer = mlx_lm.load(str(tmp_path / "lm"))
    ours, _ = rwkv_mlx.load(src, CPU)
    assert np.abs(_logits(model, tokens) - _logits(ours, tokens)).max() < 1e-4
    _, our_tok = rwkv_mlx.load(src, CPU)
    for text in TEXTS:
        assert tokenizer.encode(text) == our_tok.encode(text), text
        assert tokenizer.decode(our_tok.encode(text)) == our_tok.decode(our_tok.encode(text))


@pytest.mark.parametrize("dtype,bound", [(None, 0.06), ("float32", 1e-4)])
def test_quantized_round_trip(mlx_lm, float_source, tmp_path, dtype, bound):
    """Same 4-bit weights in both formats; float16 scales: mlx-lm rounds embedding rows to float16."""
    src, tokens, _ = float_source
    convert(src, tmp_path / "lm", quantize=4, fmt="mlx-lm", dtype=dtype)
    convert(src, tmp_path / "ours", quantize=4, dtype=dtype)
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    model, _ = mlx_lm.load(str(tmp_path / "lm"))
    assert type(model.model.embeddings).__name__ == "QuantizedEmbedding" and model.lm_head.bits == 8
    assert model.model.layers[1].attn.k_proj.bits == 4
    ours, _ = rwkv_mlx.load(tmp_path / "ours", CPU)
    diff = np.abs(_logits(model, tokens) - _logits(ours, tokens)).max()
    assert diff < bound


def test_ggml_blocks_are_dequantized_for_mlx_lm(mlx_lm, tiny_gguf_files, tmp_path):
    src = tiny_gguf_files["Q4_K_M"]
    report = convert(src, tmp_path / "lm", fmt="mlx-lm")
    head = next(r for r in report.rows if r.name == "head.weight")
    assert head.fmt.kind == "dense" and head.fmt.dtype == "float32" and "dequantized Q6_K" in head.note
    model, _ = mlx_lm.load(str(tmp_path / "lm"))
    ours, _ = rwkv_mlx.load(src, CPU)
    assert np.abs(_logits(model, TINY_TOKENS) - _logits(ours, TINY_TOKENS)).max() < 1e-4


def test_streaming_detokenizer_reproduces_text(mlx_lm, float_source, tmp_path):
    src, _, dtype = float_source
    convert(src, tmp_path / "lm", fmt="mlx-lm", dtype=dtype)
    _, tokenizer = mlx_lm.load(str(tmp_path / "lm"))
    detok = tokenizer.detokenizer
    text = TEXTS[0] + " " + TEXTS[2]
    detok.reset()
    for t in tokenizer.encode(text):
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text


def test_tokenizer_json_is_the_world_tokenizer(tmp_path):
    """The full world vocabulary through the ``tokenizers`` library alone (no transformers, no mlx-lm)."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers not installed (comes with mlx-lm)")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(TokenList.world(65536))))
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = Tokenizer.from_vocab_file()
    shakespeare = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    texts = TEXTS + ([shakespeare.read_text()[:20000]] if shakespeare.is_file() else [])
    for text in texts:
        ids = hf.encode(text).ids
        assert ids == ours.encode(text)
        assert hf.decode(ids) == text
    assert hf.encode("User: Hello, world! 今天是美好的一天。\n\nAssistant: <think").ids == [
        24281, 59, 36786, 45, 40213, 34, 33, 10381, 11639, 13091, 15597, 11685, 14734, 10250, 11639, 28329, 11, 5585,
        41693, 59, 295, 35762]


def test_trie_regex_prefers_the_longest_token():
    import re

    tokens = [b"a", b"ab", b"abc", b"b", b"c", b"ca", b"(", b"(x", b"x"]
    pattern = re.compile(trie_regex(tokens))  # the Oniguruma syntax used is also Python syntax
    table = {t.decode("latin-1"): t for t in tokens}
    pieces = [m.group(0) for m in pattern.finditer("abcab(xca(")]
    assert pieces == ["abc", "ab", "(x", "ca", "("] and all(p in table for p in pieces)


def test_unquantized_mlx_lm_dir_converts_back_exactly(tiny_gguf_files, tmp_path, capsys):
    """An mlx-lm directory holds fla-hub names: our HF reader takes it back to the same model (no mlx-lm needed)."""
    from rwkv_mlx.cli import run

    src = tiny_gguf_files["F16"]
    convert(src, tmp_path / "lm", fmt="mlx-lm")
    assert run(["info", str(tmp_path / "lm")]) == 0
    out = capsys.readouterr().out
    assert "mlx-lm directory (model_type rwkv7)" in out and "tiny-F16.gguf (gguf)" in out
    convert(tmp_path / "lm", tmp_path / "back")
    gguf_model, _ = rwkv_mlx.load(src, CPU)
    back, _ = rwkv_mlx.load(tmp_path / "back", CPU)
    assert np.array_equal(_logits(back, TINY_TOKENS), _logits(gguf_model, TINY_TOKENS))
