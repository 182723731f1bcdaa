"""The RWKV-7 engine: storage-form layers wired into blocks, the WKV recurrence, state, weight conversion.

Nothing here reads or writes a file format: rwkv_mlx.loader hands it named arrays.
"""

from ..arch import ModelArgs
from .rwkv7 import Model

__all__ = ["Model", "ModelArgs"]
