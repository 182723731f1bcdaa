"""Tuning settings read from the environment: named in one table, read when used, checked.

Each is a speed choice with a measured default (where the comment at its use says how it was
measured); the settings exist so that one tree can time the alternatives side by side. A bad value
is an InvalidArgumentError naming the variable (exit 2, one line), not a traceback at import.
"""

from __future__ import annotations

import os

from .errors import InvalidArgumentError

# name -> what it sets (README's "Environment settings" lists the same names; a test keeps them equal)
SETTINGS = {
    "RWKV_MLX_KERNEL_MAX_BATCH": "decoded rows above which a block's products are MLX's (0, the default: no bound)",
    "RWKV_MLX_CUDA_DEQUANT_MIN_ROWS": "rows from which CUDA expands quantized weights for a product (0: never)",
    "RWKV_MLX_CUDA_EXPAND_DTYPE": "the dtype of those expanded weights: float16 (tensor cores) or float32 (exact)",
    "RWKV_MLX_SEPARATE_PROLOGUE": "1: a decode launch's LayerNorm and lerps run once, in a launch of their own; 0: in every group",
    "RWKV_MLX_GPU_BLOCKS": "GGUF blocks on a GPU: stored (read as stored by the kernels) or affine",
    "RWKV_MLX_MATVEC_ACCUMULATORS": "the most accumulators a matvec lane keeps (rows per warp x activation rows)",
    "RWKV_MLX_MMA_MIN_ROWS": "activation rows from which a decode launch multiplies on the matrix units (float16 operands); 0: never",
    "RWKV_MLX_MMA_MIN_GROUPS": "groups a matrix-unit launch should keep (by its groups' weight rows and parts of K) where RWKV_MLX_MMA_WAVE is 0",
    "RWKV_MLX_MMA_K_PARTS": "the most parts a matrix-unit launch splits its rows' K into, added afterwards (1: none; 16 under RWKV_MLX_MMA_WAVE, else 4)",
    "RWKV_MLX_MMA_WAVE": "groups one wave of a matrix-unit launch holds (SMs x groups resident an SM; 528 on CUDA, 0 on Metal): a launch takes the parts of K (any count) and weight rows a group that fill one wave most; 0: parts by powers of two up to RWKV_MLX_MMA_MIN_GROUPS",
    "RWKV_MLX_MMA_DECODES": "weight groups a thread of a matrix-unit launch decodes at once (their loads in flight together)",
    "RWKV_MLX_MMA_PREFETCH": "1: a matrix-unit launch of affine weights loads the next tile's weights while this one multiplies (0 by default)",
    "RWKV_MLX_MMA_ROWS_AHEAD": "1: a matrix-unit launch of float16 rows loads the next tile's rows while this one multiplies (no gain on an H100; 0 by default)",
    "RWKV_MLX_KEY_PARTS_FROM_ROWS": "the fewest decoded rows from which the FFN key's matrix-unit launch splits K into parts (their sum, before its relu², a launch of its own; 32 by default)",
    "RWKV_MLX_PARTS_IN_PROLOGUE": "1 (default): W_o's and the FFN value's parts of K are added in the LayerNorm launch after them, not a launch of their own; 0: apart",
    "RWKV_MLX_COMPILED_PROMPT": "1: each block of a full prompt chunk runs as one compiled graph; 0: op by op (default: 1 on GPUs, 0 on the CPU)",
    "RWKV_MLX_DECODE_AHEAD": "decode steps queued ahead of the token the host reads (1; 2 or more for the host's jitter: no gain in step 21's one process); constrained rows 1",
}


def in_effect() -> dict[str, str]:
    """The settings this process's environment sets, by name: what a recorded figure was measured under."""
    return {name: os.environ[name] for name in SETTINGS if os.environ.get(name, "").strip()}


def _raw(name: str) -> str | None:
    if name not in SETTINGS:
        raise KeyError(f"{name} is not in settings.SETTINGS")
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def env_int(name: str, default: int, minimum: int = 0, *, override: int | None = None) -> int:
    """$name as an integer >= minimum, else ``default``; ``override`` (a module constant that scripts and tests
    set, None when unset) comes first."""
    if override is not None:
        return override
    value = _raw(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise InvalidArgumentError(f"${name}={value!r}: expected an integer >= {minimum} ({SETTINGS[name]})")
    return number


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _raw(name)
    if value is None:
        return default
    if value not in choices:
        raise InvalidArgumentError(f"${name}={value!r}: expected one of {', '.join(choices)} ({SETTINGS[name]})")
    return value
