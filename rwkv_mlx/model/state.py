"""The recurrent state: everything RWKV-7 remembers, of constant size.

Per layer: the previous token's time-mix input (``att_x``, [B, C]), the previous
token's channel-mix input (``ffn_x``, [B, C]) and the WKV matrix (``wkv``,
[B, H, N, N], value-by-key, float32 always).  A State is a value: the model
returns a new one and never mutates the one it was given.

Because the state is all the model knows about the text it has read, it can be
saved after a long prompt and restored later instead of re-reading the prompt
(:meth:`State.save` / :meth:`State.load`).  A saved state is tied to the exact
model that produced it (:class:`ModelIdentity`): applied to any other model it
would be meaningless numbers, so loading refuses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import mlx.core as mx
import numpy as np

from ..errors import InvalidArgumentError, ModelFileError
from ..io import atomic_write

STATE_FORMAT = "rwkv-mlx-state"
STATE_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ModelIdentity:
    """What a state belongs to: the model's shape (``ModelArgs``) and its weights' file hash."""

    args: tuple[tuple[str, object], ...]  # ModelArgs as sorted (name, value) pairs: hashable
    fingerprint: str

    @classmethod
    def of(cls, model) -> "ModelIdentity":
        return cls(tuple(sorted(model.args.to_dict().items())), getattr(model, "fingerprint", "") or "")

    def to_json(self) -> str:
        return json.dumps({"args": dict(self.args), "fingerprint": self.fingerprint}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelIdentity":
        d = json.loads(text)
        return cls(tuple(sorted(d["args"].items())), str(d["fingerprint"]))

    def describe(self) -> str:
        a = dict(self.args)
        shape = (f"{a.get('n_layer')} layers, n_embd {a.get('n_embd')}, head size {a.get('head_size')}, "
                 f"vocab {a.get('vocab_size')}")
        return f"the model with file hash {self.fingerprint or '(none)'} ({shape})"


@dataclass(eq=False)
class State:
    att_x: list[mx.array]
    ffn_x: list[mx.array]
    wkv: list[mx.array]
    #: The model this state came from, when known (set by prefill, generation and load).
    model_id: ModelIdentity | None = None

    # -- construction ---------------------------------------------------------------

    @classmethod
    def zeros(cls, args, batch_size: int = 1) -> "State":
        L, C, H, N = args.n_layer, args.n_embd, args.n_head, args.head_size
        return cls(
            [mx.zeros((batch_size, C)) for _ in range(L)],
            [mx.zeros((batch_size, C)) for _ in range(L)],
            [mx.zeros((batch_size, H, N, N)) for _ in range(L)],
        )

    @classmethod
    def from_arrays(cls, arrays: list[mx.array], model_id: ModelIdentity | None = None) -> "State":
        n = len(arrays) // 3
        return cls(list(arrays[:n]), list(arrays[n : 2 * n]), list(arrays[2 * n :]), model_id)

    # -- shape ----------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return len(self.wkv)

    @property
    def batch_size(self) -> int:
        return self.wkv[0].shape[0]

    def arrays(self) -> list[mx.array]:
        """Flat list of every array (for mx.eval / mx.compile inputs)."""
        return [*self.att_x, *self.ffn_x, *self.wkv]

    @property
    def nbytes(self) -> int:
        """Size in bytes: constant, whatever the length of the text read."""
        return sum(a.nbytes for a in self.arrays())

    def __repr__(self) -> str:
        H, N = self.wkv[0].shape[1], self.wkv[0].shape[-1]
        owner = f", model {self.model_id.fingerprint or '(no hash)'}" if self.model_id else ""
        return (f"State(batch={self.batch_size}, layers={self.n_layer}, n_embd={self.att_x[0].shape[-1]}, "
                f"wkv={H}x{N}x{N} {str(self.wkv[0].dtype).rsplit('.', 1)[-1]}, {self.nbytes / 1024:.1f} KiB{owner})")

    def _with_arrays(self, arrays: list[mx.array]) -> "State":
        return State.from_arrays(arrays, self.model_id)

    def map(self, fn) -> "State":
        """A state with ``fn`` applied to every array (e.g. ``lambda a: a.astype(...)``)."""
        return self._with_arrays([fn(a) for a in self.arrays()])

    # -- copies and batches ---------------------------------------------------------

    def copy(self) -> "State":
        """An independent copy (MLX arrays are immutable values, so sharing is safe; this is for clarity)."""
        return self._with_arrays(self.arrays())

    def owned_by(self, model) -> "State":
        """This state marked as produced by ``model`` (so :meth:`save` needs no model argument)."""
        return State(self.att_x, self.ffn_x, self.wkv, ModelIdentity.of(model))

    def __getitem__(self, rows) -> "State":
        """Rows of the batch: ``state[i]`` is a batch-1 state, ``state[1:3]`` a batch-2 one."""
        if isinstance(rows, (int, np.integer)):
            i = int(rows)
            if not -self.batch_size <= i < self.batch_size:
                raise InvalidArgumentError(f"state row {i} is out of range for batch size {self.batch_size}")
            rows = slice(i % self.batch_size, i % self.batch_size + 1)
        elif not isinstance(rows, slice):
            rows = mx.array(rows)
        return self.map(lambda a: a[rows])

    def split(self) -> list["State"]:
        """One batch-1 state per row."""
        return [self[i] for i in range(self.batch_size)]

    @classmethod
    def stack(cls, states: "list[State]") -> "State":
        """Concatenate states along the batch axis (each may hold one row or several)."""
        states = list(states)
        if not states:
            raise InvalidArgumentError("State.stack needs at least one state")
        if len(states) == 1:
            return states[0]
        shapes = [[a.shape[1:] for a in s.arrays()] for s in states]
        if any(s != shapes[0] for s in shapes[1:]):
            raise InvalidArgumentError("State.stack: the states come from models of different shapes")
        ids = {s.model_id for s in states if s.model_id is not None}
        if len(ids) > 1:
            raise InvalidArgumentError("State.stack: the states come from different models")
        columns = zip(*(s.arrays() for s in states))
        return cls.from_arrays([mx.concatenate(list(c), axis=0) for c in columns], next(iter(ids), None))

    # -- model checks -----------------------------------------------------------------

    def check_fits(self, model, source: str | os.PathLike = "state") -> None:
        """Raise ModelFileError unless every array has the shape ``model`` expects."""
        expected = State.zeros(model.args, self.batch_size)
        got = [a.shape for a in self.arrays()]
        want = [a.shape for a in expected.arrays()]
        if got != want:
            raise ModelFileError(source, f"state shapes do not fit this model: {_shape_summary(got)} "
                                         f"vs {_shape_summary(want)} expected")

    # -- files --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, model=None, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the state to ``path`` (safetensors), atomically, with its model's identity.

        ``model`` is needed only when the state does not know its model (a
        state returned by a bare ``model(tokens)`` call); ``metadata`` adds
        string entries (a chat session stores its settings there).
        """
        if model is not None:
            self.check_fits(model)
            identity = ModelIdentity.of(model)
        elif self.model_id is not None:
            identity = self.model_id
        else:
            raise InvalidArgumentError("this state does not know which model made it: call state.save(path, model)")
        path = Path(path)
        arrays = {}
        for i in range(self.n_layer):
            arrays[f"blocks.{i}.att_x"] = self.att_x[i]
            arrays[f"blocks.{i}.ffn_x"] = self.ffn_x[i]
            arrays[f"blocks.{i}.wkv"] = self.wkv[i]
        meta = {**(metadata or {}), "format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION,
                "model": identity.to_json(), "n_layer": str(self.n_layer)}
        try:
            with atomic_write(path, suffix=".safetensors") as tmp:  # MLX appends the extension unless it is there
                mx.save_safetensors(str(tmp), arrays, metadata=meta)
        except (OSError, RuntimeError) as e:
            raise ModelFileError(path, f"cannot write the state ({e})") from e
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model, *, strict: bool = True,
             return_metadata: bool = False):
        """Read a state written by :meth:`save` for ``model``.

        Refuses (ModelFileError) a file saved from another model.  With
        ``strict=False`` a state from a model of the same shape but other
        weights (e.g. another quantization of the same checkpoint) is accepted.
        """
        arrays, meta = read_state_file(path)
        try:
            saved = ModelIdentity.from_json(meta["model"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelFileError(path, "the state's model description is unreadable") from None
        ours = ModelIdentity.of(model)
        if saved.args != ours.args or (strict and saved.fingerprint != ours.fingerprint):
            raise ModelFileError(path, f"this state belongs to {saved.describe()}, not to {ours.describe()}")
        try:
            n = int(meta["n_layer"])
            state = cls([arrays[f"blocks.{i}.att_x"] for i in range(n)],
                        [arrays[f"blocks.{i}.ffn_x"] for i in range(n)],
                        [arrays[f"blocks.{i}.wkv"] for i in range(n)], ours)
        except (KeyError, ValueError) as e:
            raise ModelFileError(path, f"incomplete state file (missing {e})") from None
        state.check_fits(model, path)
        return (state, meta) if return_metadata else state

    @classmethod
    def from_state_tuning(cls, path: str | os.PathLike, model) -> "State":
        """The initial state trained by BlinkDL's state tuning (a ``.pth`` with
        ``blocks.N.att.time_state``, (H, N, N) per layer, key-by-value).

        ChatRWKV transposes the last two axes on load to get our value-by-key
        layout (spec section 2); the token-shift parts start at zero.  The file is
        read by the reader the loader registers (formats/pth.py's
        ``read_state_tuning``): this module knows no file format.
        """
        if _state_tuning_reader is None:
            raise RuntimeError("no state-tuning reader registered (import rwkv_mlx, which registers it)")
        args = model.args
        stored = _state_tuning_reader(path, args.n_layer, (args.n_head, args.head_size, args.head_size))
        wkv = [mx.array(t.astype(np.float32).transpose(0, 2, 1)[None]) for t in stored]
        zero = State.zeros(args, 1)
        return cls(zero.att_x, zero.ffn_x, wkv, ModelIdentity.of(model))


# (path, n_layer, (H, N, N)) -> each layer's time_state as stored (key-by-value), checked.
StateTuningReader = Callable[[Union[str, os.PathLike], int, tuple], list]
_state_tuning_reader: StateTuningReader | None = None


def register_state_tuning_reader(reader: StateTuningReader) -> None:
    """Called by rwkv_mlx.loader: the model layer reads no file format itself (the loader sits above it)."""
    global _state_tuning_reader
    _state_tuning_reader = reader


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The arrays and metadata of a state file, checked to be one."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such state file")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ModelFileError(path, f"not a safetensors file ({e})") from None
    if meta.get("format") != STATE_FORMAT or "model" not in meta:
        raise ModelFileError(path, "not an rwkv-mlx state file (no state metadata)")
    if meta.get("format_version") != STATE_FORMAT_VERSION:
        raise ModelFileError(path, f"state format version {meta.get('format_version')!r} is not supported "
                                   f"(this rwkv-mlx reads {STATE_FORMAT_VERSION})")
    return arrays, meta


def _shape_summary(shapes: list[tuple[int, ...]]) -> str:
    n = len(shapes) // 3
    return f"{n} layers, att_x {list(shapes[0]) if n else []}, wkv {list(shapes[2 * n]) if n else []}"
