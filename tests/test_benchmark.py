"""``rwkv-mlx benchmark``: the log format, the primitive count, and the quality gate.

The gate's reference tokens are checked against the independent float64 model
(tests/reference_rwkv7.py); the gate is shown to reject a deliberately broken
compute path on the *same* file (the realistic failure: a fast kernel that
computes garbage) and a model that emits one token.  Speeds are never
asserted, only that they are recorded in the right shape.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import ORACLE, REPO
from reference_rwkv7 import ReferenceRWKV7

import rwkv_mlx
import rwkv_mlx.model.wkv
from rwkv_mlx import bench, settings
from rwkv_mlx.backend import device_name
from rwkv_mlx.cli import run
from rwkv_mlx.formats.gguf_writer import write_rwkv7_gguf
from rwkv_mlx.testing import synthetic as synth
from rwkv_mlx.kernels import kernels_enabled

FIXA_Q4 = ORACLE / "models" / "fixa-Q4_K_M.gguf"
SMALL = ["--prompt-tokens", "24", "--gen-tokens", "16", "--runs", "2", "--warmup", "0", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A small seeded RWKV-7 in llama.cpp's layout (Q8_0), written here."""
    path = tmp_path_factory.mktemp("models") / "synthetic-L2-C128-Q8_0.gguf"
    synth.make_synthetic_model(path, "Q8_0", synth.synthetic_args(2, 128, 256, (16, 16, 16, 32), vocab=1024), seed=7)
    return path


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RWKV_MLX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "results"


def benchmark(model: Path, results: Path, *extra: str, title: str = "T", change: str = "c") -> int:
    return run(["benchmark", "--model", str(model), "--title", title, "--change", change,
                "--results-dir", str(results), *SMALL, *extra])


def parse_log(text: str) -> dict[str, list[dict]]:
    """{title: [entry]}, entry = {heading, date, change, rows, tokens}, read back from BENCHMARKS.md."""
    sections: dict[str, list[dict]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], [])
        elif line.startswith("### "):
            m = re.fullmatch(r"### (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) - (.*)", line)
            assert m, line
            current.append({"date": m[1], "change": m[2], "rows": {}, "table": []})
        elif line.startswith("| ") and current:
            current[-1]["table"].append(line)
            key, value = re.fullmatch(r"\| (.+?) \| (.+?) \|", line).groups()
            current[-1]["rows"][key] = value
        elif line.startswith("<details>"):
            m = re.fullmatch(r"<details><summary>Quality tokens \(first 16\)</summary> \[(.*)\] </details>", line)
            current[-1]["tokens"] = [int(t) for t in m[1].split(", ")]
    return sections


def check_entry(entry: dict, model: Path, args) -> None:
    rows = entry["rows"]
    assert entry["table"][:2] == ["| Metric | Value |", "| Model | " + model.name + " |"]
    assert rows["Version"] == "V7" and rows["Layers"] == str(args.n_layer) and rows["Embedding"] == str(args.n_embd)
    assert rows["GPU"] == device_name() and rows["Backend"].startswith("cpu")
    assert rows["GB read / token"] == "-"  # no kernel runs on the CPU backend
    for key in ("**Load Time**", "**Prefill**", "**Generation**"):
        assert re.fullmatch(r"\*\*\d+\.\d\d (ms|tok/s)\*\*", rows[key]), rows[key]
    assert len(entry["tokens"]) == 16
    expected = hashlib.sha256(",".join(map(str, entry["tokens"])).encode()).hexdigest()[:16]
    assert rows["Quality Hash"] == f"`{expected}`"


def greedy_float64(path: Path, prompt: list[int], n: int = 16) -> list[int]:
    ref = ReferenceRWKV7(path)
    logits, state = ref.run(prompt)
    logits, tokens = logits[-1], []
    for _ in range(n):
        tokens.append(int(np.argmax(logits)))
        logits, state = ref.step(tokens[-1], state)
    return tokens


# ---------------------------------------------------------------------------------------
# pieces


def test_quality_hash_is_sha256_of_comma_joined_ids():
    assert bench.quality_hash([33, 3319, 153]) == hashlib.sha256(b"33,3319,153").hexdigest()[:16]


def test_degenerate_and_verdict():
    assert "one token (5)" in bench.degenerate_reason([5] * 16)
    assert "2 distinct" in bench.degenerate_reason([1, 2] * 8)
    assert bench.degenerate_reason([1, 2, 3] + [1] * 13) is None
    good = list(range(100, 116))
    ref = bench.Reference(good, [0.5] * 15 + [0.001], "cached")
    assert bench.quality_verdict([good, good], ref) is None
    assert "run 2" in bench.quality_verdict([good, good[:-1] + [0]], ref)
    reason = bench.quality_verdict([good[:-1] + [7]], ref)
    assert "position 15" in reason and "gap there is 0.001" in reason
    assert "degenerate" in bench.quality_verdict([[4] * 16], ref)
    # off the reference's path: judged token by token along that path
    assert bench.quality_verdict([good[:-1] + [7]], ref, gaps=[0.0] * 15 + [bench.NEAR_TIE]) is None
    reason = bench.quality_verdict([good[:-1] + [7]], ref, gaps=[0.0] * 15 + [0.5])
    assert "token 15 (7) is 0.5 logits below the reference's choice" in reason


def _tied_model(tmp_path) -> tuple[Path, list[int], int, int, int]:
    """A model whose head has two identical rows, A and B > A, with A among its greedy tokens.

    Returns (file, prompt, k, A, B): the reference picks A at position k, where B ties it exactly.
    """
    hp = synth.synthetic_args(1, 64, 128, (8, 8, 8, 8), vocab=512)
    tensors = synth.synthetic_tensors(hp, seed=3)
    path, prompt = tmp_path / "plain.gguf", list(range(20, 44))
    write_rwkv7_gguf(path, hp, tensors, "F32")
    tokens = bench.compute_reference(path, prompt).tokens
    k, a = next((i, t) for i, t in enumerate(tokens) if i >= 2 and t < 511 and t not in tokens[:i])
    head = np.array(tensors["output.weight"](), np.float32)  # the synthetic tensors are made on demand
    head[511] = head[a]  # token 511 now ties A everywhere
    tensors["output.weight"] = head
    tied = tmp_path / "tied.gguf"
    write_rwkv7_gguf(tied, hp, tensors, "F32")
    assert bench.compute_reference(tied, prompt).tokens == tokens  # argmax keeps the first of equals
    return tied, prompt, k, a, 511


def test_gate_judges_each_token_along_its_own_path(tmp_path):
    """A flipped exact tie passes (with a note); a flipped clear choice is rejected, at its real gap."""
    path, prompt, k, a, b = _tied_model(tmp_path)
    reference = bench.compute_reference(path, prompt)
    assert bench.path_gaps(path, prompt, reference.tokens) == [0.0] * 16  # greedy tokens: the reference's choice

    # another engine takes B at position k, then continues greedily from there
    flipped = reference.tokens[:k] + [b]
    flipped += bench.compute_reference(path, prompt + flipped, n=16 - len(flipped)).tokens
    gaps = bench.path_gaps(path, prompt, flipped)
    assert max(gaps) == 0.0, gaps
    assert bench.quality_verdict([flipped, flipped], reference, gaps) is None
    assert f"near tie at token {k}" in bench.tie_note(flipped, reference, gaps)

    # taking the runner-up where the reference sees a clear gap is a wrong token, measured at its real gap
    j = next(i for i in range(16) if i != k and reference.margins[i] > 0.1)
    logits, _ = ReferenceRWKV7(path).run(prompt + reference.tokens[:j])  # float64, independent of rwkv_mlx
    order = np.argsort(logits[-1])
    wrong = reference.tokens[:j] + [int(order[-2])] + reference.tokens[j + 1:]
    gaps = bench.path_gaps(path, prompt, wrong)
    assert gaps[:j] == [0.0] * j
    np.testing.assert_allclose(gaps[j], logits[-1][order[-1]] - logits[-1][order[-2]], rtol=1e-4, atol=1e-5)
    reason = bench.quality_verdict([wrong], reference, gaps)
    assert f"from position {j}" in reason and "along their own path" in reason


def test_insert_entry_groups_by_title_newest_last():
    doc = bench.MARKDOWN_HEADER
    doc = bench.insert_entry(doc, "A", "### a1\n")
    doc = bench.insert_entry(doc, "B", "### b1\n")
    doc = bench.insert_entry(doc, "A", "### a2\n")
    lines = [l for l in doc.splitlines() if l.startswith("#")]
    assert lines[1:] == ["## A", "### a1", "### a2", "## B", "### b1"]


def test_count_primitives_plain_and_compiled():
    a, b, c = mx.array([1.0, 2.0]), mx.array([3.0, 4.0]), mx.array([5.0, 6.0])
    mx.eval(a, b, c)
    assert bench.count_primitives([(a + b) * c]) == {"Add": 1, "Multiply": 1}
    assert bench.count_primitives([a]) == {}  # evaluated arrays are leaves
    fused = mx.compile(lambda x, y, z: mx.exp((x + y) * z))
    names = bench.count_primitives([fused(a, b, c)])
    assert sum(names.values()) == 1 and next(iter(names)).startswith("Compiled")  # one fused kernel


def test_prompt_is_exactly_n_tokens(synthetic):
    _, tokenizer = rwkv_mlx.load(synthetic)
    passage = tokenizer.encode(bench.PROMPT_FILE.read_text())
    assert bench.benchmark_prompt(tokenizer, 10) == passage[:10]
    long = bench.benchmark_prompt(tokenizer, 2 * len(passage) + 3)
    assert len(long) == 2 * len(passage) + 3 and long[len(passage):2 * len(passage)] == passage


def test_decode_step_counts_every_matrix(require_oracle):
    model, _ = rwkv_mlx.load(FIXA_Q4)
    count = bench.decode_step_primitives(model)
    # fixa-Q4_K_M: the six block matrices of both layers are Q4_K -> affine; the Q6_K head is dense on CPU
    assert count.by_name["QuantizedMatmul"] == 12
    assert count.n_layer == 2 and 0 < count.kernels < count.primitives == sum(count.by_name.values())


# ---------------------------------------------------------------------------------------
# whole runs


def test_oracle_entry_and_reference_match_float64(require_oracle, results, capsys):
    assert benchmark(FIXA_Q4, results, title="Oracle", change="first entry") == 0
    out = capsys.readouterr().out
    assert "tok/s" in out
    log = parse_log((results / "BENCHMARKS.md").read_text())
    [entry] = log["Oracle"]
    model, tokenizer = rwkv_mlx.load(FIXA_Q4)
    check_entry(entry, FIXA_Q4, model.args)
    assert entry["change"] == "first entry"
    [line] = [json.loads(l) for l in (results / "benchmarks.jsonl").read_text().splitlines()]
    assert line["title"] == "Oracle" and line["quality_tokens"] == entry["tokens"] and line["device"] == device_name()
    assert line["prefill_tps"] > 0 and line["generation_tps"] > 0 and line["runs"] == 2
    assert line["prefill_tps_min"] <= line["prefill_tps"] <= line["prefill_tps_max"]
    # the gate's reference is right: the independent float64 model gives the same greedy tokens
    prompt = bench.benchmark_prompt(tokenizer, 24)
    assert line["reference"]["tokens"] == greedy_float64(FIXA_Q4, prompt)


@pytest.mark.slow
def test_synthetic_entries_compare_and_plot(synthetic, results, capsys, tmp_path):
    assert benchmark(synthetic, results, title="Synthetic", change="one") == 0
    assert benchmark(synthetic, results, title="Synthetic", change="two") == 0
    entries = parse_log((results / "BENCHMARKS.md").read_text())["Synthetic"]
    assert [e["change"] for e in entries] == ["one", "two"]
    model, _ = rwkv_mlx.load(synthetic)
    for entry in entries:
        check_entry(entry, synthetic, model.args)
    lines = [json.loads(l) for l in (results / "benchmarks.jsonl").read_text().splitlines()]
    assert lines[1]["reference"]["source"] == "cached" and lines[0]["reference"]["source"] == "computed"
    capsys.readouterr()
    assert run(["benchmark", "--compare", "Synthetic", "--results-dir", str(results)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and "(1.00x)" in table[2] and "| two " in table[3]

    pytest.importorskip("matplotlib", reason="matplotlib draws the plot")
    png = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_benchmarks.py"), "--title", "Synthetic",
                           "--results-dir", str(results), "--out", str(png)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_rejects_a_broken_fast_path_on_the_same_file(synthetic, results, capsys, monkeypatch):
    assert benchmark(synthetic, results, change="clean") == 0
    clean = json.loads((results / "benchmarks.jsonl").read_text().splitlines()[-1])
    log_before = (results / "BENCHMARKS.md").read_text()
    original = rwkv_mlx.model.wkv.wkv7

    def forgets_decay(r, log_w, k, v, a, b, state, **kw):
        # a "kernel" that drops the decay; the reference path (kernels disabled) stays exact
        return original(r, log_w * 0 if kernels_enabled() else log_w, k, v, a, b, state, **kw)

    monkeypatch.setattr(rwkv_mlx.model.wkv, "wkv7", forgets_decay)
    capsys.readouterr()
    assert benchmark(synthetic, results, change="broken kernel") == bench.QualityGateError.exit_code
    out, err = capsys.readouterr()
    assert "tok/s" not in out
    [message] = [l for l in err.splitlines() if "error" in l]
    assert "quality gate" in message and "differ from the float32 reference" in message
    assert (results / "BENCHMARKS.md").read_text() == log_before
    rejected = json.loads((results / "benchmarks.jsonl").read_text().splitlines()[-1])
    assert "rejected" in rejected and not any("tps" in k for k in rejected)
    assert rejected["reference"]["tokens"] == clean["quality_tokens"] != rejected["quality_tokens"]


def test_gate_rejects_a_model_that_emits_one_token(tmp_path, results, capsys):
    hp = synth.synthetic_args(1, 64, 128, (8, 8, 8, 8), vocab=512)
    tensors = synth.synthetic_tensors(hp, seed=1)
    head = np.zeros((512, 64), np.float32)
    head[77] = 1.0  # the normed output is all ones (weight 0, bias 1): logit 64 for token 77, 0 elsewhere
    tensors.update({"output.weight": head, "output_norm.weight": np.zeros(64, np.float32),
                    "output_norm.bias": np.ones(64, np.float32)})
    path = tmp_path / "one-token.gguf"
    write_rwkv7_gguf(path, hp, tensors, "F32")
    assert benchmark(path, results) == bench.QualityGateError.exit_code
    out, err = capsys.readouterr()
    assert "tok/s" not in out and "one token (77) repeated 16 times" in err
    assert not (results / "BENCHMARKS.md").exists()


def test_refuses_fewer_than_16_generated_tokens(synthetic, results, capsys):
    assert run(["benchmark", "--model", str(synthetic), "--no-record", "--gen-tokens", "8", "--device", "cpu"]) == 2
    assert "--gen-tokens must be >= 16" in capsys.readouterr().err


def test_peers_mlx_lm_agrees_on_the_float32_oracle(require_oracle, results, capsys):
    """mlx-lm's own RWKV-7, fed our mapping of the GGUF weights, decodes the reference tokens (mlx-lm is optional)."""
    pytest.importorskip("mlx_lm", reason="mlx-lm is the optional peer (pip install 'rwkv-mlx[peers]')")
    from rwkv_mlx.bench import peers
    model = ORACLE / "models" / "fixa-f32.gguf"
    argv = ["--model", str(model), "--mode", "float32", "--prompt-tokens", "24", "--gen-tokens", "16", "--runs", "1",
            "--warmup", "0", "--device", "cpu", "--results-dir", str(results)]
    assert peers.main(argv) == 0
    line = json.loads((results / "benchmarks.jsonl").read_text().splitlines()[-1])
    assert line["engine"] == "mlx-lm" and line["agreement_with_reference"] == 16
    assert line["quality_hash"] == line["ours"]["quality_hash"]
    assert "rwkv-mlx / mlx-lm" in (results / "peers.md").read_text()


def test_entry_names_the_settings_it_ran_under(synthetic, results, monkeypatch):
    """A figure taken under $RWKV_MLX_GPU_BLOCKS=affine (say) must say so: the README compares entries."""
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert benchmark(synthetic, results, change="plain") == 0
    monkeypatch.setenv("RWKV_MLX_DECODE_AHEAD", "2")
    monkeypatch.setenv("RWKV_MLX_GPU_BLOCKS", "affine")
    monkeypatch.setenv("MLX_UNRELATED", "1")  # not one of ours: not recorded
    assert benchmark(synthetic, results, change="set") == 0
    plain, with_settings = parse_log((results / "BENCHMARKS.md").read_text())["T"]
    assert "Settings" not in plain["rows"]
    assert with_settings["rows"]["Settings"] == "`RWKV_MLX_GPU_BLOCKS=affine`, `RWKV_MLX_DECODE_AHEAD=2`"
    lines = [json.loads(l) for l in (results / "benchmarks.jsonl").read_text().splitlines()]
    assert [line["settings"] for line in lines] == [
        {}, {"RWKV_MLX_GPU_BLOCKS": "affine", "RWKV_MLX_DECODE_AHEAD": "2"}]
    assert plain["tokens"] == with_settings["tokens"]  # (two steps queued ahead decode the same tokens)


def test_commit_from_the_environment_wins(monkeypatch):
    """A tree copied to another machine may carry a stale .git: $RWKV_MLX_COMMIT names the real commit."""
    monkeypatch.setenv("RWKV_MLX_COMMIT", "abc1234")
    assert bench.git_commit() == ("abc1234", None)
    monkeypatch.delenv("RWKV_MLX_COMMIT")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    assert bench.git_commit()[0] == head.stdout.strip()


def test_row0_teacher_forced_in_a_batch_gives_the_alone_logits():
    """batch_decode's reference: row 0 of a batch of 3, fed the tokens row 0 decoded alone, has the alone
    logits at every step (rows are independent; bitwise on this CPU backend), where the other rows follow
    their own argmax."""
    from rwkv_mlx.bench.measure import greedy_steps, row0_logits

    model, _ = rwkv_mlx.load(REPO / "rwkv_mlx" / "data" / "rwkv7-demo-shakespeare.gguf")
    prompts = [[5, 17, 30, 41, 52], [60, 7, 19, 3, 44], [12, 12, 80, 9, 31]]
    _, alone_state = model(mx.array([prompts[0]]), logits="last")
    t0 = mx.array([7], dtype=mx.uint32)
    alone_tokens, _ = greedy_steps(model, t0, alone_state, 5)
    alone = row0_logits(model, t0, alone_state, 5)
    forced_order = [9, 11, 13, 15, 17]  # what the batch is fed instead: must not matter to row 0's first step
    _, state = model(mx.array(prompts), logits="last")
    forced = row0_logits(model, mx.array([7, 3, 4], dtype=mx.uint32), state, 5, forced=alone_tokens[0])
    assert np.array_equal(forced, alone)
    other = row0_logits(model, mx.array([7, 3, 4], dtype=mx.uint32), state, 5, forced=forced_order)
    assert np.array_equal(other[0], alone[0]) and not np.array_equal(other[1:], alone[1:])


def test_row0_agreement_counts_a_near_tie_only_within_the_tolerance():
    from rwkv_mlx.bench.measure import ROW0_LOGIT_TOLERANCE, row0_agreement

    rng = np.random.default_rng(0)
    alone = rng.standard_normal((4, 100)).astype(np.float32)
    assert row0_agreement([1, 2, 3, 4], [1, 2, 3, 4], None, None) == (True, "4/4")
    close = alone + ROW0_LOGIT_TOLERANCE / 4 * np.linalg.norm(alone, axis=1, keepdims=True) / 10
    ok, said = row0_agreement([1, 2, 3, 4], [1, 2, 5, 6], alone, close)
    assert ok and said.startswith("2/4; near-tie at token 3"), said
    far = alone.copy()
    far[2] += 2 * ROW0_LOGIT_TOLERANCE * np.linalg.norm(alone[2])  # (one step is enough to refuse)
    ok, said = row0_agreement([1, 2, 3, 4], [1, 2, 5, 6], alone, far)
    assert not ok and "from alone's" in said, said


def test_batch_decode_states_the_bars_strictly(tmp_path):
    """scripts/batch_decode.py --bars: issue 14's bars from --json lines of two processes. Each batch size's
    medians against their own process's one stream, and the slowest against the fastest process's one stream
    (16 rows: 2,400 / 350 = 6.9x, 3,400 / 280 = 12.1x, strictly 6.9x < 8; 64 rows: 8,400 / 350 = 24.0x, strictly
    24.0x, met; a batch size whose tokens differed has no speed and is left out; other settings, a row of their
    own: 9,000 / 350 = 25.7x)."""
    def line(batch, tps, one, runs):
        return {"model": "q4.gguf", "route": "kernels", "batch": batch, "tps": tps, "one_stream": one,
                "one_stream_runs": runs}

    first, second = (350.0, [340.0, 350.0, 360.0]), (280.0, [270.0, 280.0, 290.0])
    lines = [line(16, 2400.0, *first), line(64, 8400.0, *first), line(16, 3400.0, *second),
             line(64, 8700.0, *second), line(64, None, *second), {**line(64, 1.0, *first), "route": "matmul"},
             {**line(64, 9000.0, *first), "settings": {"RWKV_MLX_PARTS_IN_PROLOGUE": "1"}}]  # (a row of its own)
    path = tmp_path / "ab.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in lines))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "batch_decode.py"), "-", "--bars", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert rows[2] == "| q4.gguf | 16 | 2,400, 3,400 | 270-360 | 6.9-12.1x | 6.9x | 8x | no |"
    assert rows[3] == "| q4.gguf | 64 | 8,400, 8,700 | 270-360 | 24.0-31.1x | 24.0x | 24x | yes |"
    assert rows[4] == "| q4.gguf RWKV_MLX_PARTS_IN_PROLOGUE=1 | 64 | 9,000 | 340-360 | 25.7-25.7x | 25.7x | 24x | yes |"
    assert len(rows) == 5


def test_greedy_steps_times_each_step_without_changing_its_tokens():
    """greedy_steps' ``timings``: one (replay, queue) pair a step, whose sum is the host's time, and the same
    tokens as a run without timings."""
    from rwkv_mlx.bench.measure import greedy_steps

    model, _ = rwkv_mlx.load(REPO / "rwkv_mlx" / "data" / "rwkv7-demo-shakespeare.gguf")
    _, state = model(mx.array([[5, 17, 30], [60, 7, 19]]), logits="last")
    t0 = mx.array([7, 3], dtype=mx.uint32)
    plain, _ = greedy_steps(model, t0, state, 4)
    timings: dict = {}
    timed, seconds = greedy_steps(model, t0, state, 4, timings)
    assert timed == plain and len(timings["steps"]) == 4
    assert all(r > 0 and q > 0 for r, q in timings["steps"])
    assert sum(r + q for r, q in timings["steps"]) == pytest.approx(timings["host"], rel=1e-9)
    assert timings["host"] <= seconds
