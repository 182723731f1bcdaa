"""State as a value: save after a prefix and continue, refuse the wrong model, batch and unbatch,
BlinkDL state-tuning files.

The models are tiny RWKV-7 GGUF files written by rwkv_mlx.testing.synthetic (conftest.py)
(2 heads of 64, so per-head layouts matter); the float64 numpy reference
(tests/reference_rwkv7.py, which shares no code with rwkv_mlx) is the judge of
"the same logits as reading the whole text".
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import TEXT, reference, split_at_turn, tiny_model, to_np, write_torch_zip

import rwkv_mlx
from rwkv_mlx.errors import InvalidArgumentError, ModelFileError
from rwkv_mlx.formats.pth import load_pth
from rwkv_mlx.model.state import State

# --------------------------------------------------------------------------------------
# save after a prefix, continue later


def test_state_saved_after_prefix_continues_like_the_whole_text(tmp_path):
    model, tokenizer = tiny_model()
    prefix, rest = split_at_turn(tokenizer, TEXT)
    whole = to_np(model(mx.array([prefix + rest]))[0])[0]
    ref64, _ = reference().run(prefix + rest)
    assert np.abs(whole - ref64).max() < 1e-3  # our one-pass run is itself right

    cached = rwkv_mlx.cache_prompt(model, tokenizer, prefix)
    path = cached.save(tmp_path / "system.state")
    assert path == tmp_path / "system.state" and sorted(p.name for p in tmp_path.iterdir()) == ["system.state"]
    loaded = State.load(path, model)
    for a, b in zip(cached.arrays(), loaded.arrays()):
        assert a.dtype == b.dtype and np.array_equal(to_np(a), to_np(b))  # bit-exact round trip

    continued = to_np(model(mx.array([rest]), loaded)[0])[0]
    n = len(prefix)
    assert np.abs(continued - whole[n:]).max() < 1e-4
    assert np.abs(continued - ref64[n:]).max() < 1e-3
    assert (continued.argmax(-1) == ref64[n:].argmax(-1)).all()


def test_state_wkv_matches_float64_reference():
    """The state itself (not only the logits) is what the float64 reference carries, in its layout."""
    model, tokenizer = tiny_model()
    ids = tokenizer.encode(TEXT)
    state = rwkv_mlx.cache_prompt(model, tokenizer, ids)
    _, ref_state = reference().run(ids)
    for layer, (att_x, ffn_x, wkv) in enumerate(ref_state):
        assert np.abs(to_np(state.att_x[layer])[0] - att_x).max() < 1e-4
        assert np.abs(to_np(state.ffn_x[layer])[0] - ffn_x).max() < 1e-4
        assert np.abs(to_np(state.wkv[layer])[0] - wkv).max() < 1e-4


# --------------------------------------------------------------------------------------
# the wrong model


def test_state_refuses_a_different_model(tmp_path):
    model, tokenizer = tiny_model(seed=1)
    other, _ = tiny_model(seed=2)  # same shape, other weights
    deeper, _ = tiny_model(seed=1, n_layer=3)
    path = rwkv_mlx.cache_prompt(model, tokenizer, "hello").save(tmp_path / "hello.safetensors")

    with pytest.raises(ModelFileError) as err:
        State.load(path, other)
    message = str(err.value)
    assert str(path) in message and model.fingerprint in message and other.fingerprint in message
    assert "belongs to" in message

    relaxed = State.load(path, other, strict=False)  # same shape: allowed when asked for
    assert relaxed.n_layer == 2
    with pytest.raises(ModelFileError, match="3 layers"):
        State.load(path, deeper, strict=False)
    assert model.fingerprint != other.fingerprint


def test_state_save_needs_to_know_its_model(tmp_path):
    model, _ = tiny_model()
    bare = State.zeros(model.args)
    with pytest.raises(InvalidArgumentError, match="which model"):
        bare.save(tmp_path / "x.state")
    bare.save(tmp_path / "x.state", model)
    assert State.load(tmp_path / "x.state", model).model_id.fingerprint == model.fingerprint
    deeper, _ = tiny_model(seed=1, n_layer=3)
    with pytest.raises(ModelFileError, match="do not fit"):
        bare.save(tmp_path / "y.state", deeper)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.state"]


def test_bad_state_files(tmp_path):
    model, _ = tiny_model()
    with pytest.raises(ModelFileError, match="no such state file"):
        State.load(tmp_path / "missing.state", model)
    (tmp_path / "junk.state").write_bytes(b"definitely not safetensors")
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        State.load(tmp_path / "junk.state", model)
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"x": mx.zeros((2,))})
    with pytest.raises(ModelFileError, match="not an rwkv-mlx state file"):
        State.load(tmp_path / "plain.safetensors", model)
    with pytest.raises(ModelFileError, match="cannot write"):
        State.zeros(model.args).save(tmp_path / "no" / "dir" / "x.state", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.state", "plain.safetensors"]


# --------------------------------------------------------------------------------------
# batches of states


def test_stack_split_and_rows():
    model, tokenizer = tiny_model()
    a = rwkv_mlx.cache_prompt(model, tokenizer, "a short one")
    b = rwkv_mlx.cache_prompt(model, tokenizer, "and a rather longer prompt than that")
    c = rwkv_mlx.cache_prompt(model, tokenizer, "x")
    batch = State.stack([a, State.stack([b, c])])
    assert batch.batch_size == 3 and batch.model_id == a.model_id
    for got, want in zip([batch[0], batch[1], batch[-1]], [a, b, c]):
        for x, y in zip(got.arrays(), want.arrays()):
            assert x.shape == y.shape and np.array_equal(to_np(x), to_np(y))
    assert [s.batch_size for s in batch.split()] == [1, 1, 1]
    assert batch[1:3].batch_size == 2
    with pytest.raises(InvalidArgumentError, match="out of range"):
        batch[3]
    deeper, _ = tiny_model(seed=1, n_layer=3)
    with pytest.raises(InvalidArgumentError, match="different shapes"):
        State.stack([a, State.zeros(deeper.args)])
    with pytest.raises(InvalidArgumentError):
        State.stack([])


def test_size_and_repr():
    model, _ = tiny_model()
    args = model.args
    state = State.zeros(args, batch_size=2)
    expected = 2 * args.n_layer * (2 * args.n_embd + args.n_head * args.head_size**2) * 4
    assert state.nbytes == expected
    text = repr(state.owned_by(model))
    assert "batch=2" in text and "layers=2" in text and "2x64x64 float32" in text and model.fingerprint in text
    assert f"{expected / 1024:.1f} KiB" in text


# --------------------------------------------------------------------------------------
# BlinkDL state-tuning files


def test_torch_zip_writer_is_read_back():
    """The fixture writer and the package's reader agree on plain arrays (shape, order, values)."""
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((2, 3, 4)).astype(np.float32), "b.c": np.arange(5, dtype=np.float32)}
    with tempfile.TemporaryDirectory() as d:
        write_torch_zip(Path(d) / "t.pth", arrays)
        back = load_pth(Path(d) / "t.pth")
    assert set(back) == set(arrays)
    for name, a in arrays.items():
        assert np.array_equal(np.asarray(back[name]), a)


def test_state_tuning_file_is_transposed_and_changes_the_output(tmp_path):
    model, tokenizer = tiny_model()
    args = model.args
    # A known state: the WKV matrices after reading some text, with zero token-shift parts
    # (a state-tuning file holds only the WKV part).
    known = rwkv_mlx.cache_prompt(model, tokenizer, "Tuned to talk like a pirate.\n\n")
    known = State(State.zeros(args).att_x, State.zeros(args).ffn_x, known.wkv)
    # BlinkDL's files store each (H, N, N) matrix transposed (key-by-value).
    tuned = {f"blocks.{i}.att.time_state": to_np(known.wkv[i])[0].transpose(0, 2, 1) for i in range(args.n_layer)}
    write_torch_zip(tmp_path / "tuned.pth", tuned)

    state = State.from_state_tuning(tmp_path / "tuned.pth", model)
    ids = tokenizer.encode("User: hi\n\nAssistant:")
    got = to_np(model(mx.array([ids]), state)[0])[0]
    want = to_np(model(mx.array([ids]), known)[0])[0]
    assert np.abs(got - want).max() < 1e-5
    zero = to_np(model(mx.array([ids]))[0])[0]
    assert np.abs(got - zero).max() > 0.1  # the tuned state changes what the model says

    # not transposing would be a different (wrong) state: the test above can tell
    untransposed = State(known.att_x, known.ffn_x, [w.transpose(0, 1, 3, 2) for w in known.wkv])
    assert np.abs(to_np(model(mx.array([ids]), untransposed)[0])[0] - want).max() > 0.1


def test_state_tuning_file_errors(tmp_path):
    model, _ = tiny_model()
    H, N = model.args.n_head, model.args.head_size
    write_torch_zip(tmp_path / "short.pth", {"blocks.0.att.time_state": np.zeros((H, N, N))})
    with pytest.raises(ModelFileError, match="missing blocks.1.att.time_state"):
        State.from_state_tuning(tmp_path / "short.pth", model)
    write_torch_zip(tmp_path / "wide.pth", {f"blocks.{i}.att.time_state": np.zeros((H + 1, N, N)) for i in range(2)})
    with pytest.raises(ModelFileError, match=r"shape \[3, 64, 64\], this model needs \[2, 64, 64\]"):
        State.from_state_tuning(tmp_path / "wide.pth", model)
    write_torch_zip(tmp_path / "weights.pth", {"blocks.0.att.key.weight": np.zeros((4, 4))})
    with pytest.raises(ModelFileError, match="not a state-tuning file"):
        State.from_state_tuning(tmp_path / "weights.pth", model)
    bad = {f"blocks.{i}.att.time_state": np.full((H, N, N), np.nan) for i in range(2)}
    write_torch_zip(tmp_path / "nan.pth", bad)
    with pytest.raises(ModelFileError, match="NaN"):
        State.from_state_tuning(tmp_path / "nan.pth", model)
