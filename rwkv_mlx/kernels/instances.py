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
    variant: str = ""

    @property
    def label(self) -> str:
        return f"{self.kernel}-{self.variant}" if self.variant else self.kernel


KERNEL_INSTANCES: list[KernelInstance] = [
    KernelInstance("wkv7", ("float32",) * 12, ("float32",) * 3, {"H": 40, "N": 64}),
]
