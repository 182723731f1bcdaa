"""Putting it together: the engine (which loads the model on its own thread), the app, and uvicorn."""

from __future__ import annotations

import logging
import socket
import threading
import time

from .app import ServeConfig, create_app
from .engine import Engine

log = logging.getLogger("rwkv_mlx.serve")


def _loader(config: ServeConfig):
    def load():
        from ..loader import load
        from ..model.weights import LoadOptions

        model, tokenizer = load(config.model, LoadOptions.for_backend(scale_dtype=config.scale_dtype))
        return model, tokenizer

    return load


def _setup(config: ServeConfig):
    def setup():
        from ..backend import select_device

        select_device(config.device)  # the default device belongs to the thread that sets it

    return setup


def _listen(host: str, port: int) -> socket.socket:
    """The bound socket uvicorn will serve on. Bound here, before the model loads, so that a refusal
    fails at once and names its reason (uvicorn logs it and ends its thread)."""
    def refused(e: OSError) -> OSError:
        return OSError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}")

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise refused(e) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise refused(e) from None
    return sock


class Server:
    """``Server(config).start()`` serves in a background thread; ``url`` says where (port 0 picks one)."""

    def __init__(self, config: ServeConfig, engine: Engine | None = None):
        import uvicorn

        self.config = config
        self.engine = engine or Engine(
            _loader(config), setup=_setup(config), max_batch=config.max_batch, max_queue=config.max_queue,
            prefill_chunk=config.prefill_chunk, cache_bytes=config.cache_bytes, cache_dir=config.cache_dir,
            cache_disk_bytes=config.cache_disk_bytes, states_dir=config.states_directory, warmup=config.warmup)
        self._uvicorn = uvicorn
        self._server = None
        self._thread = None

    @property
    def model_name(self) -> str:
        return self.config.model_name or self.config.model.name.removesuffix(".gguf")

    def start(self, timeout: float = 60.0) -> "Server":
        sock = _listen(self.config.host, self.config.port)
        try:
            self.engine.start()  # loads the model: a bad file raises here
        except BaseException:
            sock.close()
            raise
        app = create_app(self.config, self.engine, self.model_name)
        uv_config = self._uvicorn.Config(app, host=self.config.host, port=self.config.port, log_level="warning",
                                         lifespan="off", timeout_graceful_shutdown=2)
        self._server = self._uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="rwkv-serve-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.engine.stop()
                raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self.engine.stop()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
