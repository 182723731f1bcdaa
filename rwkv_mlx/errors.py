"""The one error family rwkv-mlx raises for bad input.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``;
the Python API lets the exception propagate.  Every message names the file
(or argument) and the problem, so a user never needs a traceback.
"""

from __future__ import annotations

import os


class RwkvMlxError(Exception):
    """Base class: a problem with what the user gave us, not a bug."""

    exit_code = 2


class ModelFileError(RwkvMlxError):
    """A model, state or vocabulary file that cannot be used."""

    exit_code = 3

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedModelError(ModelFileError):
    """A well-formed file of an architecture or type we do not run."""

    exit_code = 4


class InvalidArgumentError(RwkvMlxError):
    """A parameter out of range (sampling knobs, shapes, options)."""

    exit_code = 2
