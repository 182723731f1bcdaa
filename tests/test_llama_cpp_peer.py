"""The llama.cpp peer of scripts/bench_peers.py (rwkv_mlx/bench/llama_cpp.py): llama-bench's JSON, the ratios, the errors.

tests/llama_bench/demo-cpu.json is real llama-bench output (llama.cpp from the llama-cpp-python 0.3.36 sdist,
built CPU-only by scripts/build_llama_bench.sh on the 2-core development machine), captured with

    llama-bench -m rwkv_mlx/data/rwkv7-demo-shakespeare.gguf -p 512,4096 -n 128 -r 3 -ngl 99 -o json

(the command bench_command builds for the benchmark's lengths).  It was written by llama.cpp, not by the
code under test, so it is a fair expected input.  A fake llama-bench (a shell script printing that file)
drives the whole peer without building llama.cpp; $RWKV_MLX_LLAMA_BENCH runs a real one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
from pathlib import Path

import pytest

from rwkv_mlx import DEMO_MODEL as DEMO
from rwkv_mlx.backend import device_name
from rwkv_mlx.bench import llama_cpp, peers
from rwkv_mlx.bench.benchmark import GEN_TOKENS, PREFILL_LENGTHS
from rwkv_mlx.loader.info import file_fingerprint

FIXTURE = Path(__file__).resolve().parent / "llama_bench" / "demo-cpu.json"


def raw_tests() -> list[dict]:
    return json.loads(FIXTURE.read_text())


def fake_llama_bench(tmp_path: Path, script: str) -> Path:
    path = tmp_path / "llama-bench"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def test_parses_real_llama_bench_json():
    tests = llama_cpp.parse_output(FIXTURE.read_text(), FIXTURE)
    prefill, decode = llama_cpp.speeds(tests, PREFILL_LENGTHS, GEN_TOKENS, FIXTURE)
    assert sorted(prefill) == sorted(PREFILL_LENGTHS)
    nanoseconds = {(t["n_prompt"], t["n_gen"]): t["samples_ns"] for t in raw_tests()}
    for (n_prompt, n_gen), speed in [*(((p, 0), prefill[p]) for p in PREFILL_LENGTHS), ((0, GEN_TOKENS), decode)]:
        # each run's tokens per second is its token count over its time in ns; avg_ts and stddev_ts are
        # their mean and sample deviation (samples_ts prints them to 6 digits)
        per_run = [(n_prompt + n_gen) * 1e9 / ns for ns in nanoseconds[(n_prompt, n_gen)]]
        assert len(speed.samples) == 3 and speed.samples == pytest.approx(per_run, rel=1e-5)
        assert speed.tps == pytest.approx(statistics.mean(per_run), rel=1e-6)
        assert speed.stddev == pytest.approx(statistics.stdev(per_run), rel=1e-5)
    by_test = {(t["n_prompt"], t["n_gen"]): t["avg_ts"] for t in raw_tests()}
    assert decode.tps == by_test[(0, GEN_TOKENS)]
    assert all(prefill[p].tps == by_test[(p, 0)] for p in PREFILL_LENGTHS)
    info = llama_cpp.about(tests)
    assert info["backends"] == "CPU" and info["model_type"].startswith("rwkv7")


def test_command_asks_for_the_benchmark_lengths_on_the_gpu(tmp_path):
    command = llama_cpp.bench_command(Path("/x/llama-bench"), Path("m.gguf"), PREFILL_LENGTHS, GEN_TOKENS, 3)
    args = dict(zip(command[1::2], command[2::2]))
    assert args["-p"] == ",".join(map(str, PREFILL_LENGTHS)) and args["-n"] == str(GEN_TOKENS)
    assert args["-ngl"] == "99" and args["-o"] == "json" and args["-r"] == "3" and args["-m"] == "m.gguf"


@pytest.mark.parametrize("text, message", [
    ("", "not llama-bench's JSON"),
    ("| model | size | params | backend | threads | test | t/s |", "not llama-bench's JSON"),
    ('{"avg_ts": 1}', "not a list of tests"),
    ('[{"n_prompt": 512, "n_gen": 0, "avg_ts": 1.0}]', "lacks stddev_ts"),
])
def test_unparsable_output_is_one_clear_error(text, message):
    with pytest.raises(llama_cpp.LlamaBenchError, match=message) as e:
        llama_cpp.parse_output(text, "llama-bench")
    assert e.value.exit_code == 3 and "\n" not in str(e.value)


def test_a_missing_test_is_named():
    tests = [t for t in raw_tests() if t["n_prompt"] != PREFILL_LENGTHS[-1]]
    with pytest.raises(llama_cpp.LlamaBenchError, match=f"no pp{PREFILL_LENGTHS[-1]} test"):
        llama_cpp.speeds(tests, PREFILL_LENGTHS, GEN_TOKENS, "llama-bench")


def test_ratios_and_rows():
    tests = llama_cpp.parse_output(FIXTURE.read_text(), FIXTURE)
    prefill, decode = llama_cpp.speeds(tests, PREFILL_LENGTHS, GEN_TOKENS, FIXTURE)
    ours = {p: {"prefill_tps": 2 * prefill[p].tps, "generation_tps": decode.tps / 4} for p in PREFILL_LENGTHS}
    rows = llama_cpp.rows(ours, prefill, decode, GEN_TOKENS)
    assert [r[0] for r in rows] == [f"prefill {p} tok/s (pp{p})" for p in PREFILL_LENGTHS] + [f"decode tok/s (tg{GEN_TOKENS})"]
    assert [r[3] for r in rows] == ["2.00x"] * len(PREFILL_LENGTHS) + ["0.25x"]
    line = llama_cpp.log_figures(ours[PREFILL_LENGTHS[0]], prefill[PREFILL_LENGTHS[0]], decode, PREFILL_LENGTHS[0],
                                 GEN_TOKENS, llama_cpp.about(tests))
    assert line["engine"] == "llama.cpp" and line["ratio_prefill"] == 2.0 and line["ratio_generation"] == 0.25
    assert llama_cpp.ratio(1.0, 0.0) is None


def ours_log(results: Path, prefill: dict[int, float], generation: float) -> None:
    """rwkv-mlx entries of the demo model on this device, as `rwkv-mlx benchmark` logs them (the fields the peer reads)."""
    results.mkdir(exist_ok=True)
    fingerprint = file_fingerprint(DEMO)
    lines = [{"title": "t", "engine": "rwkv-mlx", "model": DEMO.name, "fingerprint": fingerprint, "prompt_tokens": p,
              "gen_tokens": GEN_TOKENS, "prefill_tps": tps, "generation_tps": generation, "quality_hash": "h",
              "device": device_name(), "date": "2026-12-06T00:00:00+00:00"} for p, tps in prefill.items()]
    (results / "benchmarks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_peer_records_side_by_side_from_a_fake_llama_bench(tmp_path, capsys):
    """The whole peer on llama-bench's real output: the JSON lines, their ratios, the peers.md table."""
    binary = fake_llama_bench(tmp_path, f"cat {shlex.quote(str(FIXTURE))}")
    results = tmp_path / "results"
    theirs = {(t["n_prompt"], t["n_gen"]): t["avg_ts"] for t in raw_tests()}
    ours_prefill = {p: round(theirs[(p, 0)] * 1.5, 3) for p in PREFILL_LENGTHS}
    ours_log(results, ours_prefill, round(theirs[(0, GEN_TOKENS)] * 0.5, 3))
    argv = ["--model", str(DEMO), "--llama-bench", str(binary), "--ours", "log", "--device", "cpu",
            "--results-dir", str(results)]
    assert peers.main(argv) == 0
    out = capsys.readouterr().out
    assert "rwkv-mlx / llama.cpp" in out and "1.50x" in out and "0.50x" in out
    lines = [json.loads(x) for x in (results / "benchmarks.jsonl").read_text().splitlines()]
    mine = [x for x in lines if x["engine"] == "llama.cpp"]
    assert [x["prompt_tokens"] for x in mine] == list(PREFILL_LENGTHS)
    for x in mine:
        assert x["prefill_tps"] == round(theirs[(x["prompt_tokens"], 0)], 3)
        assert x["ratio_prefill"] == pytest.approx(1.5, abs=1e-4) and x["ratio_generation"] == pytest.approx(0.5, abs=1e-4)
        assert x["title"] == "llama.cpp peers" and x["fingerprint"] == file_fingerprint(DEMO)
        assert x["llama_cpp"]["backends"] == "CPU" and x["gen_tokens"] == GEN_TOKENS
    assert "rwkv-mlx / llama.cpp" in (results / "peers.md").read_text()


def test_ours_from_log_takes_the_median_of_one_titles_processes(tmp_path):
    """Several processes of one title and commit: their median rates (one process is one draw); entries of
    another commit or title are left out, and a single entry is taken as it is."""
    from rwkv_mlx.bench.peers import ours_from_log

    fingerprint = file_fingerprint(DEMO)

    def entry(title, commit, prefill, decode):
        return {"title": title, "commit": commit, "commit_dirty": False, "engine": "rwkv-mlx", "model": DEMO.name,
                "fingerprint": fingerprint, "prompt_tokens": 512, "gen_tokens": GEN_TOKENS, "prefill_tps": prefill,
                "generation_tps": decode, "device": device_name(), "date": "2026-12-06T00:00:00+00:00"}

    lines = [entry("s", "old", 1.0, 999.0), entry("other", "new", 2.0, 5.0), entry("s", "new", 30.0, 190.0),
             entry("s", "new", 10.0, 266.0), entry("s", "new", 20.0, 201.0)]
    (tmp_path / "benchmarks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = ours_from_log(tmp_path, fingerprint, 512, GEN_TOKENS)
    assert got["processes"] == 3 and got["prefill_tps"] == 20.0 and got["generation_tps"] == 201.0
    assert got["generation_tps_processes"] == [190.0, 201.0, 266.0]
    (tmp_path / "benchmarks.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert ours_from_log(tmp_path, fingerprint, 512, GEN_TOKENS)["generation_tps"] == 999.0


@pytest.mark.parametrize("script, message", [
    ("echo 'error: unknown model architecture: rwkv7' >&2; exit 1", "exited with code 1 on .*unknown model architecture"),
    ("echo 'main: warming up'", "not llama-bench's JSON"),
])
def test_a_failing_llama_bench_is_one_line_exit_3(tmp_path, capsys, script, message):
    results = tmp_path / "results"
    ours_log(results, {p: 1.0 for p in PREFILL_LENGTHS}, 1.0)
    argv = ["--model", str(DEMO), "--llama-bench", str(fake_llama_bench(tmp_path, script)), "--ours", "log",
            "--device", "cpu", "--results-dir", str(results)]
    assert peers.main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_peers: error: ") and "\n" not in err
    assert re.search(message, err)
    assert not (results / "peers.md").exists()


def test_missing_binary_and_missing_argument(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(llama_cpp.BINARY_ENV, raising=False)
    assert peers.main(["--model", str(DEMO), "--llama-bench", str(tmp_path / "nope")]) == 3
    assert "nope: no such file: build llama-bench with scripts/build_llama_bench.sh" in capsys.readouterr().err
    assert peers.main(["--model", str(DEMO), "--peer", "llama.cpp"]) == 2
    assert f"--llama-bench PATH or ${llama_cpp.BINARY_ENV}" in capsys.readouterr().err
    assert peers.main(["--model", str(DEMO), "--prompt-tokens", "16", "32"]) == 2
    assert "mlx-lm is timed at one prompt length" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get(llama_cpp.BINARY_ENV),
                    reason=f"set ${llama_cpp.BINARY_ENV} to a llama-bench (scripts/build_llama_bench.sh) to run llama.cpp")
def test_real_llama_bench_on_the_demo_model():
    binary = llama_cpp.find_binary(None)
    command = llama_cpp.bench_command(binary, DEMO, [16], 16, 1)
    tests = llama_cpp.parse_output(llama_cpp.run_llama_bench(command, timeout=300), binary)
    prefill, decode = llama_cpp.speeds(tests, [16], 16, binary)
    assert prefill[16].tps > 0 and decode.tps > 0
