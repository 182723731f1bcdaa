"""rwkv-mlx: RWKV-7 ("x070") world models on MLX.

    model, tokenizer = rwkv_mlx.load("rwkv7-g1b-2.9b-Q4_K_M.gguf")
    print(rwkv_mlx.generate(model, tokenizer, "User: hi\\n\\nAssistant:", max_tokens=64))
"""

from .errors import InvalidArgumentError, ModelFileError, RwkvMlxError, UnsupportedModelError
from .generate import GenerationResponse, generate, prefill, stream_generate
from .loader import load
from .model import Model, ModelArgs
from .sample import Sampler, SamplingParams
from .state import State
from .tokenizer import Tokenizer
from .weights import LoadOptions

__version__ = "0.1.0"

__all__ = [
    "load", "generate", "stream_generate", "prefill", "GenerationResponse",
    "Model", "ModelArgs", "State", "Tokenizer", "Sampler", "SamplingParams", "LoadOptions",
    "RwkvMlxError", "ModelFileError", "UnsupportedModelError", "InvalidArgumentError",
]
