"""``rwkv-mlx serve``: an OpenAI-compatible HTTP server around RWKV's constant-size state.

One module per idea:

* :mod:`.errors`     -- the OpenAI-style error a request gets (status, body);
* :mod:`.protocol`   -- request bodies in, validated :class:`~.protocol.Job` specs out, response bodies;
* :mod:`.constraints` -- the single place where ``response_format`` / ``grammar`` will plug in;
* :mod:`.state_cache` -- states checkpointed at message boundaries: a trie by token prefix, an LRU
  bounded by bytes, spilled to disk as fingerprinted safetensors;
* :mod:`.engine`     -- the one thread that owns MLX: continuous batching with batch-size buckets;
* :mod:`.metrics`    -- Prometheus text;
* :mod:`.batch_sampling` -- one step's sampling for all rows, each with its own parameters;
* :mod:`.app`        -- the HTTP routes (Starlette), auth, limits, SSE;
* :mod:`.server`     -- engine + app + uvicorn.

Only :mod:`.app` and :mod:`.server` need the ``[serve]`` extra (Starlette, uvicorn).
"""

__all__ = ["ServeConfig", "Server", "Engine"]


def __getattr__(name: str):  # the HTTP stack is imported only by those who use it
    if name == "ServeConfig":
        from .app import ServeConfig

        return ServeConfig
    if name == "Server":
        from .server import Server

        return Server
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
