"""Run kernel launches on the CPU through their MLX-generated Metal text (a launch hook).

Each launch is rendered by MLX's generator (render.py), built once per distinct
text with the emulator runtime (compile.py, include/rwkv_metal_emulator.h) and
called through ctypes with the buffers MLX would bind, in MLX's order: each input
(then its ``_shape``/``_strides``/``_ndim`` when the body uses them), then the outputs.
Outputs start as all-ones bytes (NaN for floats), so an element a kernel fails to
write cannot pass for a computed one.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .compile import APPLE_THREADGROUP_BYTES, APPLE_THREADS_PER_GROUP, ProofError, build_emulator, check, prepare
from .record import Instantiation, describe
from .render import metal_sources
from ...kernels import forced_backend
from ...kernels.dialect import Launch, launch_hook

STACK_BYTES = 64 * 1024  # per Metal thread


def _host(a: mx.array) -> np.ndarray:
    """The bytes of an MLX array as a contiguous numpy array (bfloat16 as its bits)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


@dataclass
class _Built:
    fn: object
    params: list
    inst: Instantiation


@dataclass
class Emulator:
    """A launch hook that computes every launch by its Metal text on the CPU.

    ``edit`` (source -> source) changes each generated text before it is built: the
    negative control breaks a kernel with it. ``built`` holds one library per distinct
    instantiation, ``launches`` counts the launches computed.
    """

    edit: object = None
    check_metal: bool = True  # also compile each text under Metal's rules (compile.check) first
    os_threads: bool = False  # an OS thread per Metal thread instead of fibers (slow; a cross-check)
    built: dict = field(default_factory=dict)
    launches: int = 0
    threadgroup_bytes: dict = field(default_factory=dict)  # instantiation label -> bytes measured

    def __post_init__(self):
        self._stacks = np.zeros(APPLE_THREADS_PER_GROUP * STACK_BYTES // 8 + 2, dtype=np.uint64)

    def _build(self, key: tuple, inst: Instantiation) -> _Built:
        source = metal_sources([inst])[0]
        if self.edit is not None:
            source = self.edit(source)
        prepared = prepare(source)
        if self.check_metal:
            result = check(prepared)
            if not result.ok:
                raise ProofError(f"{inst.label} does not compile under Metal's rules: {result.first_error}")
        lib = ctypes.CDLL(str(build_emulator(prepared)))
        fn = lib.rwkv_emu_launch
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
                       ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong), ctypes.c_int]
        built = self.built[key] = _Built(fn, prepared.params, inst)
        return built

    def __call__(self, launch: Launch) -> list:
        k = launch.kernel
        key, inst = describe(launch)
        inst.launches.add((launch.grid, launch.threadgroup))
        built = self.built.get(key) or self._build(key, inst)
        self.launches += 1

        threads = int(np.prod(launch.threadgroup))
        if threads > APPLE_THREADS_PER_GROUP or threads % 32:
            raise ProofError(f"{built.inst.label}: {threads} threads per group")
        if any(g % t for g, t in zip(launch.grid, launch.threadgroup)):
            raise ProofError(f"{built.inst.label}: grid {launch.grid} is not whole groups of {launch.threadgroup}")

        named = dict(zip(k.rendered.inputs, launch.inputs))
        outputs = [np.full(int(np.prod(s)) * np.dtype(_np_dtype(d)).itemsize, 0xFF, dtype=np.uint8)
                   for s, d in zip(launch.output_shapes, launch.output_dtypes)]
        out_index = {n: i for i, n in enumerate(k.rendered.outputs)}
        keep, ptrs = [], []
        for p in sorted((p for p in built.params if p.buffer is not None), key=lambda p: p.buffer):
            if p.name in named:
                buf = _host(named[p.name])
            elif p.name in out_index:
                buf = outputs[out_index[p.name]]
            elif p.name.endswith("_shape") and p.name[:-6] in named:
                buf = np.array(named[p.name[:-6]].shape, dtype=np.int32)
            elif p.name.endswith("_strides") and p.name[:-8] in named:
                buf = np.array(_strides(named[p.name[:-8]].shape), dtype=np.int64)
            elif p.name.endswith("_ndim") and p.name[:-5] in named:
                buf = np.array(named[p.name[:-5]].ndim, dtype=np.int32)
            else:
                raise ProofError(f"{built.inst.label}: no buffer for parameter {p.name}")
            if buf.size == 0:
                buf = np.zeros(1, dtype=buf.dtype)
            keep.append(buf)
            ptrs.append(buf.ctypes.data)
        dims = (ctypes.c_uint * 6)(*launch.grid, *launch.threadgroup)
        tg_bytes = ctypes.c_ulong(0)
        stacks = (self._stacks.ctypes.data + 15) // 16 * 16
        rc = built.fn((ctypes.c_void_p * len(ptrs))(*ptrs), dims, stacks, STACK_BYTES, ctypes.byref(tg_bytes),
                      int(self.os_threads))
        if rc == -2:
            raise ProofError(f"{built.inst.label}: could not start {threads} OS threads")
        if rc != 0:
            raise ProofError(f"{built.inst.label}: a barrier was not reached by every thread of a group")
        if tg_bytes.value > APPLE_THREADGROUP_BYTES:
            raise ProofError(f"{built.inst.label}: {tg_bytes.value} bytes of threadgroup memory")
        self.threadgroup_bytes[built.inst.label] = tg_bytes.value
        result = []
        for buf, shape, dtype in zip(outputs, launch.output_shapes, launch.output_dtypes):
            arr = mx.array(buf.view(_np_dtype(dtype)).reshape(shape))
            result.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
        return result

    @contextlib.contextmanager
    def running(self):
        """The model plans Metal launches and this emulator computes them."""
        with forced_backend("metal"), launch_hook(self):
            yield self


def _np_dtype(dtype: mx.Dtype):
    return {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.int32: np.int32,
            mx.uint32: np.uint32, mx.uint8: np.uint8, mx.int64: np.int64}[dtype]
