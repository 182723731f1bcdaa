"""rwkv-mlx: RWKV-7 ("x070") world models on MLX.

    model, tokenizer = rwkv_mlx.load("rwkv7-g1b-2.9b-Q4_K_M.gguf")
    print(rwkv_mlx.generate(model, tokenizer, "User: hi\\n\\nAssistant:", max_tokens=64))
    system = rwkv_mlx.cache_prompt(model, tokenizer, "System: be brief.\\n\\n")  # read once (docs/api.md)
    print(rwkv_mlx.generate(model, tokenizer, "User: hi\\n\\nAssistant:", state=system, max_tokens=64))
"""

import os as _os
import time as _time

_IMPORT_STARTED = _time.perf_counter()  # the CLI's statistics count from here where /proc is missing

# MLX's CUDA backend runs float32 matmuls in TF32 (about 1e-3 relative error per product)
# unless told otherwise. rwkv-mlx promises float32 where it says float32; set
# MLX_ENABLE_TF32=1 yourself to trade that for speed.
_os.environ.setdefault("MLX_ENABLE_TF32", "0")

from .errors import InvalidArgumentError, ModelFileError, RwkvMlxError, UnsupportedModelError
from .text.chat import ChatSession
from .text.generate import (GenerationResponse, batch_generate, cache_prompt, generate, prefill, stream_batch_generate,
                       stream_generate)
from .loader import DEMO_MODEL, load
from .model import Model, ModelArgs
from .text.sample import Sampler, SamplingParams, make_logits_processors, make_sampler
from .model.state import ModelIdentity, State
from .text.tokenizer import Tokenizer
from .model.weights import LoadOptions
from .version import __version__  # noqa: F401 - rwkv_mlx.__version__

__all__ = [
    "load", "DEMO_MODEL", "generate", "stream_generate", "prefill", "GenerationResponse",
    "cache_prompt", "batch_generate", "stream_batch_generate", "ChatSession",
    "Model", "ModelArgs", "State", "ModelIdentity", "Tokenizer",
    "Sampler", "SamplingParams", "make_sampler", "make_logits_processors", "LoadOptions",
    "RwkvMlxError", "ModelFileError", "UnsupportedModelError", "InvalidArgumentError",
]
