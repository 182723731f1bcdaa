"""``rwkv-mlx serve``: an OpenAI-compatible HTTP server around RWKV's constant-size state.

One module per idea:

* :mod:`.errors`     -- the OpenAI-style error a request gets (status, body);
* :mod:`.protocol`   -- request bodies in, validated :class:`~.protocol.Job` specs out, response bodies;
* :mod:`.constraints` -- the single place where ``response_format`` / ``grammar`` will plug in;
* :mod:`.state_cache` -- states checkpointed at message boundaries: a trie by token prefix, an LRU
  bounded by bytes, spilled to disk as fingerprinted safetensors;
* :mod:`.engine`     -- the one thread that owns MLX: continuous batching with batch-size buckets;
* :mod:`.metrics`    -- Prometheus text;
* :mod:`.app`        -- the HTTP routes (Starlette), auth, limits, SSE.
"""

from .app import ServeConfig, create_app
from .engine import Engine

__all__ = ["ServeConfig", "create_app", "Engine"]
