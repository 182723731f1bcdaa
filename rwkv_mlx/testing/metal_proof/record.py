"""Which Metal kernel instantiations a model launches: a recording launch hook.

An instantiation is what makes MLX generate (and a Mac compile) a distinct Metal
source: the kernel and its variant, each input's dtype and address space (MLX
passes an input of fewer than 8 elements in ``constant`` space, a 0-d one by
reference), the template constants and the output dtypes. Sizes beyond that
class do not change the text, so the first launch's shapes stand for the rest;
every launch's geometry is kept for the limit checks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import mlx.core as mx

from ...kernels import forced_backend
from ...kernels.dialect import Launch, LaunchError, launch_hook

# mlx/backend/common/metal_kernel.cpp: max_constant_array_size
METAL_CONSTANT_BELOW = 8


def address_class(shape: tuple[int, ...]) -> str:
    """How MLX declares an input of this shape in the Metal signature."""
    if len(shape) == 0:
        return "scalar"  # const constant T& name
    size = 1
    for d in shape:
        size *= d
    return "constant" if size < METAL_CONSTANT_BELOW else "device"


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


@dataclass
class Instantiation:
    """One distinct Metal source a model makes MLX generate, and the launches that use it."""

    kernel: object = field(repr=False)  # dialect.Kernel
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape of the first launch)
    template: tuple[tuple[str, int], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[str, ...]
    launches: set = field(default_factory=set)  # (grid, threadgroup) seen
    cases: set = field(default_factory=set)  # which recorded runs launched it

    @property
    def key(self) -> tuple:
        return key_of(self.kernel, self.inputs, self.template, self.output_dtypes)

    @property
    def label(self) -> str:
        spaces = "".join({"device": "d", "constant": "c", "scalar": "s"}[address_class(s)] for _, _, s in self.inputs)
        dtypes = sorted({d for _, d, _ in self.inputs} - {"uint8", "int32"})
        t = ",".join(f"{k}={v}" for k, v in self.template)
        return f"{self.kernel.name}<{t}> [{'/'.join(dtypes)}] spaces={spaces}"


def describe(launch: Launch) -> tuple[tuple, Instantiation]:
    """(key, a new Instantiation) of one launch."""
    k = launch.kernel
    inputs = tuple((n, dtype_name(a.dtype), tuple(a.shape)) for n, a in zip(k.rendered.inputs, launch.inputs))
    template = tuple((n, int(v)) for n, v in launch.template)
    out_dtypes = tuple(dtype_name(d) for d in launch.output_dtypes)
    inst = Instantiation(k, inputs, template, tuple(tuple(s) for s in launch.output_shapes), out_dtypes)
    return key_of(k, inputs, template, out_dtypes), inst


def key_of(kernel, inputs, template, output_dtypes) -> tuple:
    return (kernel.name, kernel.defines, tuple((d, address_class(s)) for _, d, s in inputs), tuple(template),
            tuple(output_dtypes))


class Recorder:
    """A launch hook that records instantiations and returns zeros of the output shapes."""

    def __init__(self):
        self.instantiations: dict[tuple, Instantiation] = {}
        self.refused: dict[str, set[str]] = {}  # LaunchError message -> cases
        self.case = ""

    def __call__(self, launch: Launch) -> list:
        key, inst = describe(launch)
        inst = self.instantiations.setdefault(key, inst)
        inst.launches.add((launch.grid, launch.threadgroup))
        inst.cases.add(self.case)
        return [mx.zeros(s, dtype=d) for s, d in zip(launch.output_shapes, launch.output_dtypes)]

    @contextlib.contextmanager
    def recording(self, case: str):
        """Record what the body launches on Metal; a launch the plan check refuses is noted, not raised."""
        self.case = case
        try:
            with forced_backend("metal"), launch_hook(self):
                yield
        except LaunchError as e:
            self.refused.setdefault(str(e), set()).add(case)


def model_runs(model, *, prefill_batches=(1, 2), decode_batches=(1, 2, 4), prompt: int = 5):
    """(case, callable) pairs: a prefill of ``prompt`` tokens per batch size, two decoded tokens per batch size.

    Nothing is evaluated: the launches are made while the graph is built (the recorder returns
    zeros), and the pure-MLX parts around them need not run.
    """
    vocab = model.args.vocab_size
    runs = []
    for B in prefill_batches:
        tokens = mx.array([[(7 * b + 3 * t) % vocab for t in range(prompt)] for b in range(B)], dtype=mx.uint32)
        runs.append((f"prefill B={B}", lambda tokens=tokens: model(tokens)))
    for B in decode_batches:
        tok = mx.array([(11 * b + 1) % vocab for b in range(B)], dtype=mx.uint32)

        def step(tok=tok, B=B):
            _, state = model(tok[:, None], model.initial_state(B))
            model(tok[:, None], state)

        runs.append((f"decode B={B}", step))
    return runs


def record_launches(model, label: str, recorder: Recorder | None = None, **runs) -> Recorder:
    """Every distinct Metal instantiation ``model`` launches in prefill and decode (see ``model_runs``)."""
    recorder = recorder or Recorder()
    for case, run in model_runs(model, **runs):
        with recorder.recording(f"{label} {case}"):
            run()
    return recorder
