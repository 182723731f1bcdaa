"""RWKV-7 GGUF writer: llama.cpp's layout, per-tensor type policy, streaming, and the
synthetic-model script.  Files written by real llama.cpp (the oracle) are the reference
where present; the tests that need none of them still run when it is absent."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from rwkv_mlx.arch import ModelArgs, gguf_tensor_shapes
from rwkv_mlx.formats import gguf_writer as W
from rwkv_mlx import quants as Q
from rwkv_mlx.errors import InvalidArgumentError, ModelFileError
from rwkv_mlx.formats.vocab import BUNDLED_WORLD_VOCAB, escape_gguf_token, load_world_vocab
from rwkv_mlx.testing import synthetic as synth

REPO = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ.get("RWKV_MLX_ORACLE", REPO.parent / "shared" / "oracle"))
MODELS = ORACLE / "models"
ORACLE_MISSING = f"oracle GGUF files not found under {MODELS} (set RWKV_MLX_ORACLE)"

# the oracle's two shapes; both files hold the first 4096 tokens of the world vocabulary
FIXA = ModelArgs(vocab_size=4096, n_embd=256, n_layer=2, head_size=64, ffn_dim=1024, decay_rank=32, iclr_rank=32,
                 value_rank=16, gate_rank=64, norm_eps=1e-5)
FIXB = ModelArgs(vocab_size=4096, n_embd=128, n_layer=2, head_size=64, ffn_dim=512, decay_rank=32, iclr_rank=32,
                 value_rank=32, gate_rank=32, norm_eps=1e-5)
# our own encoders: their bytes differ from llama-quantize's (values are close, see test_quants)
OWN = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS}


def oracle_paths() -> list[Path]:
    return sorted(MODELS.glob("*.gguf")) if MODELS.is_dir() else []


def file_type_of(path: Path) -> str:
    ft = path.stem.split("-", 1)[1]
    return ft.upper() if ft in ("f32", "f16") else ft


def np_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))


def read_floats(path: Path) -> dict[str, np.ndarray]:
    return {t.name: Q.dequantize(np.asarray(t.data), t.tensor_type).reshape(np_shape(t)) for t in GGUFReader(path).tensors}


def fields(reader: GGUFReader) -> list[tuple[str, list[int], object]]:
    return [(k, [int(x) for x in f.types], f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")]


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def oracle_f16_weights():
    if not (MODELS / "fixa-f16.gguf").is_file():
        pytest.skip(ORACLE_MISSING)
    return {fam: read_floats(MODELS / f"{fam}-f16.gguf") for fam in ("fixa", "fixb")}


# --------------------------------------------------------------------------------------
# against every oracle file


@pytest.mark.parametrize("path", oracle_paths() or [None], ids=lambda p: p.stem if p else "absent")
def test_policy_reproduces_oracle_file(path):
    """Per-tensor types, tensor order and shapes of every llama.cpp file follow from our policy."""
    if path is None:
        pytest.skip(ORACLE_MISSING)
    reader = GGUFReader(path)
    hp = FIXA if path.stem.startswith("fixa") else FIXB
    ft = file_type_of(path)
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    shapes = gguf_tensor_shapes(dataclasses.replace(hp, vocab_size=n_vocab))
    names = list(shapes) if ft in ("F32", "F16") else W.quantized_order(list(shapes))
    assert [t.name for t in reader.tensors] == names
    for t in reader.tensors:
        assert np_shape(t) == shapes[t.name], t.name
        assert T(t.tensor_type) == W.tensor_type(t.name, shapes[t.name], ft), t.name
    assert int(_field(reader, "general.file_type")) == int(W.FILE_TYPES[ft].ftype)


@pytest.mark.parametrize("path", oracle_paths() or [None], ids=lambda p: p.stem if p else "absent")
def test_rewrite_oracle_file(path, tmp_path, oracle_f16_weights):
    """Writing the oracle's weights (as stored in its F16 file, which llama-quantize started
    from) with the file's type gives the same metadata, tensor table and -- for every tensor
    not made by one of our own K/IQ encoders -- the same bytes.  F32/F16/BF16/Q8_0 files
    come out byte-identical."""
    if path is None:
        pytest.skip(ORACLE_MISSING)
    family, ft = path.stem.split("-", 1)[0], file_type_of(path)
    hp = FIXA if family == "fixa" else FIXB
    ref = GGUFReader(path)
    weights = read_floats(path) if ft == "F32" else oracle_f16_weights[family]
    out = tmp_path / path.name
    W.write_rwkv7_gguf(
        out, hp, weights, ft,
        tokens=None,  # the world vocabulary shipped with rwkv-mlx, truncated to 4096 like the oracle's
        name=_field(ref, "general.name"), chat_template=_field(ref, "tokenizer.chat_template"),
    )
    got = GGUFReader(out)
    assert fields(got) == fields(ref)
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in got.tensors] == [
        (t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ref.tensors
    ]
    differ = [
        t.name for t, r in zip(got.tensors, ref.tensors)
        if not np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(r.data).view(np.uint8))
    ]
    assert all(T(r.tensor_type) in OWN for r in ref.tensors if r.name in differ), differ
    if ft in ("F32", "F16", "BF16", "Q8_0"):
        assert out.read_bytes() == path.read_bytes()


def test_fixa_f32_roundtrip_and_metadata(tmp_path):
    """F32 from the oracle's fixa weights: tensors read back identical; metadata equal key for
    key except tokenizer.chat_template, which is written only when given."""
    src = MODELS / "fixa-f32.gguf"
    if not src.is_file():
        pytest.skip(ORACLE_MISSING)
    weights = read_floats(src)
    ref = GGUFReader(src)
    out = tmp_path / "fixa.gguf"
    types = W.write_rwkv7_gguf(out, FIXA, weights, "F32", name=_field(ref, "general.name"))
    assert set(types.values()) == {T.F32}
    got = GGUFReader(out)
    for t in got.tensors:
        assert np.array_equal(np.asarray(t.data).reshape(np_shape(t)), weights[t.name]), t.name
    ref_fields = [f for f in fields(ref) if f[0] != "tokenizer.chat_template"]
    assert fields(got) == ref_fields


def test_q4_k_m_types_match_oracle(tmp_path):
    src = MODELS / "fixa-Q4_K_M.gguf"
    if not src.is_file():
        pytest.skip(ORACLE_MISSING)
    weights = read_floats(MODELS / "fixa-f32.gguf")
    out = tmp_path / "q4km.gguf"
    W.write_rwkv7_gguf(out, FIXA, weights, "Q4_K_M")
    got = {t.name: T(t.tensor_type) for t in GGUFReader(out).tensors}
    assert got == {t.name: T(t.tensor_type) for t in GGUFReader(src).tensors}
    assert got["output.weight"] == T.Q6_K and got["token_embd.weight"] == T.Q4_K
    assert got["blk.1.time_mix_a1.weight"] == T.F16 and got["blk.1.time_mix_w1.weight"] == T.F32


# --------------------------------------------------------------------------------------
# policy details (no oracle needed)


@pytest.mark.parametrize(
    "ft, ne0, expect_big, expect_out",
    [
        ("Q4_K_M", 256, T.Q4_K, T.Q6_K),
        ("Q4_K_M", 128, T.Q5_0, T.Q8_0),
        ("Q5_K_M", 128, T.Q5_1, T.Q8_0),
        ("Q6_K", 128, T.Q8_0, T.Q8_0),
        ("Q3_K_M", 128, T.IQ4_NL, T.Q8_0),
        ("Q2_K", 128, T.IQ4_NL, T.Q8_0),
        ("IQ4_XS", 128, T.IQ4_NL, T.Q8_0),
        ("IQ4_NL", 128, T.IQ4_NL, T.Q8_0),
        ("IQ4_NL", 256, T.IQ4_NL, T.Q6_K),
        ("Q4_0", 256, T.Q4_0, T.Q6_K),
        ("Q8_0", 256, T.Q8_0, T.Q8_0),
        ("Q4_K_M", 80, T.F16, T.Q8_0),  # not even a multiple of 32: F16 (output: Q8_0 needs 32 too -> F16)
        ("BF16", 128, T.BF16, T.BF16),
        ("F16", 128, T.F16, T.F16),
        ("F32", 128, T.F32, T.F32),
    ],
)
def test_type_policy(ft, ne0, expect_big, expect_out):
    assert W.tensor_type("blk.3.time_mix_key.weight", (ne0, ne0), ft) == expect_big
    out = W.tensor_type("output.weight", (4096, ne0), ft)
    assert out == (T.F16 if ne0 % 32 else expect_out)
    base = T.F32 if ft == "F32" else T.F16
    for small in ("time_mix_a1", "time_mix_a2", "time_mix_v1", "time_mix_v2", "time_mix_g1", "time_mix_g2"):
        assert W.tensor_type(f"blk.0.{small}.weight", (32, ne0), ft) == base
    for f32 in ("time_mix_w1.weight", "time_mix_w2.weight", "time_mix_lerp_fused.weight", "time_mix_w0.weight",
                "attn_norm.weight", "attn_norm_2.bias", "time_mix_ln.weight", "channel_mix_lerp_k.weight"):
        shape = (6, 1, 1, ne0) if "lerp_fused" in f32 else (32, ne0) if f32.startswith("time_mix_w1") else (ne0,)
        assert W.tensor_type(f"blk.0.{f32}", shape, ft) == T.F32
    with pytest.raises(InvalidArgumentError, match="not one of"):
        W.tensor_type("output.weight", (4, 256), "Q7_K")


def test_quantized_order_is_numeric_by_layer():
    names = ["blk.10.a.weight", "output.weight", "blk.2.b.weight", "blk.2.a.weight", "token_embd.weight"]
    assert W.quantized_order(names) == ["output.weight", "token_embd.weight", "blk.2.a.weight", "blk.2.b.weight", "blk.10.a.weight"]


def test_token_list():
    toks, types = W.gguf_token_list(8, {1: b"a", 2: b"\n\n", 3: b"\xff", 5: "é".encode()})
    assert toks == ["<s>", "a", "\\n\\n", "\\xff", "[PAD4]", "\\xc3\\xa9", "[PAD6]", "[PAD7]"]
    assert types == [3, 1, 1, 1, 5, 1, 5, 5]
    assert W.gguf_token_list(3, [b"ignored", b"x", b"y", b"z"])[0] == ["<s>", "x", "y"]


def test_world_token_list_default():
    toks, types = W.gguf_token_list(65536)
    vocab = load_world_vocab(BUNDLED_WORLD_VOCAB)
    assert len(toks) == 65536 and toks[0] == "<s>" and types[0] == 3
    assert toks[1:65530] == [escape_gguf_token(vocab[i]) for i in range(1, 65530)]
    assert toks[65530:] == [f"[PAD{i}]" for i in range(65530, 65536)] and set(types[65530:]) == {5}
    assert toks[W.EOT_TOKEN_ID] == "\\n\\n"


# --------------------------------------------------------------------------------------
# a tiny random model (no oracle)

TINY_VOCAB = 300
TINY = ModelArgs(vocab_size=TINY_VOCAB, n_embd=128, n_layer=3, head_size=64, ffn_dim=512, decay_rank=8, iclr_rank=16,
                 value_rank=8, gate_rank=32, norm_eps=1e-5)


def tiny_weights(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = gguf_tensor_shapes(TINY)
    return {n: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for n, s in shapes.items()}


def tiny_tokens():
    return [b""] + [bytes([i % 256]) * (1 + i // 256) for i in range(1, TINY_VOCAB - 20)]


@pytest.mark.parametrize("ft", ["F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS"])
def test_tiny_random_model(ft, tmp_path):
    w = tiny_weights()
    out = tmp_path / f"tiny-{ft}.gguf"
    types = W.write_rwkv7_gguf(out, TINY, w, ft, tokens=tiny_tokens(), name="tiny")
    r = GGUFReader(out)
    assert [t.name for t in r.tensors] == (list(w) if ft in ("F32", "F16") else W.quantized_order(list(w)))
    assert len(r.tensors) == 6 + 28 * 3
    assert _field(r, "general.architecture") == "rwkv7" and _field(r, "general.name") == "tiny"
    assert _field(r, "rwkv7.attention.decay_lora_rank") == 8 and _field(r, "rwkv7.attention.head_count") == 0
    assert _field(r, "rwkv7.attention.value_residual_mix_lora_rank") == 8
    assert _field(r, "tokenizer.ggml.tokens")[:3] == ["<s>", "\\x01", "\\x02"]
    assert _field(r, "tokenizer.ggml.tokens")[-1] == f"[PAD{TINY_VOCAB - 1}]"
    assert ("general.quantization_version" in r.fields) == (ft not in ("F32", "F16"))
    assert list(r.fields)[-1] == ("general.file_type" if ft not in ("F32", "F16") else "tokenizer.ggml.eot_token_id")
    tol = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 8e-3}.get(ft, 0.35)
    for t in r.tensors:
        qtype = T(t.tensor_type)
        assert qtype == types[t.name] == W.tensor_type(t.name, np_shape(t), ft), t.name
        raw = np.asarray(t.data)
        ours = Q.dequantize(raw, qtype).reshape(np_shape(t))
        theirs = gguf.quants.dequantize(raw, qtype).reshape(np_shape(t))
        assert np.array_equal(ours, theirs), t.name
        src = w[t.name]
        assert np.sqrt(np.mean((ours - src) ** 2) / np.mean(src**2)) <= tol + 1e-12, t.name
    if ft == "Q4_K_M":  # rows of 128: Q4_K falls back to Q5_0; channel_mix_value (ne0 = 512) keeps Q4_K
        assert types["blk.0.time_mix_key.weight"] == T.Q5_0 and types["blk.0.channel_mix_value.weight"] == T.Q4_K
        assert types["output.weight"] == T.Q8_0
    if ft == "IQ4_XS":
        assert types["blk.0.time_mix_key.weight"] == T.IQ4_NL and types["blk.0.channel_mix_value.weight"] == T.IQ4_XS


def test_lazy_tensors_progress_and_atomic_write(tmp_path):
    w = tiny_weights()
    calls: list[str] = []

    def lazy(name):
        def make():
            calls.append(name)
            return w[name]
        return make

    seen = []
    out = tmp_path / "lazy.gguf"
    W.write_rwkv7_gguf(out, TINY, {n: lazy(n) for n in w}, "Q4_K_M", tokens=tiny_tokens(),
                       progress=lambda i, n, name, typ: seen.append((i, n, name, typ)))
    assert sorted(calls) == sorted(w) and len(calls) == len(w)  # each produced exactly once
    assert calls == W.quantized_order(list(w))  # in file order, one at a time
    assert [s[0] for s in seen] == list(range(1, len(w) + 1)) and seen[-1][1] == len(w)
    good = out.read_bytes()

    # an interrupt half way leaves the old file alone and no temporary behind
    def boom():
        raise KeyboardInterrupt

    broken = {n: lazy(n) for n in w}
    broken["blk.1.time_mix_key.weight"] = boom
    with pytest.raises(KeyboardInterrupt):
        W.write_rwkv7_gguf(out, TINY, broken, "Q4_K_M", tokens=tiny_tokens())
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lazy.gguf"]


def test_writer_rejects_bad_input(tmp_path):
    w = tiny_weights()
    out = tmp_path / "bad.gguf"
    with pytest.raises(InvalidArgumentError, match="missing blk.0.time_mix_key.weight"):
        W.write_rwkv7_gguf(out, TINY, {k: v for k, v in w.items() if k != "blk.0.time_mix_key.weight"}, "F16", tokens=[])
    with pytest.raises(InvalidArgumentError, match="unexpected blk.9.x.weight"):
        W.write_rwkv7_gguf(out, TINY, dict(w, **{"blk.9.x.weight": w["output.weight"]}), "F16", tokens=[])
    with pytest.raises(InvalidArgumentError, match="shape"):
        W.write_rwkv7_gguf(out, TINY, dict(w, **{"blk.0.time_mix_key.weight": np.zeros((128, 64), np.float32)}), "F16", tokens=[])
    bad = dict(w)
    bad["blk.2.time_mix_w0.weight"] = np.full(128, np.nan, np.float32)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        W.write_rwkv7_gguf(out, TINY, bad, "Q4_K_M", tokens=[])
    with pytest.raises(InvalidArgumentError, match="must be a ModelArgs, got dict"):
        W.write_rwkv7_gguf(out, TINY.to_dict(), w, "F16", tokens=[])
    with pytest.raises(InvalidArgumentError, match="gate_rank must be positive, got 0"):
        W.write_rwkv7_gguf(out, dataclasses.replace(TINY, gate_rank=0), w, "F16", tokens=[])
    with pytest.raises(InvalidArgumentError, match="file type"):
        W.write_rwkv7_gguf(out, TINY, w, "Q4_K", tokens=[])
    with pytest.raises(ModelFileError, match="cannot write"):
        W.write_rwkv7_gguf(tmp_path / "no" / "such" / "dir.gguf", TINY, w, "F16", tokens=[])
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------
# the synthetic-model builder (rwkv_mlx.testing.synthetic, scripts/make_synthetic_model.py)


@pytest.mark.slow
def test_synthetic_model_small_full_vocab(tmp_path):
    """2 layers, n_embd 256, full 65536 vocabulary, Q4_K_M: loads, types per policy, values as intended."""
    hp = synth.synthetic_args(2, 256, 1024, (32, 32, 16, 64), vocab=65536)
    out = tmp_path / "syn.gguf"
    assert synth.main(["--out", str(out), "--type", "Q4_K_M", "--layers", "2", "--n-embd", "256", "--ffn", "1024",
                       "--ranks", "32,32,16,64", "--seed", "5", "--quiet"]) == 0
    r = GGUFReader(out)
    shapes = gguf_tensor_shapes(hp)
    assert [t.name for t in r.tensors] == W.quantized_order(list(shapes))
    assert len(_field(r, "tokenizer.ggml.tokens")) == 65536
    lazy = synth.synthetic_tensors(hp, seed=5)
    for t in r.tensors:
        assert T(t.tensor_type) == W.tensor_type(t.name, shapes[t.name], "Q4_K_M"), t.name
        vals = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shapes[t.name])
        assert np.isfinite(vals).all()
        kind, a, b = synth._recipe(synth.value_source(t.name), shapes[t.name], hp)
        mean, std = (a, b) if kind == "normal" else ((a + b) / 2, (b - a) / np.sqrt(12))
        tol = 4 * std / np.sqrt(vals.size) + 0.08 * std
        assert abs(vals.mean() - mean) < tol, t.name
        if vals.size >= 256:
            assert abs(vals.std() / std - 1) < 0.1, t.name
        if kind == "uniform":
            assert vals.min() >= a - 1e-3 * abs(b - a) and vals.max() <= b + 1e-3 * abs(b - a), t.name
        if T(t.tensor_type) in (T.F32, T.F16):  # stored exactly (up to fp16 rounding) what the recipe made
            np.testing.assert_allclose(vals, lazy[t.name](), rtol=1e-3, atol=1e-6)
    w = {t.name: np.asarray(t.data) for t in r.tensors}
    for i in range(3):  # layer 0 carries copies of a0/a1/a2 as v0/v1/v2
        assert np.array_equal(w[f"blk.0.time_mix_v{i}.weight"], w[f"blk.0.time_mix_a{i}.weight"])
    assert not np.array_equal(w["blk.1.time_mix_v0.weight"], w["blk.1.time_mix_a0.weight"])


def test_synthetic_model_is_reproducible_and_seeded():
    hp = synth.synthetic_args(1, 64, 256, (8, 8, 8, 8), vocab=1000)
    a = synth.synthetic_tensors(hp, seed=1)
    b = synth.synthetic_tensors(hp, seed=1)
    c = synth.synthetic_tensors(hp, seed=2)
    for name in ("token_embd.weight", "blk.0.time_mix_w0.weight", "output.weight"):
        assert np.array_equal(a[name](), b[name]())
        assert not np.array_equal(a[name](), c[name]())
    w0 = a["blk.0.time_mix_w0.weight"]()
    decay = np.exp(-np.exp(-0.5) / (1 + np.exp(-w0.astype(np.float64))))
    assert 0.55 < decay.min() and decay.max() < 1 and decay.max() - decay.min() > 0.3


def test_synthetic_script_errors(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert synth.main(["--out", str(out), "--n-embd", "100", "--layers", "1", "--quiet"]) == 2
    assert "embedding length 100 is not a multiple of head size 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth.main(["--out", str(out), "--ranks", "1,2,3"])
    assert not out.exists()


def test_synthetic_model_runs_sensibly(tmp_path):
    """Activations stay O(1) and greedy decoding does not collapse (float64 numpy reference)."""
    from reference_rwkv7 import ReferenceRWKV7

    out = tmp_path / "run.gguf"
    synth.make_synthetic_model(out, "F32", synth.synthetic_args(2, 128, 512, (16, 16, 16, 32), vocab=4096), seed=3)
    model = ReferenceRWKV7(out)
    logits, state = model.run([1, 2, 3, 100, 200, 3000])
    assert np.isfinite(logits).all()
    rms = float(np.sqrt((logits**2).mean()))
    assert 2.0 < rms < 4.5
    tok, generated = int(logits[-1].argmax()), []
    for _ in range(12):
        generated.append(tok)
        lg, state = model.step(tok, state)
        tok = int(lg.argmax())
    assert len(set(generated)) >= 6, generated
