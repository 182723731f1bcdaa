"""Representative instantiations of every kernel: what the source checks render and compile.

Each entry names the dtypes the Python wrapper passes and the template
constants it binds, so a kernel that is never instantiated cannot slip by.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelInstance:
    kernel: str
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    template: dict = field(default_factory=dict)
    defines: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "-".join([self.kernel, *self.defines, *(f"{k}{v}" for k, v in self.template.items())])


def _matvec(scales: str, defines: tuple[str, ...], **template) -> KernelInstance:
    # x prev ln_w ln_b mix eps | seg | bias residual | w0..w3 | s0..s3 | z0..z3
    inputs = ("float32",) * 6 + ("int32",) + ("float32",) * 2 + ("uint8",) * 4 + (scales,) * 8
    t = {"NB": 1, "RPW": 4, "KMAX": 2560, "PRO": 0, "EPI": 0, "BITS": 0, "HAS_BIAS": 0, **template}
    return KernelInstance("matvec", inputs, ("float32", "float32"), t, defines)


KERNEL_INSTANCES: list[KernelInstance] = [
    KernelInstance("wkv7", ("float32",) * 9, ("float32",) * 3, {"H": 40, "N": 64, "MIX_V": 1}),
    KernelInstance("wkv7", ("float32",) * 9, ("float32",) * 3, {"H": 2, "N": 64, "MIX_V": 0}),
    _matvec("float32", ("FMT_DENSE",), PRO=1, RPW=1),
    _matvec("float32", ("FMT_DENSE",), PRO=0, EPI=2, NB=2),
    _matvec("float32", ("FMT_DENSE",), HAS_BIAS=1),
    _matvec("float32", ("FMT_AFFINE",), BITS=4, PRO=1),
    _matvec("float16", ("FMT_AFFINE",), BITS=8, EPI=1),
    _matvec("float32", ("FMT_AFFINE",), BITS=5, EPI=2, KMAX=10240),
    _matvec("float32", ("FMT_Q6_K",), PRO=1, KMAX=2560),
]
