"""Writing a file or a directory so that it is never seen half-written: ``atomic_write``.

Everything rwkv-mlx writes (GGUF exports, state files, converted directories,
training checkpoints, benchmark records) goes through it: the content is
written under a temporary name beside its destination and renamed into place
only when complete; on any exception (KeyboardInterrupt included) the
temporary is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, ContextManager, Iterator


def is_leftover(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary of ``atomic_write`` that a killed process left behind."""
    name = Path(path).name
    return name.startswith(".") and any(f".{tag}-" in name for tag in ("tmp", "old"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _aside(dst: Path, tag: str, *, directory: bool, suffix: str = "") -> Path:
    """A new, uniquely named file or directory beside ``dst`` (``.NAME.tag-XXXX``), with ordinary permissions."""
    prefix = f".{dst.name}.{tag}-"
    if directory:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
        os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any new directory
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dst.parent)
        os.close(fd)
        path = Path(name)
        os.chmod(path, 0o666 & ~_umask())
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _commit(tmp: Path, dst: Path, directory: bool) -> None:
    if not (directory and dst.exists()):
        os.replace(tmp, dst)
        return
    # a directory cannot replace a non-empty one: the old one goes aside, the new one
    # comes in, then the old one is deleted (put back if the second rename fails)
    old = _aside(dst, "old", directory=True)
    os.rename(dst, old / dst.name)
    try:
        os.rename(tmp, dst)
    except OSError:
        os.rename(old / dst.name, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(dst: str | os.PathLike, *, directory: bool = False, suffix: str = "",
                 guard: Callable[[], ContextManager] = contextlib.nullcontext) -> Iterator[Path]:
    """Yield a temporary path beside ``dst`` (an empty file, or with ``directory`` an empty directory).

    When the block ends normally it becomes ``dst`` (replacing what was there);
    when it raises, it is removed and ``dst`` is untouched.  ``suffix`` ends the
    temporary name (writers that append an extension unless it is there);
    ``guard`` is held around the final rename and around the cleanup (the
    converter defers SIGINT/SIGTERM there, so neither is cut short).
    """
    dst = Path(dst)
    tmp = _aside(dst, "tmp", directory=directory, suffix=suffix)
    try:
        yield tmp
        with guard():
            _commit(tmp, dst, directory)
    finally:
        with guard():
            if tmp.exists():
                _remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_write``, creating its directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
