"""One-token matrix-vector products by the segmented kernel (custom_kernels/matvec.kern).

A launch multiplies up to eight weight matrices, each by its own input vector,
with an optional LayerNorm + token-shift prologue and relu^2 / residual
epilogues. Layers of every storage form (rwkv_mlx/layers.py) take part:
dense, affine (MLX's packed codes), and GGUF blocks as stored (``STORED_BLOCK_TYPES``).

From ``MMA_MIN_ROWS`` activation rows a launch takes the kernel's MMA variant (the matrix units, float16
operands); below, the float32 loops of CUDA cores and Apple's ALUs.

A ``MatvecPlan`` holds everything about a launch that does not change from
token to token (weight byte views, the segment table, constants), built and
evaluated once, so a decoded token adds the kernel call and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from .. import quants
from ..layers import AffineLinear, GGMLLinear, Linear
from ..settings import env_int
from .dialect import launches
from .layernorm_lerp import LayerNormLerpPlan, lerp_row, separate
from .layernorm_lerp import shape as prologue_shape

# GGUF block types the kernel reads as stored (gguf.GGMLQuantizationType ids -> kernel kind, each
# kind a decode_<kind> in custom_kernels/matvec_formats.kern). The loader keeps exactly these as
# blocks on GPU backends (model/weights.py), so this table is the one place that says which.
_GGML_KINDS = {14: "q6_k", 11: "q3_k", 10: "q2_k", 8: "q8_0", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1",
               20: "iq4_nl", 12: "q4_k", 13: "q5_k", 23: "iq4_xs"}
STORED_BLOCK_TYPES = frozenset(_GGML_KINDS)
WARPS = 8
_DENSE_CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
# the kernel's kind numbers (matvec.kern's segment table; group_rows' cases)
_KINDS = {"dense": 0, "affine": 1, "q6_k": 2, "q3_k": 3, "q2_k": 4, "q8_0": 5, "q4_0": 6, "q4_1": 7,
          "q5_0": 8, "q5_1": 9, "iq4_nl": 10, "q4_k": 11, "q5_k": 12, "iq4_xs": 13}
MAX_SEGMENTS = 8
# Activation rows above which no launch is planned; above the bound a decoded block's products are MLX's
# (kernels/products.py). Per backend and weight form (dense: float weights only; quantized: any affine or GGUF
# block matrix in the block). CUDA, measured on an H100: the float32 loops won at 4 rows (374 and 426 tok/s for
# Q4_K_M and F16 against 253 and 133, scaling at 4e654af, results/serve_bench.md); from 8 rows the matrix
# units (MMA) won at 16 rows (Q4_K_M 1,405 tok/s against 966, Q8_0 1,326 against 603, kernel_log step 16).
# Quantized weights: MLX's products dequantize every matrix at every step (11.2 of 26.5 ms a 64-row step, Q4_K_M);
# the matrix units gave 3,776 and 5,464 tok/s at 32 and 64 rows against the products' 1,665 and 2,036 (Q4_K_M,
# kernel_log step 20), so no bound. Dense weights reach cuBLAS as they are, and still the matrix units won at 64
# rows: F16 5,906 tok/s against the products' 4,576, one process each at a098b0d (kernel_log step 26; 32 rows not
# timed), so no bound either. Apple GPUs are not measured, so Metal keeps the kernels at every batch size. 0: no
# bound. (The form stays a key: a bound measured for one form need not hold for the other.)
MAX_BATCH_DEFAULT = {("cuda", "dense"): 0, ("cuda", "quantized"): 0, ("metal", "dense"): 0, ("metal", "quantized"): 0}
MAX_BATCH: int | None = None  # set by scripts and tests; None: $RWKV_MLX_KERNEL_MAX_BATCH or the default


def max_batch(backend: str, dense: bool = False) -> int:
    """Decoded rows above which ``backend`` takes a block's products from MLX (0: never); ``dense``: the
    block's weights are all float matrices."""
    default = MAX_BATCH_DEFAULT[backend, "dense" if dense else "quantized"]
    return env_int("RWKV_MLX_KERNEL_MAX_BATCH", default, override=MAX_BATCH)


def kernel_rows(batch: int, backend: str, dense: bool = False) -> bool:
    """Whether the matvec kernel takes ``batch`` activation rows on ``backend`` (``dense``: as max_batch)."""
    bound = max_batch(backend, dense)
    return not 0 < bound < batch


def all_dense(weights) -> bool:
    """Whether every one of these layers or arrays holds float weights (no affine codes, no GGUF blocks)."""
    return all(isinstance(w, (mx.array, Linear)) for w in weights)


@dataclass
class Segment:
    """One matrix of a launch. ``weight`` is a layer or a bare (rows, K) float array."""

    weight: nn.Module | mx.array
    x_offset: int = 0
    mode: int = 0  # prologue 0: 1 tanh, 2 sigmoid on the input; prologue 1: lerp row (-1: none)


@dataclass(frozen=True)
class _Weights:
    """A matrix as the kernel reads it."""

    data: mx.array  # bytes
    scales: mx.array | None
    offsets: mx.array | None
    fmt: tuple[str, int]  # (kind, bits)
    rows: int
    k: int
    wtype: int


class HalfCopies:
    """Float16 copies of the bare float arrays of matrix-unit launches (the LoRA matrices, kernels/decode.py).

    The matrix units multiply float16 operands: every tile rounds a float32 or bfloat16 weight to float16 (to
    nearest, half8) at every launch. Given the copy, rounded once the same way, a launch computes the same
    products from half the bytes, and one whose matrices are then all float16 copies its tiles (HALF_TILES)
    instead of decoding them. Only bare arrays: layers keep their own weights (an F32 file's matrices would
    take half as much memory again). Each copy is made once and shared by the plans of every batch size that
    hold this cache (the model's decode runtime, which drops it when the weights change).
    """

    def __init__(self):
        self._copies: dict[int, tuple[mx.array, mx.array]] = {}

    def __call__(self, w: mx.array) -> mx.array:
        if w.dtype == mx.float16:
            return w
        entry = self._copies.get(id(w))
        if entry is None or entry[0] is not w:  # (the array is held with its copy: its id is not reused)
            entry = self._copies[id(w)] = (w, w.astype(mx.float16))
            mx.eval(entry[1])
        return entry[1]

    def __len__(self) -> int:
        return len(self._copies)


def kind_number(ggml_type: int) -> int:
    """The kernels' kind number of a GGUF block type they read as stored (group_rows' cases)."""
    return _KINDS[_GGML_KINDS[ggml_type]]


def _weights(w) -> _Weights | None:
    if isinstance(w, mx.array):
        return _Weights(w.view(mx.uint8), None, None, ("dense", 0), w.shape[0], w.shape[1], _DENSE_CODES[w.dtype])
    if isinstance(w, Linear):
        return _weights(w.weight)
    if isinstance(w, AffineLinear) and w.group_size == 32:
        return _Weights(w.weight.view(mx.uint8), w.scales, w.biases, ("affine", w.bits), *w.shape, 0)
    # rows are whole blocks: 256 elements for K-quants and IQ4_XS, 32 for the others
    if (isinstance(w, GGMLLinear) and w.ggml_type in _GGML_KINDS
            and w.in_dims % quants.BLOCK_TYPES[w.ggml_type].block_elems == 0):
        kind = _GGML_KINDS[w.ggml_type]
        return _Weights(w.weight.view(mx.uint8), None, None, (kind, 0), *w.shape, 0)
    return None


def reader_variants(kinds) -> tuple[str, ...]:
    """matvec_formats.kern's READ_ variants for the kernel kinds a launch reads (``_KINDS``' numbers): a reader
    left out of them is left out of the text too, so they and the KINDS template constant come from here
    and ``kinds_mask`` only."""
    kinds = set(kinds)
    return tuple(f"READ_{name.upper()}" for name, k in _KINDS.items() if k in kinds)


def kinds_mask(kinds) -> int:
    """The KINDS template constant: bit k for kind k."""
    return sum(1 << k for k in set(kinds))


def _group_rows(kinds, bits: int, q8_paired: bool) -> bool:
    """Whether a launch on CUDA cores reads some rows a 32-weight group a lane (matvec.kern's GROUPS): every
    format but dense rows, Q4_K, Q5_K, 4- or 8-bit affine codes and (q8_paired: no row of an odd number of
    blocks) Q8_0."""
    chunked = {_KINDS["dense"], _KINDS["q4_k"], _KINDS["q5_k"]} | ({_KINDS["affine"]} if bits in (4, 8) else set())
    return not set(kinds) <= chunked | ({_KINDS["q8_0"]} if q8_paired else set())


def variant_names(one_segment: bool, affine: bool, kinds, bits: int = 0, mma: bool = False,
                  prefetch: bool = False, rows_ahead: bool = False, q8_paired: bool = False,
                  half_tiles: bool = False) -> tuple[str, ...]:
    """matvec.kern's variants for a launch of one or more matrices of the given kinds (affine ones of ``bits``
    bits; Q8_0 ones all read a pair of blocks a lane where q8_paired), with or without affine ones, on CUDA
    cores or (mma) on the matrix units, there loading the next tile's affine weights (prefetch) or float16
    activation rows (rows_ahead) ahead, or copying float16 weights as they are (half_tiles: every matrix is)."""
    return (("ONE_SEGMENT",) if one_segment else ()) + (() if affine else ("NO_SCALES",)) + \
        (("MMA",) if mma else ()) + (("LOAD_AHEAD",) if prefetch else ()) + \
        (("ROWS_AHEAD",) if rows_ahead else ()) + (("HALF_TILES",) if mma and half_tiles else ()) + \
        (("READ_GROUPS",) if not mma and _group_rows(kinds, bits, q8_paired) else ()) + reader_variants(kinds)


# Activation rows from which a launch multiplies on the matrix units (matvec.kern's MMA variant: weight
# tiles decoded to float16, products with float32 accumulators; CUDA sm_80 on, Apple's simdgroup matrices):
# the CUDA-core loops keep RPW x NB accumulators a lane, and their cost grew with the rows (16 rows took
# 16-17 times one row's launch time on an H100, results/serve_bench.md). Below it the exact float32 loops
# stay. None: $RWKV_MLX_MMA_MIN_ROWS or 8; 0 never.
MMA_MIN_ROWS: int | None = None
# Fewest groups an MMA launch should have: fewer keep fewer loads in flight, and under one group an SM (an
# H100 has 132) leave SMs idle (at 32, the 2.9B FFN value took 40 groups of 64 rows: 1,018 against 1,405
# tok/s at 16 rows with 128, Q4_K_M on an H100, results/kernel_log.md step 16). Taller groups and parts of K
# are chosen to keep them (MatvecPlan). An MMA group walks its tiles of K one memory round trip after another
# (about 6 us a tile), so CUDA asks for about two groups an SM: at 256 against 128 an H100 gave Q4_K_M 2,495
# against 2,063 tok/s at 16 rows and 5,355 against 4,655 at 64 (kernel_log step 18; 512 with up to 16 parts:
# 2,435 and 5,440). Apple GPUs have at most 80 cores and are not measured: 128. None: $RWKV_MLX_MMA_MIN_GROUPS
# or the backend's default.
MMA_MIN_GROUPS_DEFAULT = {"cuda": 256, "metal": 128}
MMA_MIN_GROUPS: int | None = None
MMA_WARPS = 8  # warps of an MMA group (matvec.kern's constexpr WARPS under MMA)


def mma_min_rows() -> int:
    return env_int("RWKV_MLX_MMA_MIN_ROWS", 8, override=MMA_MIN_ROWS)


def uses_mma(batch: int) -> bool:
    """Whether a launch of ``batch`` activation rows multiplies on the matrix units."""
    return 0 < mma_min_rows() <= batch


def mma_min_groups(backend: str) -> int:
    return env_int("RWKV_MLX_MMA_MIN_GROUPS", MMA_MIN_GROUPS_DEFAULT[backend], minimum=1, override=MMA_MIN_GROUPS)


# The most parts an MMA launch splits K into (RWKV_MLX_MMA_K_PARTS; 1: none): each part is a group of its own,
# writing its raw sums; the plan adds them in a fixed order, then applies the epilogue. So a launch of few,
# tall groups (64 weight rows stage each activation row for 4 times the weights of 16) keeps enough groups.
# At 16 rows on an H100 the 2.9B FFN value (2,560 rows, K = 10240: 160 groups of 16 rows walking 14 tiles each)
# took 85 us against 57 for the FFN key's same number of weights (results/kernel_log.md step 16).
MMA_K_PARTS: int | None = None


# Weight groups a thread of an MMA launch decodes at once (RWKV_MLX_MMA_DECODES; matvec.kern DQ): their
# loads in flight together, at the cost of registers (and so of groups resident on an SM). At 16 rows on an
# H100 an MMA launch took about 6 us a tile of K whatever its rows (results/kernel_log.md step 17): the
# tile's memory round trips in turn, not its products. Untimed above 1.
MMA_DECODES: int | None = None


def mma_decodes() -> int:
    return env_int("RWKV_MLX_MMA_DECODES", 1, minimum=1, override=MMA_DECODES)


# Whether an MMA launch of affine weights only loads a thread's weight groups of the next tile of K while the
# current one multiplies (RWKV_MLX_MMA_PREFETCH; matvec.kern's LOAD_AHEAD variant; DQ 1 only): a register
# prefetch across tiles, at the cost of a tile's words a thread in registers. Untimed, so off by default.
MMA_PREFETCH: bool | None = None


def mma_prefetch() -> bool:
    return bool(env_int("RWKV_MLX_MMA_PREFETCH", 0, minimum=0, override=MMA_PREFETCH))


# Whether an MMA launch of float16 activation rows loads a thread's pieces of the next tile's rows while the
# current one multiplies (RWKV_MLX_MMA_ROWS_AHEAD; matvec.kern's ROWS_AHEAD variant): the staging's memory round
# trip, which each tile waited out before its weights were decoded, overlaps the products, at the cost of a
# tile's pieces a thread in registers (ptxas, 2.9B Q4_K_M at 64 rows: see results/kernel_log.md step 19).
# Untimed, so off by default.
MMA_ROWS_AHEAD: bool | None = None


def mma_rows_ahead() -> bool:
    return bool(env_int("RWKV_MLX_MMA_ROWS_AHEAD", 0, minimum=0, override=MMA_ROWS_AHEAD))


# Groups one wave of an MMA launch holds (RWKV_MLX_MMA_WAVE; 0: not used): SMs x groups resident an SM (an H100 or
# H200: 132 x 4, at up to 64 registers a thread and 44 KB of shared memory a group). By MMA_MIN_GROUPS every 64-row
# launch of the 2.9B had 258-320 groups, 2 or 3 on an SM where 4 fit, each walking its tiles one memory round trip
# after another. With the wave, a launch takes the most parts of K (any count, not only powers of two) that keep
# its groups within one wave, and of the weight rows a group, MT, those that fill it most with them (the tallest of
# equals: taller groups stage the activation rows for more weights; a launch whose groups alone fill a wave keeps
# the tallest): 480-520 groups a 64-row launch. On an H100, Q4_K_M at 64 rows: 9,279, 9,047 and 9,268 tok/s in
# three processes against 8,622 and 8,619 without (+7.6% in the same lease; bounding the parts at 8: 9,058;
# MMA_MIN_GROUPS=512, 640 groups a launch, more than a wave: 8,641), results/kernel_log.md step 31. At 16 rows, where
# the host sets the pace, it gave 10.7x and 11.5x each process's one stream (not timed beside the rule before).
# Apple GPUs are not measured: 0 there. None: $RWKV_MLX_MMA_WAVE or the backend's default.
MMA_WAVE_DEFAULT = {"cuda": 528, "metal": 0}
MMA_WAVE: int | None = None
# The most parts of K under the wave (RWKV_MLX_MMA_K_PARTS bounds both rules): the 2.9B FFN value takes 13.
WAVE_MAX_PARTS = 16


def mma_wave(backend: str) -> int:
    """The wave a matrix-unit launch fills (0: the powers-of-two rule of ``k_parts``)."""
    return env_int("RWKV_MLX_MMA_WAVE", MMA_WAVE_DEFAULT[backend], override=MMA_WAVE)


def parts_bound(default: int, most: int | None) -> int:
    """The most parts of K a launch may take: $RWKV_MLX_MMA_K_PARTS or ``default`` (its rule's), and at most ``most``
    where the caller bounds it further."""
    return min(env_int("RWKV_MLX_MMA_K_PARTS", default, minimum=1, override=MMA_K_PARTS), most or 1 << 30)


def wave_parts(groups: int, tiles: int, wave: int, most: int | None = None) -> int:
    """The most parts of K (two tiles or more each, at most ``parts_bound(WAVE_MAX_PARTS, most)``) that keep
    ``groups`` groups of ``tiles`` tiles within a ``wave``; 1 where the groups alone fill it. A part takes
    ceil(tiles / parts) tiles (matvec.kern), so the count is the fewest that give that: none is left empty."""
    parts = max(1, min(parts_bound(WAVE_MAX_PARTS, most), wave // max(groups, 1), tiles // 2))
    return -(-tiles // -(-tiles // parts))


def k_parts(groups: int, tiles: int, backend: str, most: int | None = None) -> tuple[int, bool]:
    """Parts of K for an MMA launch of ``groups`` groups whose rows take ``tiles`` tiles where no wave is set: the
    fewest (a power of two) that give ``mma_min_groups(backend)`` groups with two tiles or more each, and True; where
    none does, the most allowed (``parts_bound(4, most)``) and False."""
    most = parts_bound(4, most)
    parts = 1
    while groups * parts < mma_min_groups(backend):
        if 2 * parts > most or tiles < 4 * parts:
            return parts, False
        parts *= 2
    return parts, True


def _mma_tiles(segment_rows: list[int]) -> list[int]:
    """The 16-row weight tiles an MMA group may own (MT), most first: those every segment holds whole. A group
    stages every activation row of its K once, so the launch reads its input (rows / 16 MT) times: with MT 1, a
    64-row step staged about 8.5 billion elements for 2.9 billion weights and ran at 2.3x one stream on an H100
    (results/kernel_log.md step 15)."""
    return [mt for mt in (4, 2, 1) if all(r % (16 * mt) == 0 for r in segment_rows)]


# Q4_K and Q5_K rows are read a lane per 16 bytes of qs, which hold weights of two groups 32 apart
# (matvec_formats.kern k_rows), and Q8_0 rows a lane per pair of blocks (q8_pair_rows): a tile must hold
# whole 64-element pairs.
_PAIRED_KINDS = ("q4_k", "q5_k", "q8_0")


def tile_length(kernel, k_max: int, template: dict, align: int = 32) -> int | None:
    """The staged tile (a multiple of ``align`` elements, 32 or 64) for rows of up to ``k_max``: the
    whole row if the backend's shared memory holds it, else the fewest equal tiles that fit (10240 at
    one activation row on Metal's 32 KB: two tiles of 5120). None: not even ``align`` fit."""
    for tiles in range(1, k_max + 1):
        kt = -(-k_max // (tiles * align)) * align  # ceil(k_max / tiles), rounded up to align
        if kernel.shared_bytes({**template, "KT": kt, "TILED": int(tiles > 1)}.items()) <= kernel.limits.shared_bytes:
            return kt
        if kt <= align:
            return None
    return None


# A lane keeps RPW x NB accumulators in registers (plus RPW x 8 decoded weights for NB > 2): past 64 they
# would spill to memory (CUDA gives a thread at most 255 registers), so many rows take fewer rows per warp.
# At 16 rows RPW 4 takes 157-254 registers a thread (scripts/cuda_ptxas.py): one group per SM; fewer rows per
# warp give more, smaller groups, which $RWKV_MLX_MATVEC_ACCUMULATORS lets a session time (not yet measured).
MAX_ACCUMULATORS = 64


def max_accumulators() -> int:
    return env_int("RWKV_MLX_MATVEC_ACCUMULATORS", MAX_ACCUMULATORS, minimum=1)


def _rows_per_warp(segment_rows: list[int], batch: int = 1) -> int | None:
    total = sum(segment_rows)
    for rpw in (4, 2, 1):
        if rpw > 1 and rpw * batch > max_accumulators():
            continue
        if all(r % (WARPS * rpw) == 0 for r in segment_rows) and (total // (WARPS * rpw) >= 264 or rpw == 1):
            return rpw
    return None


class MatvecPlan:
    """y [B, rows] = concat_s(W_s @ x_s) (+ bias, epilogue) for a fixed batch size B.

    prologue 1 normalizes x (K values per row) with ``ln`` and lerps towards
    ``prev`` by ``mix[mode]``; the call then also returns the normalized x
    (the next token-shift state). Where ``layernorm_lerp.separate`` says so, that
    prologue is a launch of its own ahead of a PRO 0 launch (``pre``, ``inner``).
    On the matrix units a bare float array (a LoRA matrix) is read as its float16 copy from ``halves``
    (``HalfCopies``; one of the plan's own where none is given). ``max_parts`` bounds its parts of K below
    ``$RWKV_MLX_MMA_K_PARTS`` (``parts_bound``).
    ``ok`` is False when these weights do not fit the kernel; callers then use plain MLX ops.
    """

    def __init__(self, segments: list[Segment], batch: int, *, backend: str, prologue: int = 0, epilogue: int = 0,
                 bias: mx.array | None = None, ln: nn.LayerNorm | None = None, mix: mx.array | None = None,
                 x_stride: int | None = None, out_shape: tuple[int, ...] | None = None,
                 half_input: bool = False, out_dtype: mx.Dtype = mx.float32, dense: bool | None = None,
                 halves: HalfCopies | None = None, max_parts: int | None = None):
        self.prologue, self.pre, self.out_dtype, self.x_dtype = prologue, None, out_dtype, mx.float32
        # (dense: the bound of max_batch for these weights; a block's plans share their block's)
        dense = all_dense(s.weight for s in segments) if dense is None else dense
        # The matrix-unit variant stages PRO 0 rows only: every group would normalize all rows again (579
        # against 723 tok/s at 16 rows, Q4_K_M on an H100, results/kernel_log.md step 15).
        if prologue == 1 and (separate(backend) or (uses_mma(batch) and kernel_rows(batch, backend, dense))):
            self._split(segments, batch, backend, epilogue, bias, ln, mix, out_shape, out_dtype, dense, halves,
                        max_parts)
            return
        weights = [_weights(s.weight) for s in segments]
        self.ok = (all(w is not None for w in weights) and len(weights) <= MAX_SEGMENTS
                   and kernel_rows(batch, backend, dense))
        if not self.ok:
            return
        affine = [w for w in weights if w.fmt[0] == "affine"]
        # one launch takes one affine bit width and one scale dtype
        self.ok = len({w.fmt for w in affine}) <= 1 and len({w.scales.dtype for w in affine}) <= 1
        if not self.ok:
            return
        rows, ks = [w.rows for w in weights], [w.k for w in weights]
        x_stride = x_stride or ks[0]
        # The MMA variant stages the rows 16 bytes a load (stage_rows): float32 rows four elements a load;
        # with half_input (the caller's launch before writes this one's rows) float16 rows, eight a load.
        starts = [x_stride, *(s.x_offset for s in segments)]
        mma = uses_mma(batch) and prologue == 0 and all(v % 4 == 0 for v in starts)
        if mma and half_input and all(v % 8 == 0 for v in starts) and all(s.mode == 0 for s in segments):
            self.x_dtype = mx.float16
        if mma and any(isinstance(s.weight, mx.array) and s.weight.dtype != mx.float16 for s in segments):
            halves = halves if halves is not None else HalfCopies()  # (HalfCopies: the tiles' own rounding)
            segments = [replace(s, weight=halves(s.weight)) if isinstance(s.weight, mx.array) else s
                        for s in segments]
            weights = [_weights(s.weight) for s in segments]
        tilings, rpw = (_mma_tiles(rows), 0) if mma else ([0], _rows_per_warp(rows, batch))
        self.ok = bool(tilings) and rpw is not None and all(k % 32 == 0 for k in ks)
        if not self.ok:
            return
        from .dialect import build, device_constant, placeholder

        # One matrix: the ONE_SEGMENT variant, without the seven unused weight slots; no affine matrix:
        # NO_SCALES, without the scale and offset slots (each input costs host time at every launch); the
        # READ_ variants of its formats, without the other readers' text (so does each KB of it).
        slots = 1 if len(weights) == 1 else MAX_SEGMENTS
        kinds = {_KINDS[w.fmt[0]] for w in weights}
        # LOAD_AHEAD: a variant, not a template constant, so that its code is not in the text MLX hashes at
        # every launch of the others
        prefetch = mma and mma_prefetch() and kinds == {_KINDS["affine"]} and mma_decodes() == 1
        rows_ahead = mma and mma_rows_ahead() and self.x_dtype == mx.float16  # (ROWS_AHEAD reads float16 rows)
        bits = affine[0].fmt[1] if affine else 0
        q8_paired = all(w.k % 64 == 0 for w in weights if w.fmt[0] == "q8_0")  # (dot_tile's Q8_0 pairs)
        # HALF_TILES: every matrix float16, the weight tile's own format, so its groups are copied, not decoded
        half_tiles = all(w.fmt[0] == "dense" and w.wtype == 1 for w in weights)
        variants = variant_names(slots == 1, bool(affine), kinds, bits, mma, prefetch, rows_ahead, q8_paired,
                                 half_tiles)
        self.kernel = build("matvec", backend, variants)
        # (the MMA variant decodes whole 32-element groups: any tile of them will do)
        paired = not mma and any(w.fmt[0] in _PAIRED_KINDS for w in weights)
        total = sum(rows)
        chosen, best = None, None
        wave = mma_wave(backend) if mma else 0
        for mt in tilings:  # MMA: the most weight rows a group whose tiles fit and, with parts of K, keep the groups
            template = {"NB": batch, "RPW": rpw, "MT": mt, "PRO": prologue, "EPI": epilogue, "BITS": bits,
                        "HAS_BIAS": int(bias is not None), "KINDS": kinds_mask(kinds),  # readers compiled in
                        "DQ": mma_decodes() if mma else 1}
            kt = tile_length(self.kernel, max(ks), template, 64 if paired else 32)
            # MMA: the staged rows' memory takes the output tile at the end (LDX = KT + 8 >= 2 x 16 MT)
            if kt is None or kt + 8 < 32 * mt:
                continue
            groups = total // (16 * mt) if mma else 0
            tiles = -(-max(ks) // kt)
            if wave:  # (the tiling whose groups fill a wave most, see MMA_WAVE)
                parts = wave_parts(groups, tiles, wave, max_parts)
                filled = min(groups * parts, wave) if groups <= wave else 0
                if best is None or filled > best:
                    chosen, best = (template, kt, groups, parts), filled
                continue
            parts, enough = k_parts(groups, tiles, backend, max_parts) if mma else (1, True)
            chosen = template, kt, groups, parts
            if enough:
                break
        if chosen is None:
            self.ok = False
            return
        template, kt, groups, self.parts = chosen
        self.template = list({**template, "KT": kt, "TILED": int(kt < max(ks))}.items())
        self.epilogue, self.bias = epilogue, bias
        table, start = [], 0
        for seg, w in zip(segments, weights):
            table.append([start, w.k, seg.x_offset, seg.mode, w.wtype, _KINDS[w.fmt[0]]])
            start += w.rows
        table.append([total, x_stride, self.parts, 0, 0, 0])
        self.dummy = placeholder()

        def eight(values):
            return values + [values[-1]] * (slots - len(values))

        # the launch's constant inputs by name: a variant drops some (matvec.kern's variant lines), so the
        # kernel's own input list orders them
        consts = {
            "ln_w": ln.weight if ln is not None else self.dummy,
            "ln_b": ln.bias if ln is not None else self.dummy,
            "mix": mix.astype(mx.float32) if mix is not None else self.dummy,
            "eps": device_constant([ln.eps if ln is not None else 0.0], mx.float32),
            "seg": mx.array(table, dtype=mx.int32),
            "bias": bias.astype(mx.float32) if bias is not None else self.dummy,
        }
        slot_values = {"w": [w.data for w in weights]}
        if affine:  # (else the NO_SCALES variant: no scale or offset slots)
            dummy_scales = placeholder(affine[0].scales.dtype)
            slot_values["s"] = [w.scales if w.scales is not None else dummy_scales for w in weights]
            slot_values["z"] = [w.offsets if w.offsets is not None else dummy_scales for w in weights]
        for prefix, values in slot_values.items():
            consts.update((f"{prefix}{i}", a) for i, a in enumerate(eight(values)))
        self.consts = {n: consts[n] for n in self.kernel.rendered.inputs if n not in ("x", "prev", "residual")}
        mx.eval(*self.consts.values())
        if mma:  # a group of MMA_WARPS warps per 16 MT rows and part of K
            self.grid, self.threadgroup = (groups * self.parts * 32 * MMA_WARPS, 1, 1), (32 * MMA_WARPS, 1, 1)
        else:  # a group of WARPS warps per WARPS x RPW rows
            self.grid, self.threadgroup = (total // rpw * 32, 1, 1), (32 * WARPS, 1, 1)
        # (the MMA variant has no xn_out: its plans take a LayerNorm prologue from a launch of their own)
        self.out_shapes = [out_shape or (batch, total), (batch, ks[0]) if prologue == 1 else (1,)]
        self.out_shapes = self.out_shapes[:len(self.kernel.rendered.outputs)]
        self.kernel_shapes = [(self.parts * batch, total)] + self.out_shapes[1:] if self.parts > 1 else self.out_shapes
        # (parts are float32 sums: the plan adds them, then converts)
        self.kernel_dtypes = [out_dtype if self.parts == 1 else mx.float32] + [mx.float32] * (len(self.out_shapes) - 1)
        signature = (tuple(self.template), tuple(str(a.dtype) for a in self.consts.values()),
                     str(self.x_dtype), str(out_dtype))
        self.ok = launches(self.kernel, signature, lambda: self(
            mx.zeros((batch, x_stride), dtype=self.x_dtype), mx.zeros((batch, ks[0])) if prologue == 1 else None,
            mx.zeros(self.out_shapes[0]) if epilogue == 2 else None))

    def _split(self, segments, batch, backend, epilogue, bias, ln, mix, out_shape, out_dtype, dense, halves,
               max_parts) -> None:
        """The prologue as a launch of its own: each segment reads its lerp's row of the prologue's output
        (float16 where the matvec launch multiplies on the matrix units)."""
        M, K = prologue_shape(ln, mix)
        rows = [Segment(s.weight, x_offset=lerp_row(s.mode, M) * K) for s in segments]
        self.inner = MatvecPlan(rows, batch, backend=backend, epilogue=epilogue, bias=bias, x_stride=(M + 1) * K,
                                out_shape=out_shape, half_input=True, out_dtype=out_dtype, dense=dense,
                                halves=halves, max_parts=max_parts)
        self.pre = LayerNormLerpPlan(ln, mix, batch, backend, xin_dtype=self.inner.x_dtype)
        self.ok = self.pre.ok and self.inner.ok
        if self.ok:
            self.template = self.inner.template
            self.out_shapes = [self.inner.out_shapes[0], (batch, K)]

    def __call__(self, x: mx.array, prev: mx.array | None = None, residual: mx.array | None = None):
        if self.pre is not None:
            xn, xin = self.pre(x, prev)
            return self.inner(xin, residual=residual), xn
        outs = self.launch(x, prev, residual)
        if self.parts > 1:
            return self.finish(outs[0], residual)
        return (outs[0], outs[1]) if self.prologue == 1 else outs[0]

    def finish(self, raw: mx.array, residual: mx.array | None = None) -> mx.array:
        """The launch's output from its raw sums of K's parts (``launch``): add_parts with its bias, epilogue
        and output dtype."""
        return add_parts(raw, self.parts, self.bias, self.epilogue, residual, self.out_shapes[0], self.out_dtype)

    def launch(self, x: mx.array, prev: mx.array | None = None, residual: mx.array | None = None) -> list[mx.array]:
        """The kernel's outputs as it writes them: with parts of K, their raw sums ([parts * B, rows], part p's
        rows first), before ``add_parts`` (a launch without a prologue of its own)."""
        given = {"x": x, "prev": prev if prev is not None else self.dummy,
                 "residual": residual if residual is not None else self.dummy}
        return self.kernel(
            inputs=[given[n] if n in given else self.consts[n] for n in self.kernel.rendered.inputs],
            template=self.template,
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=self.kernel_shapes,
            output_dtypes=self.kernel_dtypes,
        )


def add_parts(raw: mx.array, parts: int, bias: mx.array | None, epilogue: int, residual: mx.array | None,
              shape, dtype: mx.Dtype) -> mx.array:
    """An MMA launch's raw sums of K's parts (raw [parts * B, rows], part p's rows first) added in order, then
    + bias and the epilogue, as ``dtype`` in ``shape``: one elementwise chain, which a compiled step runs as one
    kernel. Slices, never raw[p]: MLX makes an integer index a Gather, a kernel of its own per part (3.5 ms of
    a 12.7 ms step at 16 rows on an H100). The residual is shaped as the sum, so no reshape splits the chain
    (two kernels a split launch were 64 launches a 2.9B step; at 16 rows the host sets the pace)."""
    p3 = raw.reshape(parts, raw.shape[0] // parts, -1)
    y = p3[:1]
    for p in range(1, parts):
        y = y + p3[p:p + 1]
    if bias is not None:
        y = y + bias
    res = residual.reshape(y.shape) if residual is not None else None
    return epilogue_ops(y, epilogue, res, y.shape).astype(dtype).reshape(shape)


def epilogue_ops(y: mx.array, epilogue: int, residual: mx.array | None, shape) -> mx.array:
    """matvec.kern's epilogues by MLX operations on finished products y [B, rows]: EPI 1 relu(.)^2,
    EPI 2 + residual; the result in ``shape``."""
    if epilogue == 1:
        y = mx.square(nn.relu(y))
    y = y.reshape(shape)
    return y + residual if epilogue == 2 else y


def matvec(x: mx.array, segments: list[Segment], *, backend: str, **options):
    """A one-off launch (tests, experiments): plans and runs; None if the weights don't fit."""
    prev, residual = options.pop("prev", None), options.pop("residual", None)
    eps = options.pop("eps", None)
    ln = options.get("ln")
    if ln is not None and eps is not None and ln.eps != eps:
        raise ValueError("eps comes from the LayerNorm")
    plan = MatvecPlan(segments, x.shape[0], backend=backend, x_stride=x.shape[-1], **options)
    return plan(x, prev, residual) if plan.ok else None
