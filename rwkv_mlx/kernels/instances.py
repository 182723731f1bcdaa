"""Representative instantiations of every kernel: what the source checks render and compile.

Each entry names the dtypes the Python wrapper passes and the template
constants it binds, so a kernel that is never instantiated cannot slip by.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .matvec import _KINDS, reader_variants, variant_names


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


def _matvec(scales: str | None, slots: int = 8, x: str = "float32", y: str = "float32", prefetch: bool = False,
            rows_ahead: bool = False, **template) -> KernelInstance:
    # x prev ln_w ln_b mix eps | seg | bias residual | w0..w7 | s0..s7 | z0..z7 (one of each: ONE_SEGMENT;
    # scales None: no scale or offset slots, NO_SCALES; a READ_ variant for each kind in KINDS; MT > 0, the MMA
    # variant: x alone of the first six, and y without xn_out)
    # KINDS: every reader compiled in (bit k: kind k, kernels/matvec.py _KINDS), unless an entry narrows it
    every_kind = (1 << len(_KINDS)) - 1
    t = {"NB": 1, "RPW": 4, "MT": 0, "KT": 2560, "TILED": 0, "PRO": 0, "EPI": 0, "BITS": 0, "HAS_BIAS": 0,
         "KINDS": every_kind, "DQ": 1, **template}
    mma = t["MT"] > 0
    inputs = (x,) + ("float32",) * (0 if mma else 5) + ("int32",) + ("float32",) * 2 + ("uint8",) * slots
    inputs += (scales,) * (2 * slots) if scales else ()
    kinds = [k for k in _KINDS.values() if t["KINDS"] >> k & 1]
    defines = variant_names(slots == 1, scales is not None, kinds, t["BITS"], mma, prefetch, rows_ahead)
    return KernelInstance("matvec", inputs, (y,) if mma else (y, "float32"), t, defines)


def _wkv7(one_token: bool = False, y: str = "float32", **template) -> KernelInstance:
    # proj pre v_first | up_info | w_up a_up v_up g_up | bias0 k_k k_a r_k ln_w ln_b state_in; ONE_TOKEN: no scratch
    inputs = ("float32",) * 3 + ("int32",) + ("uint8",) * 4 + ("float32",) * 7
    template = {"H": 40, "N": 64, "UP": 1, "MIX_V": 1, "MAX_DOWN": 576, "TB": 16, "IL": 1, **template}
    outputs = (y, "float32") + (() if one_token else ("float32",))
    return KernelInstance("wkv7", inputs, outputs, template, ("ONE_TOKEN",) if one_token else ())


KERNEL_INSTANCES: list[KernelInstance] = [
    _wkv7(),
    _wkv7(H=2, UP=0, MIX_V=0, MAX_DOWN=1),
    _wkv7(H=3, N=128, UP=0, MIX_V=0, MAX_DOWN=1, TB=8, IL=0),
    _wkv7(H=2, UP=0, MIX_V=1, MAX_DOWN=1, TB=1),
    _wkv7(True, TB=1),  # decode's: one row
    _wkv7(True, "float16", H=2, UP=0, MIX_V=1, MAX_DOWN=1, TB=1),  # decode's: many rows, on the matrix units
    _matvec("float32", PRO=1, RPW=1),
    _matvec("float32", PRO=0, EPI=2, NB=2),
    _matvec("float32", HAS_BIAS=1),
    _matvec("float32", BITS=4, PRO=1),
    _matvec("float16", BITS=8, EPI=1),
    _matvec("bfloat16", BITS=5, EPI=2, KT=5120, TILED=1),
    _matvec("float32", BITS=6, PRO=1, NB=3, RPW=2),
    _matvec("float32", slots=1, BITS=4, PRO=1, EPI=1),
    _matvec("float16", slots=1, EPI=2, KT=5120, TILED=1, RPW=1),
    # narrowed as plans narrow them: dense only (an F16 file), dense + 4-bit affine, dense + Q4_K + Q6_K blocks;
    # without affine weights a plan also drops the scale slots (NO_SCALES)
    _matvec(None, PRO=1, KINDS=1 << _KINDS["dense"]),
    _matvec(None, slots=1, EPI=2, KINDS=1 << _KINDS["dense"]),
    _matvec("float32", BITS=4, PRO=1, KINDS=(1 << _KINDS["dense"]) | (1 << _KINDS["affine"])),
    _matvec(None, PRO=1, KINDS=(1 << _KINDS["dense"]) | (1 << _KINDS["q4_k"]) | (1 << _KINDS["q6_k"])),
    _matvec(None, slots=1, PRO=1, EPI=1, KINDS=1 << _KINDS["q4_k"]),
    # the matrix-unit variant (MT > 0, PRO 0 only): 16 and 64 activation rows, every reader, a Q4_K_M and an
    # F16 file's launches
    _matvec("float32", NB=16, RPW=0, MT=2, KT=448, TILED=1),
    _matvec("float16", NB=64, RPW=0, MT=1, KT=224, TILED=1, BITS=8, EPI=2, HAS_BIAS=1),
    _matvec(None, NB=16, RPW=0, MT=2, KT=448, TILED=1, EPI=1, KINDS=(1 << _KINDS["dense"]) | (1 << _KINDS["q4_k"])),
    _matvec(None, slots=1, NB=64, RPW=0, MT=1, KT=224, TILED=1, EPI=2, KINDS=1 << _KINDS["dense"]),
    _matvec("float32", NB=64, RPW=0, MT=4, KT=160, TILED=1, BITS=4),  # groups of 64 weight rows
    _matvec("float32", NB=16, RPW=0, MT=4, KT=288, TILED=1, BITS=4, DQ=3),  # a thread's groups decoded together
    # a thread's affine groups of the next tile loaded while this one multiplies (LOAD_AHEAD), 4- and 8-bit codes
    _matvec("float32", slots=1, prefetch=True, NB=64, RPW=0, MT=4, KT=160, TILED=1, BITS=4, EPI=1,
            KINDS=1 << _KINDS["affine"]),
    _matvec("float16", slots=1, prefetch=True, NB=16, RPW=0, MT=2, KT=480, TILED=1, BITS=8, EPI=2,
            KINDS=1 << _KINDS["affine"]),
    # float16 rows in (a split prologue's, the FFN key's) and out (the FFN key's, for the value launch)
    _matvec(None, slots=1, x="float16", NB=16, RPW=0, MT=4, KT=288, TILED=1, EPI=2, KINDS=1 << _KINDS["q4_k"]),
    _matvec(None, slots=1, y="float16", NB=64, RPW=0, MT=4, KT=160, TILED=1, EPI=1, KINDS=1 << _KINDS["dense"]),
    # a thread's pieces of the next tile's float16 rows loaded while this one multiplies (ROWS_AHEAD), with and
    # without the weights' LOAD_AHEAD
    _matvec(None, slots=1, x="float16", rows_ahead=True, NB=64, RPW=0, MT=2, KT=224, TILED=1, EPI=2,
            KINDS=1 << _KINDS["q4_k"]),
    _matvec("float32", slots=1, x="float16", prefetch=True, rows_ahead=True, NB=64, RPW=0, MT=4, KT=160, TILED=1,
            BITS=4, EPI=1, KINDS=1 << _KINDS["affine"]),
    # blocks -> float32 or float16 matrix (w, shape): one instance per block type a prompt can expand
    *(KernelInstance("dequant", ("uint8", "int32"), (out,), {"KIND": k, "BITS": 4}, ("NO_SCALES", *reader_variants([k])))
      for k in range(2, len(_KINDS)) for out in ("float32", "float16")),
    # affine codes -> float32 or float16 matrix (w, shape, scales, offsets): CUDA's products of many rows
    *(KernelInstance("dequant", ("uint32", "int32", scale, scale), (out,), {"KIND": _KINDS["affine"], "BITS": bits},
                     reader_variants([_KINDS["affine"]]))
      for bits, scale in ((4, "float32"), (8, "float32"), (5, "float16"), (4, "bfloat16")) for out in ("float32", "float16")),
    # a decode launch's LayerNorm + lerps (x, prev, ln_w, ln_b, mix, eps): r/k/v + LoRA down (6 mixes), FFN key, head
    *(KernelInstance("layernorm_lerp", ("float32",) * 6, ("float32", "float32"), {"K": 2560, "M": m, "P": 0, "NB": 0},
                     ("WHOLE",)) for m in (6, 1, 0)),
    KernelInstance("layernorm_lerp", ("float32",) * 6, ("float32", "float16"), {"K": 2560, "M": 6, "P": 0, "NB": 0},
                   ("WHOLE",)),  # for MMA
    # parts of K and the residual added first (x, residual, prev, ...; xsum out): W_o's in the FFN key's, the FFN
    # value's in the next block's r/k/v
    *(KernelInstance("layernorm_lerp", ("float32",) * 7, ("float32", "float16", "float32"),
                     {"K": 2560, "M": m, "P": 4, "NB": 64}) for m in (1, 6)),
]
