"""``rwkv-mlx serve``: the OpenAI-compatible HTTP server (rwkv_mlx.serve)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from . import app
from ..errors import InvalidArgumentError, ModelFileError
from .common import DEVICE_OPTION, MODEL_OPTION, SCALE_DTYPE_OPTION, ThinkOption, resolve_model


# "\\[": typer renders help as rich markup, where a bare "[serve]" is a style and vanishes
@app.command(help="Serve the model over the OpenAI HTTP API (POST /v1/chat/completions, /v1/completions; GET "
                  "/v1/models, /health, /metrics). Conversation states are cached by token prefix, in memory and, "
                  "with --cache-dir, on disk across restarts. Needs the \\[serve] extra.")
def serve(
    model: Optional[Path] = MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port (0: any free port; the chosen one is printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RWKV_MLX_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients send (default: the file name without .gguf)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Keep checkpointed states here (safetensors), across restarts."),
    cache_mb: int = typer.Option(1024, "--cache-mb", min=0, help="Memory for cached states, in MiB."),
    cache_disk_mb: int = typer.Option(16384, "--cache-disk-mb", min=0, help="Disk for cached states in --cache-dir, in MiB."),
    states_dir: Optional[Path] = typer.Option(None, "--states-dir", help="Named states for initial_state / save_state (default: CACHE_DIR/states)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most requests generating at once (one decode batch)."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Most requests waiting for a slot; more get 429."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Most tokens one request may generate (larger asks are clamped)."),
    max_prompt_tokens: int = typer.Option(32768, "--max-prompt-tokens", min=1, help="Longest prompt accepted, in tokens."),
    max_body_kb: int = typer.Option(4096, "--max-body-kb", min=1, help="Largest request body, in KiB."),
    timeout: float = typer.Option(600.0, "--timeout", min=0.0, help="Seconds a request may take from arrival to its last token (0: no limit)."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", min=1, help="Prompt tokens read between two decode steps."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Before serving, run a decode step at every batch size up to --max-batch (a GPU compiles its kernels once per size; met mid-stream, a compile stalls every client)."),
    think: ThinkOption = typer.Option(ThinkOption.off, "--think", help="Default chat think mode (a request may set 'think')."),
    device: str = DEVICE_OPTION,
    scale_dtype: str = SCALE_DTYPE_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log the server's warnings and errors in detail."),
) -> None:
    try:
        from ..serve.app import ServeConfig
        from ..serve.server import Server
    except ImportError as e:
        raise InvalidArgumentError(f"rwkv-mlx serve needs the serve extra: pip install 'rwkv-mlx[serve]' ({e})") from None
    if model is not None and not model.exists():
        raise ModelFileError(model, "no such file or directory")
    model = resolve_model(model)  # the bundled demo model when none is named
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="rwkv-mlx serve: %(message)s")
    config = ServeConfig(
        model=model, model_name=model_name, host=host, port=port, api_key=api_key, max_batch=max_batch,
        max_queue=max_queue, max_body_bytes=max_body_kb << 10, max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens, request_timeout=timeout or None, prefill_chunk=prefill_chunk, cache_dir=cache_dir,
        cache_bytes=cache_mb << 20, cache_disk_bytes=cache_disk_mb << 20, states_dir=states_dir, think=think.value,
        device=device, scale_dtype=scale_dtype, warmup=warmup)
    if warmup:
        print(f"rwkv-mlx serve: loading {model.name} and compiling its decode step for up to {max_batch} rows...",
              file=sys.stderr, flush=True)
    server = Server(config).start()
    print(f"rwkv-mlx serve: {server.model_name} on {server.url} (OpenAI API at {server.url}/v1)", file=sys.stderr,
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
