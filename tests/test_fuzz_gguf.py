"""Hostile and broken GGUF files: each mutation loads, or is rejected with ModelFileError, in bounded time and memory.

The seeded pass (``scripts/fuzz_gguf.py``'s ``ci_plan``: about 9000 truncations, bit flips,
absurd sizes and semantic mutations of tiny synthetic models and two oracle files) runs in a
worker process with a per-case timeout; the worker reports peak RSS and MLX's peak memory for
every case.  A longer run is ``python scripts/fuzz_gguf.py --minutes 10`` (results/fuzz.md).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from conftest import ORACLE, oracle_models

from rwkv_mlx.formats import gguf_file
from rwkv_mlx.errors import ModelFileError, UnsupportedModelError
from rwkv_mlx.formats.gguf_file import scan_gguf

from rwkv_mlx.testing import fuzz_gguf as F


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return F.write_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny-F32.gguf")


@pytest.mark.slow
def test_seeded_fuzz_pass(tmp_path):
    """Every case of the seeded plan ends as 'rejected' (our error, one line naming the file) or 'loaded'."""
    plan = F.ci_plan(tmp_path, seed=0, oracle_models=ORACLE / "models")
    report = F.run_cases(plan, timeout=5.0)
    print(f"\nfuzz CI pass: {report.cases} cases, slowest {report.max_seconds:.2f} s, "
          f"RSS growth {report.max_rss_growth >> 20} MiB, MLX peak {report.max_mlx_peak >> 20} MiB")
    for family, outcomes in report.table():
        print(f"  {family}: {outcomes}")
    assert report.cases == len(plan)
    shown = [f"{base}: {label}: {res['outcome']}: {res.get('error', '')} {res.get('message', '')}"
             for base, label, res in report.failures[:20]]
    assert not report.failures, "\n".join(shown)
    # every family exercised both ways where it can be: truncations are always rejected
    outcomes = {(f, o) for (f, o) in report.counts}
    assert {("truncate", "rejected"), ("absurd", "rejected"), ("semantic", "rejected"), ("semantic", "loaded"),
            ("flip", "rejected"), ("flip", "loaded")} <= outcomes
    assert ("truncate", "loaded") not in outcomes


@pytest.mark.slow
@pytest.mark.parametrize("how, outcome", [("hang", "hang"), ("crash", "crash"), ("memory", "memory")])
def test_harness_catches_hangs_crashes_and_memory_spikes(tiny, how, outcome):
    """The bounds are real: a worker that hangs, dies on a signal or grabs memory fails its case."""
    case = F.Case("selftest", how, lambda: tiny.read_bytes(), selftest=how)
    report = F.run_cases([(tiny, case)], timeout=10.0)  # generous: a loaded machine must not turn a spike into a hang
    assert [res["outcome"] for _, _, res in report.failures] == [outcome]


def test_truncations_cover_every_structural_boundary(tiny):
    """Cuts after the magic, the version, both counts, every kv part, every tensor-info field, the table, the padding and each tensor."""
    ed = F.GGUFEditor(tiny)
    cuts = {n for n, _ in F.truncation_points(ed, random.Random(0), elements=0)}
    lay = ed.layout
    expected = {4, 8, 16, 24, lay.info_end, lay.data_start}
    expected |= {end for e in lay.kvs for _, end, label in e.parts if not label.startswith("element ")}
    expected |= {end for e in lay.infos for _, end, _ in e.parts}
    expected |= {start + n for _, _, _, start, n in lay.tensors.values()}
    expected = {n for n in expected if n < lay.size}
    assert expected <= cuts
    assert len(lay.kvs) >= 15 and len(lay.infos) == len(lay.tensors) == 6 + 28 * 2


def test_editor_round_trip_and_layout_match_the_scanner(tiny):
    """The editor rebuilds a file byte for byte, and its layout (gguf-py's) agrees with rwkv-mlx's scan."""
    ed = F.GGUFEditor(tiny)
    assert ed.rebuilt() == ed.data
    g = scan_gguf(tiny)
    assert {n: (start, n_bytes) for n, (_, _, _, start, n_bytes) in ed.layout.tensors.items()} == {
        n: (i.offset, i.n_bytes) for n, i in g.tensors.items()}


@pytest.mark.parametrize("name", oracle_models() or ["(oracle absent)"])
def test_scan_agrees_with_gguf_py_on_oracle_files(name, require_oracle):
    """The bounded scan and gguf-py's reader read every oracle file identically (tensor table and metadata)."""
    assert F.crosscheck(str(ORACLE / "models" / f"{name}.gguf")) is None
    g = scan_gguf(ORACLE / "models" / f"{name}.gguf")
    assert g.metadata["general.architecture"] == "rwkv7" and len(g.metadata["tokenizer.ggml.tokens"]) == 4096


def _file(tmp_path, data: bytes, name: str = "case.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_caps_bound_parsing_before_allocating(tiny, tmp_path, monkeypatch):
    """Array elements, metadata entries and tensors are capped per file; a file at a cap still loads."""
    ed = F.GGUFEditor(tiny)
    n_tokens = len(scan_gguf(tiny).metadata["tokenizer.ggml.tokens"])
    n_types = len(scan_gguf(tiny).metadata["tokenizer.ggml.token_type"])
    monkeypatch.setattr(gguf_file, "MAX_ARRAY_ELEMENTS", n_tokens + n_types)
    scan_gguf(tiny)
    monkeypatch.setattr(gguf_file, "MAX_ARRAY_ELEMENTS", n_tokens + n_types - 1)
    with pytest.raises(ModelFileError, match="beyond the limit"):
        scan_gguf(tiny)
    monkeypatch.undo()
    monkeypatch.setattr(gguf_file, "MAX_TENSORS", len(ed.layout.infos) - 1)
    with pytest.raises(ModelFileError, match="limits"):
        scan_gguf(tiny)
    monkeypatch.undo()
    monkeypatch.setattr(gguf_file, "MAX_METADATA_ENTRIES", len(ed.layout.kvs) - 1)
    with pytest.raises(ModelFileError, match="limits"):
        scan_gguf(tiny)


def _set(ed, *fields):
    """The file with each (span, value) of ``fields`` written in."""
    data = ed.data
    for span, value in fields:
        start, end = span
        data = data[:start] + (value % (1 << (8 * (end - start)))).to_bytes(end - start, "little") + data[end:]
    return data


@pytest.mark.parametrize("fields_of, match", [
    (lambda ed: [((8, 16), 1 << 63)], "more than a"),
    (lambda ed: [((16, 24), (1 << 64) - 1)], "more than a"),
    (lambda ed: [(ed.kv("general.name").part("value length"), 1 << 63)], "bytes long"),
    (lambda ed: [(ed.kv("general.name").part("value length"), 1 << 20)], "truncated"),
    (lambda ed: [(ed.kv("tokenizer.ggml.tokens").part("element count"), 1 << 60)], "runs past the end"),
    (lambda ed: [(ed.kv("tokenizer.ggml.token_type").part("element count"), (1 << 64) - 1)], "runs past the end"),
    (lambda ed: [(ed.info("token_embd.weight").part("dimension 0"), 1 << 30),
                 (ed.info("token_embd.weight").part("dimension 1"), 1 << 30)], "too many elements"),
    (lambda ed: [(ed.info("token_embd.weight").part("dimension 0"), 1 << 63)], "out of range"),
    (lambda ed: [(ed.info("output.weight").part("offset"), (1 << 64) - 32)], "truncated"),
    (lambda ed: [(ed.info("output.weight").part("name length"), 64)], "limit 63"),
])
def test_absurd_sizes_are_named(tiny, tmp_path, fields_of, match):
    """2^60 elements, 2^63 lengths, -1 as u64: rejected from the header alone, with the reason."""
    ed = F.GGUFEditor(tiny)
    path = _file(tmp_path, _set(ed, *fields_of(ed)))
    with pytest.raises(ModelFileError, match=match) as info:
        scan_gguf(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_block_types_known_to_ggml_are_unsupported_others_corrupt(tiny, tmp_path):
    ed = F.GGUFEditor(tiny)
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS is not supported"):
        scan_gguf(_file(tmp_path, ed.with_tensor("blk.0.time_mix_key.weight", ggml_type=16)))
    with pytest.raises(ModelFileError, match="unknown block type 99") as info:
        scan_gguf(_file(tmp_path, ed.with_tensor("blk.0.time_mix_key.weight", ggml_type=99)))
    assert not isinstance(info.value, UnsupportedModelError)


def test_big_endian_file_is_unsupported(tiny, tmp_path):
    ed = F.GGUFEditor(tiny)
    with pytest.raises(UnsupportedModelError, match="big-endian"):
        scan_gguf(_file(tmp_path, ed.with_int((4, 8), 3 << 24)))


def test_alignment_must_be_a_uint32_power_of_two(tiny, tmp_path):
    ed = F.GGUFEditor(tiny)
    for vtype, value, match in ((F.U64, 32, "not uint32"), (F.U32, 48, "power of two"), (F.U32, 0, "power of two")):
        data = ed.rebuilt(append_kvs=[F.gguf_kv("general.alignment", vtype, value)])
        with pytest.raises(ModelFileError, match=match):
            scan_gguf(_file(tmp_path, data))
    g = scan_gguf(_file(tmp_path, ed.rebuilt(append_kvs=[F.gguf_kv("general.alignment", F.U32, 16)], alignment=16)))
    assert g.alignment == 16


def test_tensor_data_views_match_the_bytes(tiny):
    """raw() is a view of exactly the stored bytes (checked against the file read independently)."""
    g = gguf_file.open_gguf(tiny)
    data = tiny.read_bytes()
    for name in ("token_embd.weight", "blk.1.time_mix_w0.weight", "output.weight"):
        info = g.tensors[name]
        raw = g.raw(name)
        assert raw.tobytes() == data[info.offset : info.offset + info.n_bytes]
        assert np.frombuffer(raw.tobytes(), np.float32).size == int(np.prod(info.shape))


@pytest.mark.parametrize("mutate, code, match", [
    (lambda ed: ed.with_int(ed.kv("general.name").part("value length"), 1 << 63), 3, "(limit 16777216)"),
    (lambda ed: ed.with_tensor("blk.1.channel_mix_key.weight", ggml_type=16), 4, "IQ2_XXS"),
    (lambda ed: ed.flipped(8 * 10), 3, "more than a"),  # tensor count 62 -> 62 + 2^16
])
def test_fuzzed_files_through_the_cli(tiny, tmp_path, mutate, code, match):
    """The CLI turns a fuzzed file into one stderr line naming the file, a distinct exit status, no traceback."""
    path = _file(tmp_path, mutate(F.GGUFEditor(tiny)))
    proc = F.run_cli(["generate", "--model", str(path), "--prompt", "hi", "-n", "1", "--no-stats"])
    stderr = proc.stderr.decode()
    assert proc.returncode == code, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rwkv-mlx: error: {path}: ") and match in lines[0], stderr
    assert "Traceback" not in stderr and proc.stdout == b""
