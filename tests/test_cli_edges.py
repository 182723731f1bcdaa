"""The rough edges a daily user hits: --version, switches, argument checks, statistics, Ctrl-C, chat exits, states.

The command runs in fresh interpreters (``run_cli``) where the process matters (signals,
wall time, stdin), in-process (``run``) elsewhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_model_path

import rwkv_mlx
from rwkv_mlx import LoadOptions, State
from rwkv_mlx.cli import run

from rwkv_mlx.testing.fuzz_gguf import run_cli  # the installed command in a fresh interpreter

CPU = LoadOptions.for_backend("cpu")


def one_error_line(capsys, status: int, got: int) -> str:
    err = capsys.readouterr().err
    assert got == status and "Traceback" not in err, (got, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rwkv-mlx: error: "), err
    return lines[0]


def test_version(capsys):
    assert run(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rwkv-mlx {rwkv_mlx.__version__} (mlx ") and "Python" in out


def test_switches_show_no_value_and_refuse_one(capsys):
    assert run(["generate", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--greedy" in help_text and "<bool>" not in help_text
    line = one_error_line(capsys, 2, run(["generate", "--greedy", "yes", "--prompt", "x"]))
    assert "--greedy is a switch and takes no value (got 'yes')" in line
    line = one_error_line(capsys, 2, run(["generate", "--stats", "no", "--prompt", "x"]))
    assert "--stats is a switch" in line and "--no-stats to turn it off" in line


def test_help_texts_print_their_brackets(capsys, monkeypatch):
    """typer renders help through rich, whose markup takes "[serve]" for a style and drops it unescaped."""
    import typer

    from rwkv_mlx.cli import app

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a token
    group = typer.main.get_command(app)
    checked = 0
    for name, command in group.commands.items():
        texts = [command.help or ""] + [p.help or "" for p in command.params if getattr(p, "help", None)]
        tokens = {t.replace("\\", "") for text in texts for t in re.findall(r"\\?\[[A-Za-z][^\]\s]*\]|<[a-z]+>", text)}
        if not tokens:
            continue
        assert run([name, "--help"]) == 0
        shown = capsys.readouterr().out
        assert not [t for t in tokens if t not in shown], (name, tokens)
        checked += 1
    assert checked  # at least "the [serve] extra"


def test_argument_checks_come_before_loading(capsys, tmp_path):
    missing_model = str(tmp_path / "never-loaded.gguf")  # a model error here would mean loading came first
    line = one_error_line(capsys, 2, run(["generate", "--think", "think", "--prompt", "x", "--model", missing_model]))
    assert line == "rwkv-mlx: error: --think needs --chat"
    text = tmp_path / "missing.txt"
    line = one_error_line(capsys, 3, run(["perplexity", "--text", str(text), "--model", missing_model]))
    assert line == f"rwkv-mlx: error: {text}: cannot read (No such file or directory)"


def test_converting_into_an_uncreatable_path_exits_3(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    dst = blocker / "out"  # a directory inside a regular file cannot be created
    line = one_error_line(capsys, 3, run(["convert", str(tiny_model_path()), str(dst), "--quiet"]))
    assert line.startswith(f"rwkv-mlx: error: cannot create a directory beside {dst}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _stats(stderr: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| (\w[\w ]*?) +\| (.*?) *\|$", stderr, re.M)}


def _ms(value: str) -> int:
    return int(re.match(r"(\d+) ms", value).group(1))


def test_stats_account_for_the_whole_wall_time(tmp_path):
    t0 = time.perf_counter()
    proc = run_cli(["generate", "--model", str(tiny_model_path()), "--prompt", "Hello", "-n", "3", "--seed", "1"])
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    stats = _stats(proc.stderr.decode())
    phases = ["startup", "load", "tokenize", "prefill", "generation", "other"]
    total = _ms(stats["total"])
    assert abs(sum(_ms(stats[p]) for p in phases) - total) <= len(phases)  # each rounded to 1 ms
    # the total counts from the process's start (/proc, 10 ms ticks): within the wall time seen from outside
    assert total <= wall * 1000 + 20 and _ms(stats["startup"]) > 0
    assert stats["generation"].startswith(f"{_ms(stats['generation'])} ms (3 tokens, ") and "length" in stats["generation"]


def test_ctrl_c_prints_the_stats_so_far_and_a_newline():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from rwkv_mlx.cli import main; sys.argv[0] = 'rwkv-mlx'; main()",
         "generate", "--model", str(tiny_model_path()), "--prompt", "Hello", "-n", "100000", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = proc.stdout.read(8)  # generation has started
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert (first + out).endswith(b"\n") and "Traceback" not in err
    stats = _stats(err)
    assert "interrupted" in stats["generation"] and _ms(stats["total"]) > 0
    assert err.rstrip().endswith("rwkv-mlx: interrupted")


def _chat(stdin: bytes, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["chat", "--model", str(tiny_model_path()), "-n", "4", "--seed", "1", *extra], stdin=stdin)


@pytest.mark.parametrize("word", ["exit", "quit", "/quit"])
def test_chat_leaves_on_exit_and_quit(word):
    proc = _chat(f"{word}\nthis line is never read as a message\n".encode())
    assert proc.returncode == 0, proc.stderr
    assert b"Assistant:" not in proc.stdout  # nothing was answered


def test_chat_leaves_on_ctrl_c_at_an_empty_prompt():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from rwkv_mlx.cli import main; sys.argv[0] = 'rwkv-mlx'; main()",
         "chat", "--model", str(tiny_model_path()), "-n", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE)
    deadline = time.time() + 120
    err = b""
    while b"commands:" not in err and time.time() < deadline:  # the help line: the prompt comes next
        err += os.read(proc.stderr.fileno(), 4096)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    assert proc.returncode == 0, (err + rest).decode()
    assert out.endswith(b"\n") and b"Traceback" not in rest


def test_save_state_is_the_state_after_the_prompt(tmp_path):
    path, prompt = tiny_model_path(), "Hello there, friend"
    saved = tmp_path / "prompt.state"
    common = ["generate", "--model", str(path), "-n", "5", "--greedy", "--no-stats", "--device", "cpu"]
    plain = run_cli([*common, "--prompt", prompt])
    proc = run_cli([*common, "--prompt", prompt, "--save-state", str(saved)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == plain.stdout  # saving changes nothing in the output
    model, tokenizer = rwkv_mlx.load(path, CPU)
    loaded = State.load(saved, model)
    expected = rwkv_mlx.cache_prompt(model, tokenizer, prompt)
    for got, want in zip(loaded.arrays(), expected.arrays()):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    # and --state continues from it as the Python API does
    more = run_cli([*common, "--prompt", " and more", "--state", str(saved)])
    text = rwkv_mlx.generate(model, tokenizer, " and more", state=expected, max_tokens=5, sampling=rwkv_mlx.SamplingParams.greedy())
    assert more.stdout.decode() == text + "\n"
    mx.clear_cache()


# -- every error path maps to a documented exit status ----------------------------------------

#: The statuses the README documents: 2 argument, 3 file, 4 unsupported, 5 quality gate; 130 and 143 are
#: the shell's convention for SIGINT and SIGTERM (a conversion cleaned up after a signal).
DOCUMENTED = {2, 3, 4, 5, 130, 143}


def _error_classes() -> list[type]:
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(rwkv_mlx.__path__, "rwkv_mlx."):  # every class, wherever defined
        if ".kernels" not in module.name:
            importlib.import_module(module.name)
    found, todo = [], [rwkv_mlx.RwkvMlxError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted(set(found), key=lambda c: c.__qualname__)


def _instance(cls):
    try:
        return cls("some-file.bin", "the problem")
    except TypeError:
        return cls("the problem")


@pytest.mark.parametrize("error", [*_error_classes(), OSError(2, "No such file or directory", "/no/such/dir"),
                                   KeyboardInterrupt()], ids=lambda e: getattr(e, "__name__", type(e).__name__))
def test_every_error_class_exits_with_a_documented_status_and_one_line(error, monkeypatch, capsys):
    from rwkv_mlx.cli import app

    exc = _instance(error) if isinstance(error, type) else error
    info = next(c for c in app.registered_commands if c.callback.__name__ == "info")

    def raising():
        raise exc

    monkeypatch.setattr(info, "callback", raising)
    monkeypatch.setattr(info, "name", "info")  # typer names a command after its function otherwise
    status = run(["info"])  # the stand-in takes no arguments
    err = capsys.readouterr().err
    assert status in DOCUMENTED and "Traceback" not in err, (status, err)
    assert len(err.strip().splitlines()) == 1, err
    if isinstance(exc, rwkv_mlx.RwkvMlxError):
        assert status == exc.exit_code and err.strip() == f"rwkv-mlx: error: {exc}"
    elif isinstance(exc, OSError):
        assert status == 3 and err.strip() == "rwkv-mlx: error: /no/such/dir: No such file or directory"
    else:
        assert status == 130
