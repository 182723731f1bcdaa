"""The HTTP side: routes, API key, body and prompt limits, JSON and SSE responses (Starlette).

Handlers never touch MLX: they parse and tokenize the request, hand a
:class:`~.engine.Job` to the engine and relay its events. Every failure is an
OpenAI-style JSON error with a 4xx/5xx status; a traceback goes to the log,
never to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Event, Job, find_state
from .errors import APIError, bad_request, no_state, no_states_dir, state_exists
from .protocol import (FINISH, ReasoningSplitter, Spec, chat_logprobs, completion_logprobs, envelope, parse_chat,
                       parse_completion, split_reasoning, usage)

log = logging.getLogger("rwkv_mlx.serve")

DISCONNECT_POLL_S = 0.2  # how often a waiting handler checks that its client is still there
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this, so the client sees the 413


@dataclass
class ServeConfig:
    """What ``rwkv-mlx serve`` can be told; the defaults are the command's."""

    model: Path  # a GGUF file or converted directory (the CLI resolves the bundled demo model)
    model_name: str | None = None  # what clients put in "model"; default: the file's stem
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int = 32768
    max_tokens: int = 4096  # the most a request may generate (larger requests are clamped)
    request_timeout: float | None = 600.0
    prefill_chunk: int = 512
    warmup: bool = True  # a decode step at every batch size before serving (the GPU compiles each once)
    cache_dir: Path | None = None
    cache_bytes: int = 1 << 30
    cache_disk_bytes: int | None = 16 << 30
    states_dir: Path | None = None  # default: CACHE_DIR/states
    think: str = "off"
    device: str = "auto"
    scale_dtype: str = "float32"

    def __post_init__(self):
        for name in ("model", "cache_dir", "states_dir"):  # str or PathLike, as the caller likes
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))

    @property
    def states_directory(self) -> Path | None:
        if self.states_dir is not None:
            return self.states_dir
        return self.cache_dir / "states" if self.cache_dir is not None else None


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(config: ServeConfig, engine: Engine, model_name: str) -> Starlette:
    metrics = engine.metrics
    tokenizer = engine.tokenizer
    # OpenAI's model object; "created" is when this server began serving it
    model_object = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "rwkv-mlx"}

    def count(endpoint: str, status: int) -> None:
        metrics.inc("requests_total", help="HTTP requests by endpoint and status", endpoint=endpoint, status=status)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        size, chunks, too_big = 0, [], False
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > DRAIN_LIMIT:
            raise APIError(413, f"request body of {int(declared)} bytes; the limit is {config.max_body_bytes}",
                           code="body_too_large")
        async for chunk in request.stream():
            size += len(chunk)
            too_big = too_big or size > config.max_body_bytes
            if not too_big:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT:
                break
        if too_big:
            raise APIError(413, f"request body over the {config.max_body_bytes}-byte limit", code="body_too_large")
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise bad_request("the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    def parse(kind: str, body: dict) -> Spec:
        limits = dict(model_name=model_name, max_tokens_cap=config.max_tokens, max_prompt_tokens=config.max_prompt_tokens)
        spec = (parse_chat(body, tokenizer, default_think=config.think, **limits) if kind == "chat"
                else parse_completion(body, tokenizer, **limits))
        states = config.states_directory
        if spec.initial_state is not None and find_state(states, spec.initial_state) is None:
            raise no_state(spec.initial_state)
        if spec.save_state is not None:
            if states is None:
                raise no_states_dir()
            if find_state(states, spec.save_state) is not None:
                raise state_exists(spec.save_state)
        return spec

    async def generate(request: Request, kind: str) -> Response:
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            check_key(request)
            spec = await asyncio.to_thread(parse, kind, await read_json(request))  # a long prompt's tokenizing
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Event] = asyncio.Queue()

            def deliver(event: Event) -> None:  # called on the engine thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    job.cancel()

            job = Job(spec, deliver, config.request_timeout)
            engine.submit(job)
        except APIError as e:
            count(endpoint, e.status)
            return _error(e)
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        relay = _Relay(spec, request_id, model_name)
        if spec.stream:
            count(endpoint, 200)
            return StreamingResponse(stream(request, job, events, relay), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for event in wait_events(request, job, events):
                relay.add(event)
        except APIError as e:
            count(endpoint, e.status)
            return _error(e)
        if relay.done is None:  # the client went away; nobody reads this
            count(endpoint, 499)
            return Response(status_code=499)
        count(endpoint, 200)
        return JSONResponse(relay.whole())

    async def wait_events(request: Request, job: Job, events: asyncio.Queue):
        """The job's events until it ends; cancels it when the client disconnects; raises its error."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # also while tokens flow
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if event.kind == "error":
                    raise event.error
                yield event
                if event.kind == "done":
                    return
        finally:
            job.cancel()  # a no-op for a finished job; frees the slot of an abandoned one

    async def stream(request: Request, job: Job, events: asyncio.Queue, relay: "_Relay"):
        try:
            yield _sse(relay.opening())
            async for event in wait_events(request, job, events):
                for chunk in relay.chunks(event):
                    yield _sse(chunk)
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def models(request: Request) -> Response:
        """GET /v1/models lists the one model; GET /v1/models/ID retrieves it (the client's models.retrieve)."""
        asked = request.path_params.get("model_id")
        try:
            check_key(request)
            if asked is not None and asked != model_name:
                raise APIError(404, f"model {asked!r} is not served here; this server serves {model_name!r}",
                               param="model", code="model_not_found")
        except APIError as e:
            count("models", e.status)
            return _error(e)
        count("models", 200)
        return JSONResponse(model_object if asked is not None else {"object": "list", "data": [model_object]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "active_rows": engine.active_rows,
                             "queue_depth": int(metrics.gauge("queue_depth"))})

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                               code="not_found" if exc.status_code == 404 else None))

    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, "internal server error; the server logged the details", type="server_error"))

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Relay:
    """Turns engine events into OpenAI chunks (streaming) or one response body."""

    def __init__(self, spec: Spec, request_id: str, model_name: str):
        self.spec, self.id, self.model_name = spec, request_id, model_name
        self.created = int(time.time())
        self.text: list[str] = []
        self.logprobs: list[dict] = []
        self.done: Event | None = None
        self.splitter = ReasoningSplitter(spec.think) if spec.kind == "chat" else None
        self.offset = 0

    def _envelope(self, chunk: bool) -> dict:
        return envelope(self.spec, self.id, self.model_name, self.created, chunk=chunk)

    def _usage(self) -> dict:
        d = self.done
        return usage(d.prompt_tokens, d.completion_tokens, d.cached_tokens)

    def add(self, event: Event) -> None:
        if event.kind == "piece":
            self.text.append(event.text)
            self.logprobs += event.logprobs
        elif event.kind == "done":
            self.done = event

    # -- one body ----------------------------------------------------------------------------------

    def whole(self) -> dict:
        text = "".join(self.text)
        finish = FINISH[self.done.finish_reason]
        if self.spec.kind == "chat":
            reasoning, content = split_reasoning(text, self.spec.think)
            message = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "finish_reason": finish,
                      "logprobs": chat_logprobs(self.logprobs) if self.spec.logprobs else None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": completion_logprobs(self.logprobs) if self.spec.logprobs else None}
        return {**self._envelope(False), "choices": [choice], "usage": self._usage()}

    # -- chunks -----------------------------------------------------------------------------------------

    def _chunk(self, delta_or_text, finish: str | None = None, logprobs: list[dict] | None = None) -> dict:
        if self.spec.kind == "chat":
            choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish,
                      "logprobs": chat_logprobs(logprobs) if logprobs else None}
        else:
            choice = {"index": 0, "text": delta_or_text, "finish_reason": finish,
                      "logprobs": completion_logprobs(logprobs, self.offset) if logprobs else None}
        return {**self._envelope(True), "choices": [choice]}

    def opening(self) -> dict:
        if self.spec.kind == "chat":
            return self._chunk({"role": "assistant", "content": ""})
        return self._chunk("")

    def chunks(self, event: Event) -> list[dict]:
        self.add(event)
        if event.kind == "piece":
            if self.spec.kind != "chat":
                out = [self._chunk(event.text, logprobs=event.logprobs)]
                self.offset += len(event.text)
                return out
            reasoning, content = self.splitter.feed(event.text)
            return self._deltas(reasoning, content, event.logprobs)
        out = []
        if self.splitter is not None:
            reasoning, content = self.splitter.flush()
            out = self._deltas(reasoning, content, [])
        finish = FINISH[event.finish_reason]
        out.append(self._chunk({} if self.spec.kind == "chat" else "", finish))
        if self.spec.include_usage:
            out.append({**self._envelope(True), "choices": [], "usage": self._usage()})
        return out

    def _deltas(self, reasoning: str, content: str, logprobs: list[dict]) -> list[dict]:
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        return [self._chunk(delta, logprobs=logprobs)] if delta or logprobs else []
