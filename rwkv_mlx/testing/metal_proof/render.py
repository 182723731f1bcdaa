"""The Metal source MLX generates for an instantiation, by MLX's own generator.

On any platform, ``mx.fast.metal_kernel`` builds its Metal source (signature,
address spaces, shape buffers, template instantiation) when called; inside
``mx.export_function`` tracing nothing runs, and ``verbose=True`` prints that
source to the C-level stdout, captured here. What a Mac compiles is
``metal::utils() + source`` (mlx/backend/metal/custom_kernel.cpp): the header
include/metal_stdlib stands in for ``metal::utils()``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

import mlx.core as mx

from .record import Instantiation

_BLOCK = re.compile(r"Generated source code for `[^`]*`:\n```\n(.*?)\n```", re.S)


class _CapturedStdout:
    """fd 1 into a temporary file while the block runs (MLX prints from C++)."""

    def __enter__(self):
        sys.stdout.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(1)
        os.dup2(self.file.fileno(), 1)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode()
        self.file.close()


def _example(dtype: str, shape: tuple[int, ...]) -> mx.array:
    return mx.zeros(shape, dtype=getattr(mx, dtype))  # lazy: never evaluated by the trace


def metal_sources(insts: list[Instantiation]) -> list[str]:
    """MLX's generated Metal source for each instantiation (its exact dtypes, shapes and template)."""
    if not insts:
        return []
    examples = [[_example(d, s) for _, d, s in inst.inputs] for inst in insts]
    flat = [a for ex in examples for a in ex]

    def trace(*arrays):
        outs, i = [], 0
        for inst, ex in zip(insts, examples):
            r = inst.kernel.rendered
            kernel = mx.fast.metal_kernel(name=inst.kernel.name, input_names=list(r.inputs),
                                          output_names=list(r.outputs), source=r.body, header=r.header)
            grid, group = sorted(inst.launches)[0]
            outs += kernel(inputs=list(arrays[i:i + len(ex)]), template=list(inst.template), grid=grid,
                           threadgroup=group, output_shapes=list(inst.output_shapes),
                           output_dtypes=[getattr(mx, d) for d in inst.output_dtypes], verbose=True)
            i += len(ex)
        return outs

    with tempfile.TemporaryDirectory() as tmp, _CapturedStdout() as out:
        mx.export_function(os.path.join(tmp, "trace.mlxfn"), trace, *flat)
    sources = _BLOCK.findall(out.text)
    if len(sources) != len(insts):
        raise RuntimeError(f"MLX printed {len(sources)} kernel sources for {len(insts)} instantiations")
    return sources
