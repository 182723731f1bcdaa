"""Every error path: the message, the exit status and no traceback.

``rwkv-mlx generate`` is run in subprocesses for the paths a user hits most (about 15
runs, ~0.5-1 s each) and in-process through ``rwkv_mlx.cli.run(argv)`` for the rest.
Exit statuses are distinct per class: 2 bad argument (ours and the command line's),
3 bad model file, 4 unsupported model.  The Python API raises the same errors.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import rwkv_mlx
from rwkv_mlx import LoadOptions
from rwkv_mlx.cli import run
from rwkv_mlx.errors import InvalidArgumentError, ModelFileError, UnsupportedModelError

from rwkv_mlx.testing import fuzz_gguf as F

BAD_ARGUMENT, BAD_FILE, UNSUPPORTED = InvalidArgumentError.exit_code, ModelFileError.exit_code, UnsupportedModelError.exit_code
RUN = ["generate", "--prompt", "hi", "-n", "1", "--no-stats"]


def test_exit_codes_are_distinct():
    assert (BAD_ARGUMENT, BAD_FILE, UNSUPPORTED) == (2, 3, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny valid model and broken variants of it (each a few hundred KB)."""
    d = tmp_path_factory.mktemp("errors")
    tiny = F.write_tiny_model(d / "tiny.gguf")
    ed = F.GGUFEditor(tiny)
    w0 = ed.layout.tensors["blk.1.time_mix_w0.weight"][3]
    variants = {
        "truncated": ed.truncated(ed.layout.data_start + 1000),
        "arwkv7": ed.with_kv("general.architecture", F.STRING, "arwkv7"),
        "llama": ed.with_kv("general.architecture", F.STRING, "llama"),
        "no-architecture": ed.without_kv("general.architecture"),
        "missing-tensor": ed.without_tensor("blk.1.time_mix_key.weight"),
        "wrong-shape": ed.with_tensor("blk.0.channel_mix_key.weight", dims=[64, 64]),
        "unknown-block-type": ed.with_tensor("blk.0.time_mix_key.weight", ggml_type=99),
        "unsupported-block-type": ed.with_tensor("blk.0.time_mix_key.weight", ggml_type=16),
        "nan-in-layer-1": ed.patched(w0 + 12, struct.pack("<f", math.nan)),
        "nan-in-head": ed.patched(ed.layout.tensors["output.weight"][3] + 4 * 70, struct.pack("<f", math.nan)),
    }
    out = {"tiny": tiny, "missing": d / "missing.gguf", "directory": d, "not-gguf": d / "notes.txt", "empty": d / "empty.gguf"}
    out["not-gguf"].write_text("This is not a model.\n")
    out["empty"].write_bytes(b"")
    for name, data in variants.items():
        out[name] = d / f"{name}.gguf"
        out[name].write_bytes(data)
    return out


def check_one_line(stderr: str, code: int, expected: int, *names: str) -> str:
    """Exactly one stderr line, 'rwkv-mlx: error: ...', naming each of ``names``, the right status, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rwkv-mlx: error: "), stderr
    for name in names:
        assert name in lines[0], (name, stderr)
    assert code == expected, (code, stderr)
    return lines[0]


# --------------------------------------------------------------------------------------
# through the installed command, in subprocesses


SUBPROCESS_CASES = [
    # (model file, extra arguments, exit status, text the line must hold besides the file name)
    ("missing", [], BAD_FILE, "no such file"),
    ("directory", [], BAD_FILE, "directory"),
    ("not-gguf", [], BAD_FILE, "not a GGUF file"),
    ("truncated", [], BAD_FILE, "truncated"),
    ("arwkv7", [], UNSUPPORTED, "'arwkv7' is not supported"),
    ("missing-tensor", [], BAD_FILE, "missing tensor blk.1.time_mix_key.weight"),
    ("wrong-shape", [], BAD_FILE, "blk.0.channel_mix_key.weight has shape [64, 64]"),
    ("unknown-block-type", [], BAD_FILE, "unknown block type 99"),
]


@pytest.mark.parametrize("name, extra, status, text", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_model_files(files, name, extra, status, text):
    proc = F.run_cli(["generate", "--model", str(files[name]), *RUN[1:], *extra])
    check_one_line(proc.stderr.decode(), proc.returncode, status, str(files[name]), text)
    assert proc.stdout == b""


ARGUMENT_CASES = [
    (["--top-p", "2"], "top_p must be in [0, 1]"),
    (["--prompt", ""], "no prompt"),
    (["--system", "be brief"], "--system needs --chat"),
    (["--bogus"], "No such option: --bogus"),
]


@pytest.mark.parametrize("extra, text", ARGUMENT_CASES, ids=["top-p", "empty-prompt", "system-without-chat", "unknown-option"])
def test_bad_arguments(files, extra, text):
    proc = F.run_cli([*RUN, "--model", str(files["tiny"]), *extra])
    check_one_line(proc.stderr.decode(), proc.returncode, BAD_ARGUMENT, text)
    assert proc.stdout == b""


def test_nan_weights_are_traced_to_their_layer(files):
    """--check-finite: a NaN planted in layer 1's decay (w0) is reported as layer 1's time-mix, first token."""
    path = files["nan-in-layer-1"]
    proc = F.run_cli(["generate", "--model", str(path), "--prompt", "To be", "-n", "4", "--no-stats", "--check-finite"])
    line = check_one_line(proc.stderr.decode(), proc.returncode, BAD_FILE, str(path), "NaN or infinite")
    assert line.endswith("first non-finite output: layer 1 time-mix at token 0"), line


def test_stdin_prompt_is_read_as_bytes(files):
    """Invalid UTF-8 and NUL on stdin reach the tokenizer unchanged, whatever Python's stdin encoding."""
    raw = b"a\xff\xfe\x00b"
    model, tokenizer = rwkv_mlx.load(files["tiny"], LoadOptions.for_backend("cpu"))
    ids = tokenizer.encode(raw)
    assert ids == [ord("a") + 1, 0xFF + 1, 0xFE + 1, 0x00 + 1, ord("b") + 1]  # world vocab: id = byte + 1
    from rwkv_mlx.cli.common import sampling_from_options
    from rwkv_mlx.text.sample import SamplingParams

    expected = rwkv_mlx.generate(model, tokenizer, ids, max_tokens=5,
                                 sampling=sampling_from_options(SamplingParams(), greedy=True))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    proc = F.run_cli(["generate", "--model", str(files["tiny"]), "-n", "5", "--greedy", "--no-stats", "--echo"],
                     stdin=raw, env=env)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()
    assert proc.stdout == raw + expected.encode("utf-8") + b"\n"


# --------------------------------------------------------------------------------------
# in-process: rwkv_mlx.cli.run(argv) and the Python API


IN_PROCESS_FILE_CASES = [
    ("empty", BAD_FILE, "empty file"),
    ("llama", UNSUPPORTED, "'llama' is not supported"),
    ("no-architecture", BAD_FILE, "no general.architecture"),
    ("unsupported-block-type", UNSUPPORTED, "IQ2_XXS is not supported"),
]


@pytest.mark.parametrize("name, status, text", IN_PROCESS_FILE_CASES, ids=[c[0] for c in IN_PROCESS_FILE_CASES])
def test_bad_model_files_in_process(files, capsys, name, status, text):
    code = run(["generate", "--model", str(files[name]), *RUN[1:]])
    out, err = capsys.readouterr()
    check_one_line(err, code, status, str(files[name]), text)
    assert out == ""


@pytest.mark.parametrize("name", ["missing", "directory", "not-gguf", "empty", "truncated", "arwkv7", "llama",
                                  "no-architecture", "missing-tensor", "wrong-shape", "unknown-block-type",
                                  "unsupported-block-type"])
def test_api_raises_the_same_errors(files, name):
    """rwkv_mlx.load raises ModelFileError (or UnsupportedModelError) with the file and reason; nothing else."""
    with pytest.raises(ModelFileError) as info:
        rwkv_mlx.load(files[name], LoadOptions.for_backend("cpu"))
    err = info.value
    assert err.path == str(files[name]) and str(err) == f"{err.path}: {err.reason}" and "\n" not in str(err)
    assert isinstance(err, UnsupportedModelError) == (name in ("arwkv7", "llama", "unsupported-block-type"))


def test_special_files(tmp_path, capsys):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelFileError, match="not a regular file"):
        rwkv_mlx.load(fifo)
    with pytest.raises(ModelFileError, match="unusable path|no such file"):
        rwkv_mlx.load(str(tmp_path / "a\0b.gguf"))
    code = run(["generate", "--model", str(fifo), *RUN[1:]])
    check_one_line(capsys.readouterr().err, code, BAD_FILE, str(fifo), "not a regular file")


ARGUMENT_CASES_IN_PROCESS = [
    (["--temperature", "-1"], "temperature"),
    (["--temp", "nan"], "temperature"),
    (["--top-k", "-1"], "top_k"),
    (["--min-p", "1.5"], "min_p"),
    (["--penalty-decay", "2"], "penalty_decay"),
    (["--presence-penalty", "inf"], "presence_penalty"),
    (["--seed", "-1"], "seed"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "many"], "--max-tokens"),
    (["--think", "maybe"], "--think"),
    (["--device", "tpu"], "--device"),
    (["--scale-dtype", "int8"], "--scale-dtype"),
]


@pytest.mark.parametrize("extra, name", ARGUMENT_CASES_IN_PROCESS, ids=[" ".join(c[0]) for c in ARGUMENT_CASES_IN_PROCESS])
def test_bad_arguments_in_process(files, capsys, extra, name):
    code = run([*RUN, "--model", str(files["tiny"]), *extra])
    out, err = capsys.readouterr()
    check_one_line(err, code, BAD_ARGUMENT, name)
    assert out == ""


def test_unknown_command(capsys):
    code = run(["generat", "--prompt", "x"])
    check_one_line(capsys.readouterr().err, code, BAD_ARGUMENT, "generat")


def test_nul_and_escapes_in_prompt_are_text(files, capsys):
    """A NUL (typed as \\0) and control bytes are ordinary prompt bytes: they generate, no error."""
    assert run(["generate", "--model", str(files["tiny"]), "--prompt", "a\\0b\\x01", "-n", "2", "--no-stats"]) == 0
    assert capsys.readouterr().err == ""


def test_nonfinite_logits_without_the_option_still_generate(files, capsys):
    """--check-finite is a debug switch: without it a NaN model runs (its text is garbage) and exits 0."""
    assert run(["generate", "--model", str(files["nan-in-layer-1"]), "--prompt", "x", "-n", "2", "--no-stats"]) == 0


def test_check_finite_names_the_head(files, capsys):
    """A NaN in one row of the head spoils one logit only: found in 'head', not in a layer."""
    code = run(["generate", "--model", str(files["nan-in-head"]), "--prompt", "x", "-n", "2", "--no-stats", "--check-finite"])
    line = check_one_line(capsys.readouterr().err, code, BAD_FILE, "first non-finite output: head at token 0")
    assert str(files["nan-in-head"]) in line


@pytest.mark.parametrize("module, value, where", [
    ("blocks.0.att.k_k", np.nan, "layer 0 time-mix at token 0"),
    ("blocks.1.ffn.value.weight", np.inf, "layer 1 channel-mix at token 0"),
    ("blocks.0.ffn.x_k", -np.inf, "layer 0 channel-mix at token 0"),
    ("ln_out.bias", np.nan, "head at token 2"),  # the head is computed for the last token only, as in a prefill
])
def test_find_first_nonfinite_names_the_planted_layer(files, module, value, where):
    """One NaN or inf planted in one module's weights: that module's output is named, not a later one."""
    from rwkv_mlx.model.debug import find_first_nonfinite

    model, _ = rwkv_mlx.load(files["tiny"], LoadOptions.for_backend("cpu"))
    *parents, name = module.split(".")
    parent = model
    for p in parents:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    w = np.array(getattr(parent, name))
    w.reshape(-1)[5] = value
    setattr(parent, name, mx.array(w))
    assert find_first_nonfinite(model, [98, 99, 100]) == where


def test_find_first_nonfinite_orders_by_token_then_layer(files):
    """The earliest token wins over forward order: a NaN state in layer 1 (token 0) beats a NaN embedding row at token 2."""
    from rwkv_mlx.model.debug import find_first_nonfinite

    model, _ = rwkv_mlx.load(files["tiny"], LoadOptions.for_backend("cpu"))
    tokens = [98, 99, 100, 101]
    assert find_first_nonfinite(model, tokens) is None
    emb = np.array(model.emb.weight)
    emb[100] = np.nan
    model.emb.weight = mx.array(emb)
    assert find_first_nonfinite(model, tokens) == "embedding at token 2"
    assert find_first_nonfinite(model, tokens, chunk_size=2) == "embedding at token 2"  # in the second chunk
    state = model.initial_state()
    wkv = np.array(state.wkv[1])
    wkv[0, 0, 0, 0] = np.inf
    state.wkv[1] = mx.array(wkv)
    assert find_first_nonfinite(model, tokens, state) == "layer 1 time-mix at token 0"
    assert find_first_nonfinite(model, tokens, state, chunk_size=1) == "layer 1 time-mix at token 0"
    assert find_first_nonfinite(model, tokens[3:]) is None  # the model's modules are restored
