"""The torch-free .pth reader, the HF directory reader, and .pth / HF checkpoints converted like GGUF.

The checkpoints are written here, from the weights of a GGUF file, in BlinkDL's and
Hugging Face's own naming and orientation (spec 3.3, inverted by an independent table
below), with a minimal writer of torch.save's zip format (checked against torch
itself where torch is installed) and the ``safetensors`` package's numpy writer.
Converted, they must compute what the GGUF computes: bit for bit when they store the
same values (float16/float32, as the F16 GGUF does), within bfloat16 rounding when
stored as bfloat16 like BlinkDL's releases.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from gguf import quants as gguf_quants

from conftest import ORACLE, oracle_tokens

import rwkv_mlx
from rwkv_mlx.cli import run
from rwkv_mlx.loader.convert import convert
from rwkv_mlx.errors import ModelFileError, UnsupportedModelError
from rwkv_mlx.formats.hf import blinkdl_name, read_hf_dir, read_safetensors, write_safetensors
from rwkv_mlx.formats.pth import load_pth, read_pth
from rwkv_mlx.model.weights import LoadOptions

from rwkv_mlx.testing.fuzz_gguf import run_cli  # the installed command in a fresh interpreter

CPU = LoadOptions.for_backend("cpu")


# --------------------------------------------------------------------------------------
# a minimal torch.save writer: zip of data.pkl (pickle protocol 2) + data/<key> + version + byteorder


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _ints(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


_STORAGE = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage"}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (what torch's .bfloat16() does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_torch_zip(path: Path, tensors: dict[str, tuple[str, np.ndarray]], archive: str = "archive",
                    transposed: set[str] = frozenset()) -> None:
    """tensors: name -> (dtype name, values).  Names in ``transposed`` are stored as a transposed view
    of a (cols, rows) storage, as torch.save writes ``w.t()``."""
    pkl = b"\x80\x02}(" 
    storages = []
    for key, (name, (dtype, values)) in enumerate(tensors.items()):
        values = np.asarray(values)
        if name in transposed:
            storage_values, size, stride = values.T, values.shape, (1, values.shape[0])
        else:
            storage_values = values
            size = values.shape
            stride = tuple(int(np.prod(values.shape[i + 1:])) for i in range(values.ndim))
        raw = bf16_bits(storage_values) if dtype == "bfloat16" else np.ascontiguousarray(storage_values, dtype=dtype)
        storages.append(raw.tobytes())
        pkl += _unicode(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        pkl += b"(" + _unicode("storage") + f"ctorch\n{_STORAGE[dtype]}\n".encode() + _unicode(str(key))
        pkl += _unicode("cpu") + _int(raw.size) + b"tQ"
        pkl += _int(0) + _ints(size) + _ints(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR"
    pkl += b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", pkl)
        zf.writestr(f"{archive}/byteorder", "little")
        for key, data in enumerate(storages):
            zf.writestr(f"{archive}/data/{key}", data)
        zf.writestr(f"{archive}/version", "3\n")


# --------------------------------------------------------------------------------------
# GGUF weights in BlinkDL's and HF's naming (an independent inversion of spec 3.3)

_LERP = "rwkvag"
_LORAS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def gguf_float_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (stored float dtype, values in numpy shape), read with gguf-py."""
    out = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        name = t.tensor_type.name
        if name == "F32":
            out[t.name] = ("float32", np.asarray(t.data, dtype=np.float32).reshape(shape))
        elif name == "F16":
            out[t.name] = ("float16", np.asarray(t.data).view(np.float16).reshape(shape))
        else:
            out[t.name] = ("float32", gguf_quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return out


_GGUF_TO_BLINKDL = {"token_embd.weight": "emb.weight", "output.weight": "head.weight",
                    "token_embd_norm.weight": "blocks.0.ln0.weight", "token_embd_norm.bias": "blocks.0.ln0.bias",
                    "output_norm.weight": "ln_out.weight", "output_norm.bias": "ln_out.bias"}
_BLINKDL_TO_FLA = {"emb.weight": "model.embeddings.weight", "head.weight": "lm_head.weight",
                   "ln_out.weight": "model.norm.weight", "ln_out.bias": "model.norm.bias",
                   "blocks.0.ln0.weight": "model.layers.0.pre_norm.weight",
                   "blocks.0.ln0.bias": "model.layers.0.pre_norm.bias"}


def blinkdl_state_dict(gguf: dict[str, tuple[str, np.ndarray]], head_size: int = 64) -> dict[str, tuple[str, np.ndarray]]:
    sd = {}
    for name, (dtype, w) in gguf.items():
        if name in _GGUF_TO_BLINKDL:
            sd[_GGUF_TO_BLINKDL[name]] = (dtype, w)
        else:
            _, layer, tname, kind = name.split(".")
            b = f"blocks.{layer}."
            if tname == "attn_norm":
                sd[f"{b}ln1.{kind}"] = (dtype, w)
            elif tname == "attn_norm_2":
                sd[f"{b}ln2.{kind}"] = (dtype, w)
            elif tname == "time_mix_lerp_fused":
                for i, c in enumerate(_LERP):
                    sd[f"{b}att.x_{c}"] = (dtype, w[i].reshape(1, 1, -1))
            elif tname == "time_mix_ln":
                sd[f"{b}att.ln_x.{kind}"] = (dtype, w)
            elif tname == "time_mix_r_k":
                sd[f"{b}att.r_k"] = (dtype, w.reshape(-1, head_size))
            elif tname in ("time_mix_receptance", "time_mix_key", "time_mix_value", "time_mix_output"):
                sd[f"{b}att.{tname[len('time_mix_'):]}.weight"] = (dtype, w)
            elif tname.startswith("time_mix_") and tname[len("time_mix_"):] in _LORAS:
                sd[f"{b}att.{tname[len('time_mix_'):]}"] = (dtype, w.T)  # GGUF (rank, C) -> .pth (C, rank)
            elif tname.startswith("time_mix_"):  # w0, a0, v0, k_k, k_a
                sd[f"{b}att.{tname[len('time_mix_'):]}"] = (dtype, w.reshape(1, 1, -1))
            elif tname == "channel_mix_lerp_k":
                sd[f"{b}ffn.x_k"] = (dtype, w.reshape(1, 1, -1))
            elif tname in ("channel_mix_key", "channel_mix_value"):
                sd[f"{b}ffn.{tname[len('channel_mix_'):]}.weight"] = (dtype, w)
            else:
                raise AssertionError(name)
    return sd


def rwkv_org_names(sd: dict) -> dict:
    out = {}
    for name, v in sd.items():
        if name == "emb.weight":
            out["model.embeddings.weight"] = v
        elif name == "head.weight":
            out["head.weight"] = v
        elif name.startswith("ln_out."):
            out["model.ln_out." + name.split(".")[-1]] = v
        elif name.startswith("blocks.0.ln0."):
            out["model.pre_ln." + name.split(".")[-1]] = v
        else:
            _, layer, rest = name.split(".", 2)
            rest = rest.replace("att.", "attention.", 1).replace("ffn.", "feed_forward.", 1)
            out[f"model.layers.{layer}.{rest}"] = v
    return out


def fla_names(sd: dict) -> dict:
    out = {}
    renames = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
    for name, (dtype, w) in sd.items():
        if name in _BLINKDL_TO_FLA:
            out[_BLINKDL_TO_FLA[name]] = (dtype, w)
        else:
            _, layer, part, rest = name.split(".", 3)
            p = f"model.layers.{layer}."
            if part in ("ln1", "ln2"):
                out[p + ("attn_norm." if part == "ln1" else "ffn_norm.") + rest] = (dtype, w)
            elif part == "ffn":
                out[p + "ffn." + rest] = (dtype, w.reshape(-1) if rest == "x_k" else w)
            elif rest in _LORAS:
                out[p + f"attn.{rest[0]}_lora.lora.{0 if rest[1] == '1' else 2}.weight"] = (dtype, w.T)  # nn.Linear
            elif rest in ("w0", "a0", "v0"):
                out[p + f"attn.{rest[0]}_lora.lora.2.bias"] = (dtype, w.reshape(-1))
            elif rest in ("k_k", "k_a"):
                out[p + "attn." + rest] = (dtype, w.reshape(-1))
            else:
                head, _, tail = rest.partition(".")
                out[p + "attn." + renames.get(head, head) + ("." + tail if tail else "")] = (dtype, w)
    return out


def hf_config(layout: str, gguf_path: Path) -> dict:
    r = GGUFReader(gguf_path)
    meta = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("rwkv7.")}
    C, L, F = meta["rwkv7.embedding_length"], meta["rwkv7.block_count"], meta["rwkv7.feed_forward_length"]
    ranks = [meta[f"rwkv7.attention.{k}_lora_rank"] for k in ("decay", "iclr", "value_residual_mix", "gate")]
    if layout == "rwkv-org":
        return {"architectures": ["Rwkv7ForCausalLM"], "model_type": "rwkv7", "hidden_size": C, "num_hidden_layers": L,
                "intermediate_size": F, "head_size": 64, "layer_norm_epsilon": 1e-5,
                **dict(zip(("lora_rank_decay", "lora_rank_iclr", "lora_rank_value_residual_mix", "lora_rank_gate"), ranks))}
    return {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "hidden_size": C, "num_hidden_layers": L,
            "intermediate_size": F, "head_dim": 64, "norm_eps": 1e-5,
            **dict(zip(("decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim"), ranks))}


def write_hf_dir(path: Path, layout: str, sd: dict, gguf_path: Path, shards: int = 1) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    named = rwkv_org_names(sd) if layout == "rwkv-org" else fla_names(sd)
    (path / "config.json").write_text(json.dumps(hf_config(layout, gguf_path)))
    names = list(named)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = "model.safetensors" if shards == 1 else f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: np.ascontiguousarray(named[n][1], dtype=named[n][0]) for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def f16_gguf(tiny_gguf_files):
    """An F16 file (F16 matrices and LoRAs, F32 small tensors): the oracle's, or a synthetic one."""
    oracle = ORACLE / "models" / "fixa-f16.gguf"
    return oracle if oracle.is_file() else tiny_gguf_files["F16"]


@pytest.fixture(scope="module")
def gguf_logits(f16_gguf):
    model, _ = rwkv_mlx.load(f16_gguf, CPU)
    tokens = _tokens(f16_gguf)
    return np.array(model(mx.array([tokens]))[0])


def _tokens(path: Path) -> list[int]:
    return oracle_tokens("fixa") if path.parent == ORACLE / "models" else list(range(1, 25))


def _logits(dst: Path, tokens: list[int]) -> np.ndarray:
    model, _ = rwkv_mlx.load(dst, CPU)
    return np.array(model(mx.array([tokens]))[0])


# --------------------------------------------------------------------------------------
# the .pth reader


def test_pth_reader_reads_views_dtypes_and_nesting(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((2, 5)).astype(np.float16)
    c = rng.standard_normal((4, 3)).astype(np.float32)
    write_torch_zip(tmp_path / "x.pth", {"a": ("float32", a), "b": ("float16", b), "c": ("bfloat16", c),
                                        "d": ("float32", c)}, transposed={"d"})
    got = load_pth(tmp_path / "x.pth")
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"].dtype == np.float32 and np.array_equal(got["a"], a)
    assert got["b"].dtype == np.float16 and np.array_equal(got["b"], b)
    # bfloat16 comes back as float32, exactly the rounded values
    assert got["c"].dtype == np.float32
    assert np.array_equal(got["c"], (bf16_bits(c).astype(np.uint32) << 16).view(np.float32))
    assert np.abs(got["c"] - c).max() <= np.abs(c).max() * 2**-8
    assert np.array_equal(got["d"], c)  # stored as the transpose of a (3, 4) storage
    lazy = read_pth(tmp_path / "x.pth")
    assert lazy["c"].dtype == "bfloat16" and lazy["c"].shape == (4, 3) and lazy["c"].read().dtype == np.uint16


def _evil_pickle(module: str, name: str, arg: str) -> bytes:
    return b"\x80\x02}(" + _unicode("a") + f"c{module}\n{name}\n".encode() + b"(" + _unicode(arg) + b"tRu."


@pytest.mark.parametrize("module,name", [("posix", "system"), ("builtins", "eval"), ("torch", "load"),
                                         ("torch._utils", "_rebuild_device_tensor_from_numpy")])
def test_pth_reader_refuses_code_and_runs_none(tmp_path, module, name):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", _evil_pickle(module, name, f"touch {marker}"))
    with pytest.raises(ModelFileError, match=f"refusing to load {module}.{name}"):
        load_pth(path)
    assert not marker.exists()


def test_pth_reader_errors_name_the_file(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0alegacy torch format")
    with pytest.raises(ModelFileError, match="legacy torch.save format"):
        load_pth(legacy)
    with pytest.raises(ModelFileError, match="not a PyTorch checkpoint"):
        (tmp_path / "text.pth").write_text("hello")
        load_pth(tmp_path / "text.pth")
    longs = tmp_path / "long.pth"
    with zipfile.ZipFile(longs, "w") as zf:
        pkl = (b"\x80\x02}(" + _unicode("n") + b"ctorch._utils\n_rebuild_tensor_v2\n((" + _unicode("storage")
               + b"ctorch\nLongStorage\n" + _unicode("0") + _unicode("cpu") + _int(2) + b"tQ" + _int(0) + _ints([2])
               + _ints([1]) + b"\x89ccollections\nOrderedDict\n)RtRu.")
        zf.writestr("a/data.pkl", pkl)
    with pytest.raises(ModelFileError, match="storage type torch.LongStorage is not supported"):
        load_pth(longs)
    short = tmp_path / "short.pth"
    write_torch_zip(short, {"w": ("float32", np.ones((4, 4), np.float32))})
    with zipfile.ZipFile(short) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    entries["archive/data/0"] = entries["archive/data/0"][:20]
    with zipfile.ZipFile(short, "w") as zf:
        for n, d in entries.items():
            zf.writestr(n, d)
    with pytest.raises(ModelFileError, match=r"short.pth: storage 0 holds 20 bytes, its tensors need 64"):
        load_pth(short)["w"]


def test_pth_reader_reads_real_torch_save_and_torch_reads_our_writer(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: the reader is checked against our own writer only")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    sd = {"f32": torch.randn(3, 5), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 3).bfloat16(),
          "view": base[1:3, ::2], "t": base.t(), "param": torch.nn.Parameter(torch.randn(3)),
          "nested": {"x": torch.ones(2)}, "count": 7}
    torch.save(sd, tmp_path / "real.pth")
    got = load_pth(tmp_path / "real.pth")
    for name, t in [("f32", sd["f32"]), ("f16", sd["f16"]), ("bf16", sd["bf16"]), ("view", sd["view"]),
                    ("t", sd["t"]), ("param", sd["param"]), ("nested.x", sd["nested"]["x"])]:
        expect = t.detach().float().numpy()
        assert got[name].shape == expect.shape and np.array_equal(got[name].astype(np.float32), expect), name
    assert "count" not in got
    # and torch reads what our test writer writes, so the fixtures below are real .pth files
    values = {"a": ("float32", np.arange(6, dtype=np.float32).reshape(2, 3)),
              "b": ("bfloat16", np.linspace(-2, 2, 5, dtype=np.float32)), "c": ("float16", np.ones(3, np.float16))}
    write_torch_zip(tmp_path / "ours.pth", values, transposed={"a"})
    loaded = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert np.array_equal(loaded["a"].numpy(), values["a"][1])
    assert loaded["b"].dtype == torch.bfloat16 and np.array_equal(loaded["b"].float().numpy(),
                                                                   torch.tensor(values["b"][1]).bfloat16().float().numpy())
    assert loaded["c"].dtype == torch.float16


# --------------------------------------------------------------------------------------
# safetensors and HF names


def test_safetensors_writer_is_read_by_mlx_and_the_safetensors_package(tmp_path):
    from safetensors import safe_open

    arrays = {"f": mx.arange(12, dtype=mx.float32).reshape(3, 4), "h": mx.ones((5,), dtype=mx.float16),
              "b": mx.array([1.5, -2.25], dtype=mx.bfloat16), "u": mx.arange(7, dtype=mx.uint8),
              "w": mx.array([1, 2**32 - 1], dtype=mx.uint32)}
    write_safetensors(tmp_path / "x.safetensors", arrays)
    back = mx.load(str(tmp_path / "x.safetensors"))
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and mx.array_equal(back[k], v).item(), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="np") as independent:  # numpy: no bfloat16
        assert set(independent.keys()) == set(arrays)
        assert np.array_equal(independent.get_tensor("f"), np.arange(12, dtype=np.float32).reshape(3, 4))
        assert np.array_equal(independent.get_tensor("w"), np.array([1, 2**32 - 1], np.uint32))
    ours, _ = read_safetensors(tmp_path / "x.safetensors")
    assert np.array_equal(ours["b"].numpy(), np.array([1.5, -2.25], np.float32))


def test_safetensors_reader_checks_offsets(tmp_path):
    header = json.dumps({"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    with pytest.raises(ModelFileError, match=r"bad.safetensors: tensor t: data_offsets \[0, 64\] do not fit"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ModelFileError, match="header length"):
        read_safetensors(path)


@pytest.mark.parametrize("hf,expected", [
    ("model.embeddings.weight", ("emb.weight", False)),
    ("model.layers.0.pre_norm.bias", ("blocks.0.ln0.bias", False)),
    ("model.pre_ln.weight", ("blocks.0.ln0.weight", False)),
    ("model.layers.3.attn_norm.weight", ("blocks.3.ln1.weight", False)),
    ("model.layers.3.ln2.bias", ("blocks.3.ln2.bias", False)),
    ("model.layers.3.attn.r_proj.weight", ("blocks.3.att.receptance.weight", False)),
    ("model.layers.3.attention.receptance.weight", ("blocks.3.att.receptance.weight", False)),
    ("model.layers.3.attn.g_norm.weight", ("blocks.3.att.ln_x.weight", False)),
    ("model.layers.3.attn.w_lora.lora.0.weight", ("blocks.3.att.w1", True)),
    ("model.layers.3.attn.a_lora.lora.2.weight", ("blocks.3.att.a2", True)),
    ("model.layers.3.attn.v_lora.lora.2.bias", ("blocks.3.att.v0", False)),
    ("model.layers.3.attention.w1", ("blocks.3.att.w1", False)),
    ("model.layers.3.attn.x_x", ("blocks.3.att.x_x", False)),
    ("model.layers.3.ffn.x_k", ("blocks.3.ffn.x_k", False)),
    ("model.layers.3.feed_forward.value.weight", ("blocks.3.ffn.value.weight", False)),
    ("model.norm.weight", ("ln_out.weight", False)),
    ("lm_head.weight", ("head.weight", False)),
    ("model.layers.3.mlp.up_proj.weight", None),
])
def test_hf_names_map_to_blinkdl(hf, expected):
    assert blinkdl_name(hf) == expected


# --------------------------------------------------------------------------------------
# conversions: the same logits as the GGUF


def test_pth_from_gguf_weights_converts_bit_exactly(tmp_path, f16_gguf, gguf_logits):
    sd = blinkdl_state_dict(gguf_float_tensors(f16_gguf))
    C = sd["emb.weight"][1].shape[1]
    sd["blocks.0.att.v0"] = ("float32", np.full((1, 1, C), 0.5, np.float32))  # layer 0's unused v0/v1/v2
    write_torch_zip(tmp_path / "model.pth", sd, transposed={"blocks.1.att.w1", "blocks.0.att.g2"})
    convert(tmp_path / "model.pth", tmp_path / "out")
    ours = _logits(tmp_path / "out", _tokens(f16_gguf))
    assert np.array_equal(ours, gguf_logits)
    _, tok = rwkv_mlx.load(tmp_path / "out", CPU)
    _, gguf_tok = rwkv_mlx.load(f16_gguf, CPU)
    text = "User: Hello, world! 今天是美好的一天。\n\nAssistant:"
    assert tok.encode(text) == gguf_tok.encode(text) and tok.eot_token_id == 261


# Every tensor rounded to the checkpoint dtype (small tensors too), measured against the GGUF's logits
# (which have rms ~3): float16 max 0.016 / rms 0.0016 (fixa), 0.007 / 0.0015 (fixb), 0.007 / 0.0018 (tiny);
# bfloat16, as BlinkDL releases ship, about 8x that (3 fewer mantissa bits): 0.18 / 0.018, 0.078 / 0.016, 0.093 / 0.020.
ROUNDING_BOUNDS = {"float16": (0.025, 0.003), "bfloat16": (0.25, 0.03)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rounded_pth_matches_within_its_rounding(tmp_path, f16_gguf, gguf_logits, dtype):
    sd = {k: (dtype, v.astype(np.float32)) for k, (_, v) in blinkdl_state_dict(gguf_float_tensors(f16_gguf)).items()}
    write_torch_zip(tmp_path / "rounded.pth", sd)
    convert(tmp_path / "rounded.pth", tmp_path / "out")
    ours = _logits(tmp_path / "out", _tokens(f16_gguf))
    diff = ours - gguf_logits
    max_bound, rms_bound = ROUNDING_BOUNDS[dtype]
    assert 0 < np.abs(diff).max() < max_bound and np.sqrt((diff**2).mean()) < rms_bound
    assert (ours.argmax(-1) == gguf_logits.argmax(-1)).mean() >= 0.97


@pytest.mark.parametrize("layout,shards", [("rwkv-org", 1), ("fla", 2)])
def test_hf_dirs_convert_bit_exactly(tmp_path, f16_gguf, gguf_logits, layout, shards):
    sd = blinkdl_state_dict(gguf_float_tensors(f16_gguf))
    src = write_hf_dir(tmp_path / f"hf-{layout}", layout, sd, f16_gguf, shards)
    assert read_hf_dir(src).layout == layout
    assert run(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert np.array_equal(_logits(tmp_path / "out", _tokens(f16_gguf)), gguf_logits)


def test_checkpoint_errors_are_one_line(tmp_path, f16_gguf, capsys):
    sd = blinkdl_state_dict(gguf_float_tensors(f16_gguf))
    del sd["blocks.1.att.k_a"]
    write_torch_zip(tmp_path / "broken.pth", sd)
    assert run(["convert", str(tmp_path / "broken.pth"), str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert err == f"rwkv-mlx: error: {tmp_path / 'broken.pth'}: missing tensor blocks.1.att.k_a: not an RWKV-7 (x070) checkpoint"
    assert not (tmp_path / "out").exists()

    sd = blinkdl_state_dict(gguf_float_tensors(f16_gguf))
    sd["blocks.0.att.time_decay"] = ("float32", np.zeros(4, np.float32))
    write_torch_zip(tmp_path / "v6.pth", sd)
    with pytest.raises(UnsupportedModelError, match="RWKV-4/5/6"):
        convert(tmp_path / "v6.pth", tmp_path / "out")

    hf = tmp_path / "llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    assert run(["convert", str(hf), str(tmp_path / "out")]) == 4
    assert "is not RWKV-7" in capsys.readouterr().err


def test_info_on_pth_and_hf(tmp_path, f16_gguf, capsys):
    sd = blinkdl_state_dict(gguf_float_tensors(f16_gguf))
    write_torch_zip(tmp_path / "m.pth", sd)
    assert run(["info", str(tmp_path / "m.pth")]) == 0
    out = capsys.readouterr().out
    assert "PyTorch checkpoint" in out and "| float16 " in out and "| float32 " in out
    assert "world vocabulary truncated to" in out or "full RWKV world vocabulary" in out
    src = write_hf_dir(tmp_path / "hf", "fla", sd, f16_gguf)
    assert run(["info", str(src)]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face directory (fla layout)" in out and "| layers " in out


# --------------------------------------------------------------------------------------
# loaded directly (converted in memory) wherever a model is accepted


def test_pth_and_hf_dirs_load_directly_with_the_gguf_logits(tmp_path, f16_gguf, gguf_logits):
    sd = blinkdl_state_dict(gguf_float_tensors(f16_gguf))
    C = sd["emb.weight"][1].shape[1]
    sd["blocks.0.att.v0"] = ("float32", np.full((1, 1, C), 0.5, np.float32))
    write_torch_zip(tmp_path / "model.pth", sd, transposed={"blocks.1.att.w1"})
    hf = write_hf_dir(tmp_path / "hf-fla", "fla", blinkdl_state_dict(gguf_float_tensors(f16_gguf)), f16_gguf, 2)
    for src in (tmp_path / "model.pth", hf):
        assert np.array_equal(_logits(src, _tokens(f16_gguf)), gguf_logits), src
        model, tok, info = rwkv_mlx.load(src, CPU, return_info=True)
        assert info.path == src and model.fingerprint and tok.encode("Hello") == rwkv_mlx.load(f16_gguf, CPU)[1].encode("Hello")
    greedy = ["generate", "--prompt", "Hello", "-n", "3", "--greedy", "--no-stats", "--device", "cpu"]
    outputs = []
    for src in (f16_gguf, tmp_path / "model.pth", hf):
        proc = run_cli([*greedy, "--model", str(src)])
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] == outputs[2]


def test_hostile_pickle_is_refused_by_generate(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", _evil_pickle("posix", "system", f"touch {marker}"))
    proc = run_cli(["generate", "--model", str(path), "--prompt", "x"])
    err = proc.stderr.decode().strip()
    assert proc.returncode == 3 and len(err.splitlines()) == 1, err
    assert err == f"rwkv-mlx: error: {path}: data.pkl: refusing to load posix.system: not a tensor", err
    assert not marker.exists()
