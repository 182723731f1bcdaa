"""Models by name from the Hugging Face Hub, against a fake Hub on loopback.

The fake Hub (``FakeHub``) serves what huggingface_hub calls for ``model_info`` and
``hf_hub_download``: ``GET /api/models/ORG/REPO[/revision/REV]`` with ``siblings``;
``HEAD``/``GET /ORG/REPO/resolve/REV/FILE`` with ETag, X-Repo-Commit, Content-Length
and byte ranges (206); 404s with X-Error-Code RepoNotFound / EntryNotFound.  It logs
every request, so the tests see what went over the wire (ranges, the token).  The
command runs in fresh interpreters with HF_ENDPOINT, HF_HOME, HF_TOKEN and
HF_HUB_OFFLINE set as a user sets them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import tiny_model_path

from rwkv_mlx import DEMO_MODEL
from rwkv_mlx.errors import InvalidArgumentError, ModelFileError
from rwkv_mlx.loader.hub import choose_files, parse_hub_id, quant_matches, resolve_model

pytest.importorskip("huggingface_hub", reason="huggingface_hub is a dependency: pip install -e .")

from rwkv_mlx.testing.fuzz_gguf import run_cli  # the installed command in a fresh interpreter

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Repos are {name: {filename: bytes}}; ``requests`` logs (method, path, Range, Authorization)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        self.cut_once: set[tuple[str, str]] = set()  # (repo, file) whose next full GET stops halfway (a dropped connection)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Repo-Commit", COMMIT) if code == "EntryNotFound" else None
                self.send_header("Content-Type", "application/json")
                payload = json.dumps({"error": code}).encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(payload)

            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                path = self.path.split("?", 1)[0]
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
                if m:
                    files = hub.repos.get(m.group(1))
                    if files is None:
                        return self._error(404, "RepoNotFound")
                    info = {"id": m.group(1), "modelId": m.group(1), "sha": COMMIT, "private": False,
                            "siblings": [{"rfilename": f} for f in sorted(files)]}
                    payload = json.dumps(info).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    return self.wfile.write(payload) if body else None
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m or m.group(1) not in hub.repos:
                    return self._error(404, "RepoNotFound")
                data = hub.repos[m.group(1)].get(m.group(3))
                if data is None:
                    return self._error(404, "EntryNotFound")
                start, status = 0, 200
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if ranged and body:
                    start, status = int(ranged.group(1)), 206
                self.send_response(status)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if body and status == 200 and (m.group(1), m.group(3)) in hub.cut_once:
                    hub.cut_once.discard((m.group(1), m.group(3)))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif body:
                    self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, bytes]:
    """Two distinguishable tiny models (seeds 1 and 2) and a converted directory of the first."""
    from rwkv_mlx.loader.convert import convert

    one, two = tiny_model_path(seed=1), tiny_model_path(seed=2)
    d = tmp_path_factory.mktemp("hub-models") / "converted"
    convert(one, d)
    out = {"one": one.read_bytes(), "two": two.read_bytes()}
    out.update({f"dir/{p.name}": p.read_bytes() for p in d.iterdir()})
    return out


@pytest.fixture(scope="module")
def hub(models):
    directory = {k.split("/", 1)[1]: v for k, v in models.items() if k.startswith("dir/")}
    fake = FakeHub({
        "test-org/tiny-GGUF": {"tiny-Q4_K_M.gguf": models["one"], "tiny-Q8_0.gguf": models["two"],
                               "README.md": b"# tiny\n"},
        "test-org/tiny-one": {"model.gguf": models["one"], ".gitattributes": b""},
        "test-org/tiny-mlx": {**directory, "README.md": b"# converted\n"},
        "test-org/demo": {"demo.gguf": DEMO_MODEL.read_bytes()},  # 27 MB: more than one 10 MB download chunk
    })
    yield fake
    fake.close()


def hub_env(hub_url: str, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


GEN = ["generate", "--prompt", "Hello", "-n", "4", "--greedy", "--no-stats", "--device", "cpu"]


def local_text(path: Path) -> bytes:
    proc = run_cli([*GEN, "--model", str(path)])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_download_by_repo_quant_and_file(hub, tmp_path):
    home = tmp_path / "hf"
    # TQDM_POSITION=-1: huggingface_hub draws its bar off a terminal too (tqdm hides it on pipes by default)
    env = hub_env(hub.url, home, HF_TOKEN="hf_secret_test_token", TQDM_POSITION="-1")
    expected_one, expected_two = local_text(tiny_model_path(seed=1)), local_text(tiny_model_path(seed=2))
    assert expected_one != expected_two

    cases = [(["--model", "test-org/tiny-GGUF:Q8_0"], expected_two, "tiny-Q8_0.gguf"),
             (["--model", "test-org/tiny-GGUF:q4_k_m"], expected_one, "tiny-Q4_K_M.gguf"),
             (["--model", "test-org/tiny-GGUF", "--file", "tiny-Q8_0.gguf"], expected_two, None),
             (["--model", "test-org/tiny-one"], expected_one, "model.gguf"),
             (["--model", "test-org/tiny-mlx"], expected_one, "config.json")]
    for args, expected, shown in cases:
        proc = run_cli([*GEN, *args], env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stdout == expected, args
        if shown:  # huggingface_hub's progress bar, on stderr
            assert shown in proc.stderr.decode() and "100%" in proc.stderr.decode(), proc.stderr
    snapshot = home / "hub" / "models--test-org--tiny-GGUF" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]  # not README.md
    assert all(auth == "Bearer hf_secret_test_token" for *_, auth in hub.requests), "HF_TOKEN not sent"
    assert any(path.startswith("/api/models/test-org/tiny-GGUF") for _, path, *_ in hub.requests)

    # a second run downloads nothing again (HEAD requests only)
    before = len(hub.requests)
    assert run_cli([*GEN, "--model", "test-org/tiny-GGUF:Q8_0"], env=env).stdout == expected_two
    assert all(method != "GET" or path.startswith("/api/") for method, path, *_ in hub.requests[before:])


def test_a_dropped_download_resumes_with_a_range_request(hub, tmp_path):
    """The connection drops halfway through the file; huggingface_hub asks for the rest (Range) and finishes.

    huggingface_hub >= 1.0 resumes within a run from the last whole 10 MiB chunk it wrote
    (each run downloads into a file of its own, so a killed run leaves nothing to continue).
    """
    data = hub.repos["test-org/demo"]["demo.gguf"]
    hub.cut_once.add(("test-org/demo", "demo.gguf"))
    before = len(hub.requests)
    proc = run_cli([*GEN, "--model", "test-org/demo"], env=hub_env(hub.url, tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == local_text(DEMO_MODEL)
    ranges = [rng for method, path, rng, _ in hub.requests[before:] if method == "GET" and "/resolve/" in path]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < resumed_at <= len(data) // 2
    cached = tmp_path / "hf" / "hub" / "models--test-org--demo" / "snapshots" / COMMIT / "demo.gguf"
    assert cached.read_bytes() == data


def test_offline_mode_uses_the_prefilled_cache(hub, tmp_path):
    home = tmp_path / "hf"
    assert run_cli([*GEN, "--model", "test-org/tiny-GGUF:Q8_0"], env=hub_env(hub.url, home)).returncode == 0
    assert run_cli([*GEN, "--model", "test-org/tiny-mlx"], env=hub_env(hub.url, home)).returncode == 0
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens: any request would fail
    for offline in ({"HF_HUB_OFFLINE": "1"}, {}):  # offline, and online with the Hub unreachable
        env = hub_env(closed, home, **offline)
        proc = run_cli([*GEN, "--model", "test-org/tiny-GGUF:Q8_0"], env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == local_text(tiny_model_path(seed=2))
        proc = run_cli([*GEN, "--model", "test-org/tiny-mlx"], env=env)
        assert proc.returncode == 0 and proc.stdout == local_text(tiny_model_path(seed=1)), proc.stderr
    # offline, a file never downloaded is an error naming what is missing
    proc = run_cli([*GEN, "--model", "test-org/tiny-GGUF:Q4_K_M"], env=hub_env(closed, home, HF_HUB_OFFLINE="1"))
    assert _one_line(proc, 3) == (f"rwkv-mlx: error: test-org/tiny-GGUF: no GGUF file matches :Q4_K_M (GGUF files: "
                                  f"tiny-Q8_0.gguf); HF_HUB_OFFLINE is set, so only the cache {home / 'hub'} was searched")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(proc, status: int) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err and proc.returncode == status, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_hub_errors_are_one_line_exit_3(hub, tmp_path):
    env = hub_env(hub.url, tmp_path / "hf")
    line = _one_line(run_cli([*GEN, "--model", "test-org/no-such-repo"], env=env), 3)
    assert line.startswith(f"rwkv-mlx: error: test-org/no-such-repo: no such model repo on {hub.url}")
    line = _one_line(run_cli([*GEN, "--model", "test-org/tiny-GGUF:Q5_K_M"], env=env), 3)
    assert line == ("rwkv-mlx: error: test-org/tiny-GGUF: no GGUF file matches :Q5_K_M "
                    "(GGUF files: tiny-Q4_K_M.gguf, tiny-Q8_0.gguf)")
    line = _one_line(run_cli([*GEN, "--model", "test-org/tiny-GGUF"], env=env), 3)
    assert "holds 2 model files (tiny-Q4_K_M.gguf, tiny-Q8_0.gguf); choose one with test-org/tiny-GGUF:QUANT" in line
    closed = f"http://127.0.0.1:{_free_port()}"
    line = _one_line(run_cli([*GEN, "--model", "test-org/tiny-one"], env=hub_env(closed, tmp_path / "empty")), 3)
    assert line.startswith(f"rwkv-mlx: error: test-org/tiny-one: cannot reach {closed} (") and "refused" in line.lower()
    assert line.endswith(f"and the repo is not in the cache {tmp_path / 'empty' / 'hub'}")


def test_a_local_path_wins_over_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test-org").mkdir()
    shutil.copy(tiny_model_path(seed=1), tmp_path / "test-org" / "tiny-one")  # a local file named like a repo
    assert resolve_model("test-org/tiny-one") == Path("test-org/tiny-one")
    assert resolve_model("models/x.gguf") == Path("models/x.gguf")  # a model file name is never a repo id
    with pytest.raises(InvalidArgumentError, match="--file x.gguf: needs --model ORG/REPO"):
        resolve_model("./models", file="x.gguf")


@pytest.mark.parametrize("spec,expected", [
    ("org/repo", ("org/repo", None)), ("org/repo-GGUF:Q4_K_M", ("org/repo-GGUF", "Q4_K_M")),
    ("fla-hub/rwkv7-0.1B-g1", ("fla-hub/rwkv7-0.1B-g1", None)), ("org/repo.gguf", None), ("/abs/path", None),
    ("a/b/c", None), ("./rel", None), ("model.gguf", None),
])
def test_parse_hub_id(spec, expected):
    assert parse_hub_id(spec) == expected


def test_quant_is_a_whole_word():
    assert quant_matches("rwkv7-g1b-2.9b-Q4_K_M.gguf", "q4_k_m")
    assert not quant_matches("rwkv7-g1b-2.9b-Q4_K_M.gguf", "Q4_K")
    assert quant_matches("model.Q8_0.gguf", "Q8_0") and not quant_matches("model-IQ4_NL.gguf", "Q4_NL")
    with pytest.raises(ModelFileError, match="several GGUF files match :Q4_0"):
        choose_files("o/r", ["a-Q4_0.gguf", "b-Q4_0.gguf"], "Q4_0", None)
    assert choose_files("o/r", ["x/config.json", "x/m.safetensors", "x/vocab.txt", "y.gguf"], None,
                        "x/m.safetensors") == (["x/config.json", "x/m.safetensors", "x/vocab.txt"], True)


def test_info_and_convert_take_repo_ids(hub, tmp_path):
    env = hub_env(hub.url, tmp_path / "hf")
    proc = run_cli(["info", "test-org/tiny-GGUF:Q8_0"], env=env)
    assert proc.returncode == 0 and b"tiny-Q8_0.gguf" in proc.stdout, proc.stderr
    proc = run_cli(["convert", "test-org/tiny-GGUF", "--file", "tiny-Q4_K_M.gguf", str(tmp_path / "out"), "--quiet"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert local_text(tmp_path / "out") == local_text(tiny_model_path(seed=1))
