"""Proof of the Metal kernels on a machine without an Apple GPU (issue 13).

Three steps, each its own module:

* ``record``: run a model with the Metal launch plans (``forced_backend("metal")``) under a
  launch hook and collect every distinct kernel instantiation it launches, with each launch's
  geometry;
* ``render`` + ``compile``: have MLX's own generator write the Metal source of each
  instantiation (``mx.export_function`` tracing, ``verbose=True``) and compile it with the clang
  of the ``ziglang`` wheel against ``include/metal_stdlib``, a header that keeps Metal's address
  spaces and kernel-scope threadgroup rule; threadgroup memory and threads per group are
  checked against Apple's limits by the compiled code itself;
* ``emulate``: build the same source with a CPU runtime (a fiber per Metal thread, barriers and
  32-lane SIMD operations) and run whole models through it as a launch hook.

The tests are tests/test_metal_proof.py; README "What was proven for Apple GPUs" says what runs where.
"""

from .record import Instantiation, Recorder, record_launches

__all__ = ["Instantiation", "Recorder", "record_launches"]
