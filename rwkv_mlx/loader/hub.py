"""Models by name from the Hugging Face Hub: ``ORG/REPO``, ``ORG/REPO:QUANT``, ``ORG/REPO`` + a file name.

``resolve_model(spec, file=None)`` turns what the user typed into a local path:

* a path that exists is returned as it is (a local path always wins over a repo id);
* ``ORG/REPO`` names a repo holding a model directory (config.json + safetensors:
  a converted rwkv-mlx directory, an mlx-lm directory or a Hugging Face checkpoint)
  or exactly one model file (.gguf or .pth);
* ``ORG/REPO:QUANT`` picks the GGUF whose name carries that quant as a whole word
  (``Q4_K_M`` matches ``...-Q4_K_M.gguf`` but ``Q4_K`` does not), as llama.cpp's ``-hf``;
* ``file=NAME`` (``--file NAME``) takes that .gguf, .pth or .safetensors file of the repo.

Downloads go through huggingface_hub into its standard cache (progress bars,
resumed partial downloads, HF_HOME, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are
its own).  Offline, or when the Hub cannot be reached, the cached snapshot of the
repo's ``main`` revision is used.  Every failure is one ``ModelFileError`` naming
the repo (exit status 3).  huggingface_hub is imported only when a repo id is used,
so loading local files never pays for it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InvalidArgumentError, ModelFileError

#: A Hub id: ``org/repo`` (letters, digits, ``-_.``) and an optional ``:quant`` tag.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<quant>[\w.-]+))?")
#: Files a model can be loaded from; a name ending in one of these is a local path, never a repo.
MODEL_FILE_SUFFIXES = (".gguf", ".pth", ".safetensors")
#: What a directory repo needs (weights, configs, vocabularies), nothing else (no .gguf, no .pth).
DIRECTORY_FILE_SUFFIXES = (".json", ".safetensors", ".txt")


def parse_hub_id(spec: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo, quant or None) when ``spec`` has the form of a Hub id, else None."""
    text = os.fspath(spec)
    m = HUB_ID.fullmatch(text)
    if m is None or text.lower().endswith(MODEL_FILE_SUFFIXES):
        return None
    return m.group("repo"), m.group("quant")


def resolve_model(spec: str | os.PathLike, file: str | None = None) -> Path:
    """A local path for ``spec`` (see the module docstring); downloads what is missing."""
    if Path(spec).exists():
        if file is None:
            return Path(spec)
        if not (Path(spec) / file).is_file():
            raise ModelFileError(Path(spec) / file, "no such file (--file in the local directory --model names)")
        return Path(spec) / file
    hub_id = parse_hub_id(spec)
    if hub_id is None:
        if file is not None:
            raise InvalidArgumentError(f"--file {file}: needs --model ORG/REPO (a Hugging Face repo), got {os.fspath(spec)!r}")
        return Path(spec)
    repo, quant = hub_id
    if quant is not None and file is not None:
        raise InvalidArgumentError(f"{os.fspath(spec)}: give either :{quant} or --file {file}, not both")
    return _Hub(repo).fetch(quant, file)


def quant_matches(filename: str, quant: str) -> bool:
    """Whether a GGUF's name carries ``quant`` as a whole word (case-insensitive)."""
    stem = Path(filename).name
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(quant)}(?![A-Za-z0-9_])", stem, re.IGNORECASE) is not None


def choose_files(repo: str, files: list[str], quant: str | None, file: str | None) -> tuple[list[str], bool]:
    """(files to download, whether they form a directory) for a repo holding ``files``."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if file is not None:
        if file not in files:
            raise ModelFileError(repo, f"no file {file!r} in the repo (it has {_listing(files)})")
        if not file.endswith(MODEL_FILE_SUFFIXES):
            raise InvalidArgumentError(f"--file {file}: not a model file ({', '.join(MODEL_FILE_SUFFIXES)})")
        if file.endswith(".safetensors"):  # a checkpoint's weights: needs its config beside it
            folder = str(Path(file).parent)
            config = "config.json" if folder == "." else f"{folder}/config.json"
            if config not in files:
                raise ModelFileError(repo, f"{file} has no config.json beside it: not a model directory")
            extra = [f for f in files if str(Path(f).parent) == folder and f.endswith((".json", ".txt"))]
            return sorted({file, *extra}), True
        return [file], False
    if quant is not None:
        matching = [f for f in ggufs if quant_matches(f, quant)]
        if not matching:
            raise ModelFileError(repo, f"no GGUF file matches :{quant} "
                                       f"(GGUF files: {', '.join(ggufs) if ggufs else 'none'})")
        if len(matching) > 1:
            raise ModelFileError(repo, f"several GGUF files match :{quant} ({', '.join(matching)}); "
                                       "pick one with --file NAME")
        return matching, False
    if "config.json" in files and any(f.endswith(".safetensors") and "/" not in f for f in files):
        return sorted(f for f in files if "/" not in f and f.endswith(DIRECTORY_FILE_SUFFIXES)), True
    models = sorted(f for f in files if f.endswith((".gguf", ".pth")))
    if len(models) == 1:
        return models, False
    if not models:
        raise ModelFileError(repo, f"holds no model: no .gguf, no .pth and no config.json with safetensors "
                                   f"(files: {_listing(files)})")
    raise ModelFileError(repo, f"holds {len(models)} model files ({', '.join(models)}); "
                               f"choose one with {repo}:QUANT or --file NAME")


def _listing(files: list[str], limit: int = 8) -> str:
    shown = sorted(files)[:limit]
    return ", ".join(shown) + (f" and {len(files) - limit} more" if len(files) > limit else "") if files else "no files"


class _Hub:
    """One repo on the Hub (or in the cache), reached through huggingface_hub."""

    def __init__(self, repo: str):
        self.repo = repo
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            raise ModelFileError(repo, "looks like a Hugging Face repo id, but huggingface_hub is not installed "
                                       "(pip install huggingface_hub); a local file of this name does not exist") from None
        from huggingface_hub import constants

        self.constants = constants

    def fetch(self, quant: str | None, file: str | None) -> Path:
        files, cached = self._list_files()
        try:
            chosen, is_dir = choose_files(self.repo, files, quant, file)
        except ModelFileError as e:
            if cached is None:
                raise
            raise ModelFileError(self.repo, f"{e.reason}; {self._offline_reason}, so only the cache "
                                            f"{self.constants.HF_HUB_CACHE} was searched") from None
        if cached is not None:  # offline or unreachable: everything must already be in the cache
            missing = [f for f in chosen if not (cached / f).exists()]
            if missing:
                raise ModelFileError(self.repo, f"{self._offline_reason} and {', '.join(missing)} is not in the "
                                                f"cache {self.constants.HF_HUB_CACHE}")
            paths = [cached / f for f in chosen]
        else:
            paths = [self._download(f) for f in chosen]
        if is_dir:  # the folder of the weights (--file NAME.safetensors) or the snapshot's top
            return paths[chosen.index(file)].parent if file is not None else paths[0].parent
        return paths[0]

    # -- listing ------------------------------------------------------------------------

    _offline_reason = "HF_HUB_OFFLINE is set"

    def _list_files(self) -> tuple[list[str], Path | None]:
        """The repo's files, and the cached snapshot they come from (None: from the Hub itself)."""
        if self.constants.HF_HUB_OFFLINE:
            return self._cached_files("HF_HUB_OFFLINE is set")
        from huggingface_hub import HfApi
        from huggingface_hub import errors as hf_errors

        try:
            info = HfApi().model_info(self.repo)
        except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
            raise ModelFileError(self.repo, f"no such model repo on {self.constants.ENDPOINT} (a private or gated "
                                            "repo needs HF_TOKEN); no local file of this name either") from None
        except hf_errors.HfHubHTTPError as e:
            raise ModelFileError(self.repo, f"the Hub answered: {_first_line(e)}") from None
        except (OSError, ConnectionError) as e:  # httpx's connection errors are OSError subclasses too
            return self._cached_files(f"cannot reach {self.constants.ENDPOINT} ({_reason(e)})")
        except Exception as e:  # httpx errors that are not OSError (timeouts, protocol errors)
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
                raise
            return self._cached_files(f"cannot reach {self.constants.ENDPOINT} ({_reason(e)})")
        return [s.rfilename for s in info.siblings or []], None

    def _cached_files(self, reason: str) -> tuple[list[str], Path]:
        self._offline_reason = reason
        folder = Path(self.constants.HF_HUB_CACHE) / ("models--" + self.repo.replace("/", "--"))
        try:
            commit = (folder / "refs" / "main").read_text().strip()
        except OSError:
            raise ModelFileError(self.repo, f"{reason} and the repo is not in the cache "
                                            f"{self.constants.HF_HUB_CACHE}") from None
        snapshot = folder / "snapshots" / commit
        files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
        return files, snapshot

    # -- downloading --------------------------------------------------------------------

    def _download(self, filename: str) -> Path:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.repo, filename))
        except hf_errors.HfHubHTTPError as e:
            raise ModelFileError(self.repo, f"downloading {filename}: the Hub answered: {_first_line(e)}") from None
        except hf_errors.LocalEntryNotFoundError as e:
            raise ModelFileError(self.repo, f"downloading {filename}: {_reason(e)}") from None
        except Exception as e:
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
                raise
            raise ModelFileError(self.repo, f"downloading {filename}: cannot reach {self.constants.ENDPOINT} "
                                            f"({_reason(e)})") from None


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _reason(e: BaseException) -> str:
    """The innermost cause's message ('[Errno 111] Connection refused'), on one line."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return _first_line(e)
