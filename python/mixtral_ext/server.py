"""An OpenAI-compatible HTTP server over one engine (`python -m mixtral_ext serve`), on FastAPI and
uvicorn with Prometheus metrics (the `server` extra).

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not),
GET /v1/models, POST /tokenize and /detokenize (vLLM's bodies), GET /health (503 while the model
loads), GET /metrics, and GET / (chat_page.html, a chat in the browser). Requests wait in a
first-in-first-out queue in front of the one stream (429 past max_queue); a client that goes away
stops its generation within a decode step and its KV pages return to the pool. Errors are OpenAI's
{"error": {message, type, param, code}} bodies. With an API key every endpoint but /health and the
page (which holds no data and asks for the key) needs it; requests from a browser page of another
origin are refused unless allowed_origins names it; bodies are size-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import Engine
from .errors import (ChatFormatError, ContextOverflowError, EngineClosedError, KvCacheFullError, MixtralError,
                     SettingError, TokenError)
from .generation import Delta

# The body fields each endpoint passes to the engine under the engine's name (OpenAI's, and vLLM's extras).
_SAMPLING_FIELDS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "top_k",
                    "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_queue: int = 64
    max_body_bytes: int = 4 << 20


class ApiError(Exception):
    """An error answered as OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _engine_error(e: MixtralError) -> ApiError:
    """The HTTP answer to an engine error raised by a request's content or the engine's state."""
    if isinstance(e, (SettingError, ContextOverflowError, TokenError, ChatFormatError)):
        return ApiError(400, str(e))
    if isinstance(e, (KvCacheFullError, EngineClosedError)):
        return ApiError(503, str(e), "server_error", headers={"Retry-After": "1"})
    return ApiError(500, str(e), "server_error")


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("mixtral_ext_requests_running", "Generations running", registry=r)
        self.waiting = Gauge("mixtral_ext_requests_waiting", "Requests waiting in the queue", registry=r)
        self.prompt_tokens = Counter("mixtral_ext_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generation_tokens = Counter("mixtral_ext_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("mixtral_ext_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=r)
        self.itl = Histogram("mixtral_ext_inter_token_latency_seconds", "Time between tokens", buckets=buckets,
                             registry=r)
        self.queue_time = Histogram("mixtral_ext_queue_time_seconds", "Time waiting for the stream",
                                    buckets=buckets, registry=r)
        self.kv_usage = Gauge("mixtral_ext_kv_cache_usage_ratio", "Fraction of the KV cache pages in use",
                              registry=r)


class _Queue:
    """The one stream, taken in arrival order (asyncio.Lock wakes its waiters first in, first out)."""

    def __init__(self, max_waiting: int, metrics: _Metrics) -> None:
        self._lock = asyncio.Lock()
        self.waiting = 0
        self._max_waiting, self._metrics = max_waiting, metrics

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self._lock.locked() and self.waiting >= self._max_waiting:
            raise ApiError(429, f"the server is busy: {self.waiting} requests are waiting", "rate_limit_error",
                           headers={"Retry-After": "1"})
        start = time.perf_counter()
        self.waiting += 1
        self._metrics.waiting.inc()
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
            self._metrics.waiting.dec()
        self._metrics.queue_time.observe(time.perf_counter() - start)
        self._metrics.running.inc()
        try:
            yield
        finally:
            self._metrics.running.dec()
            self._lock.release()


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends (the client gone included), so that the
    generation stops and the stream is given back at once, not when the generator is collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class _Server:
    def __init__(self, settings: ServerSettings, load_engine: Callable[[], Engine]) -> None:
        self.settings = settings
        self.metrics = _Metrics()
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self._load_engine = load_engine
        self.queue: _Queue | None = None

    def load(self) -> None:
        try:
            self.engine = self._load_engine()
        except Exception as e:  # reported by /health and every request
            self.load_error = f"the model failed to load: {e}"

    # ---- request checks -----------------------------------------------------------

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, self.load_error or "the model is loading", "server_error",
                           headers={"Retry-After": "5"})
        return self.engine

    def check_key(self, request: Request) -> None:
        if self.settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.settings.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key>", "authentication_error",
                           code="invalid_api_key")

    def check_origin(self, request: Request) -> None:
        """A browser names the page's origin; only the server's own and the allowed ones may call it."""
        origin = request.headers.get("origin")
        if origin is None or origin in self.settings.allowed_origins:
            return
        own = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
        if origin not in own:
            raise ApiError(403, f"cross-origin requests from {origin} are not allowed (see --allowed-origins)",
                           "permission_error")

    async def read_json(self, request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError(400, "the body must be JSON, with Content-Type: application/json")
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the body is larger than {limit} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.settings.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(self, body: dict, engine: Engine) -> dict[str, Any]:
        """The engine's sampling settings from an OpenAI/vLLM request body."""
        n = body.get("n")
        if n not in (None, 1):
            raise ApiError(400, f"n must be 1: this server makes one completion per request, got {n!r}", param="n")
        settings = {name: body[name] for name in _SAMPLING_FIELDS if body.get(name) is not None}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= engine.max_context:
                raise ApiError(400, f"max_tokens must be an integer in [1, {engine.max_context}] (the context), "
                                    f"got {max_tokens!r}", param="max_tokens")
        settings["max_tokens"] = max_tokens  # None: to the end of the context
        return settings

    # ---- generation ---------------------------------------------------------------------

    async def deltas(self, make: Callable[[], AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
        """The generation's deltas, in the queue's turn, with metrics (time to first token counted from
        now, the queue included); closing it stops the generation."""
        arrived = time.perf_counter()
        async with self.queue.turn():
            stream, last = make(), None
            try:
                async for delta in stream:
                    now = time.perf_counter()
                    (self.metrics.ttft if last is None else self.metrics.itl).observe(now - (last or arrived))
                    last = now
                    self.metrics.generation_tokens.inc()
                    if delta.usage is not None:
                        self.metrics.prompt_tokens.inc(delta.usage.prompt_tokens)
                    yield delta
            finally:
                await stream.aclose()

    async def collect(self, request: Request, deltas: AsyncIterator[Delta]) -> list[Delta]:
        """All deltas of a non-streamed answer; the generation stops if the client goes away meanwhile."""
        task = asyncio.ensure_future(_drain(deltas))
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.05)
            if not done and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ApiError(499, "the client closed the request")
        return task.result()

    async def first_then_rest(self, deltas: AsyncIterator[Delta]) -> tuple[Delta | None, AsyncIterator[Delta]]:
        """The first delta (so that a bad request is answered with its status before a stream begins)."""
        try:
            first = await deltas.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await deltas.aclose()
            raise
        return first, deltas


async def _drain(deltas: AsyncIterator[Delta]) -> list[Delta]:
    return [delta async for delta in deltas]


def _usage(delta: Delta | None) -> dict:
    usage = delta.usage if delta is not None and delta.usage is not None else None
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _token_logprobs(engine: Engine, delta: Delta) -> dict:
    """One token of OpenAI's choices[].logprobs.content."""
    def entry(token_id: int, logprob: float) -> dict:
        text = engine.tokenizer.decode([token_id]) if engine.tokenizer_or_none() else str(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    item = entry(delta.token_id, delta.logprob)
    item["top_logprobs"] = [entry(t, lp) for t, lp in (delta.top_logprobs or {}).items()]
    return item


def create_app(settings: ServerSettings, load_engine: Callable[[], Engine]) -> FastAPI:
    """The server's app; load_engine runs on a thread at startup (/health answers 503 until it is done)."""
    server = _Server(settings, load_engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.queue = _Queue(settings.max_queue, server.metrics)
        threading.Thread(target=server.load, name="mixtral_ext-load", daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.close()

    app = FastAPI(title="mixtral_ext", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            server.check_origin(request)
            if request.url.path not in ("/health", "/"):  # the page holds no data; it asks for the key
                server.check_key(request)
        except ApiError as e:
            return e.response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(404)
    async def not_found(request: Request, e) -> JSONResponse:
        return ApiError(404, f"no such path: {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def not_allowed(request: Request, e) -> JSONResponse:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    @app.get("/")
    async def chat_page() -> Response:
        page = importlib.resources.files(__package__).joinpath("chat_page.html").read_text(encoding="utf-8")
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'"})

    @app.get("/health")
    async def health() -> Response:
        if server.engine is None:
            return ApiError(503, server.load_error or "the model is loading", "server_error").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if server.engine is not None and not server.engine.closed:
            info = server.engine.kv_cache_info()
            server.metrics.kv_usage.set(1 - info["free_pages"] / info["num_pages"])
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        engine = server.ready_engine()
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "mixtral_ext", "max_model_len": engine.max_context}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        engine, body = server.ready_engine(), await server.read_json(request)
        server.check_model(body)
        try:
            if "messages" in body:
                tokens = engine.chat_prompt(body["messages"], body.get("tools"))
            elif isinstance(body.get("prompt"), str):
                tokens = engine.tokenizer.encode(body["prompt"], bos=body.get("add_special_tokens", True))
            else:
                raise ApiError(400, "give a prompt (a string) or messages", param="prompt")
        except MixtralError as e:
            raise _engine_error(e) from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        engine, body = server.ready_engine(), await server.read_json(request)
        server.check_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "tokens must be a list of token ids", param="tokens")
        try:
            return {"prompt": engine.tokenizer.decode(engine.token_array(tokens).tolist())}
        except MixtralError as e:
            raise _engine_error(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        engine, body = server.ready_engine(), await server.read_json(request)
        server.check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        tool_choice = body.get("tool_choice", "auto")
        if tool_choice not in ("auto", "none"):
            raise ApiError(400, "tool_choice must be 'auto' or 'none'", param="tool_choice")
        tools = body.get("tools") if tool_choice == "auto" else None
        sampling = server.sampling(body, engine)
        if body.get("logprobs"):
            sampling["logprobs"] = body.get("top_logprobs") or 0
        stream_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = server.deltas(lambda: engine.achat_stream(messages, tools=tools, **sampling))
        try:
            first, deltas = await server.first_then_rest(deltas)
        except MixtralError as e:
            raise _engine_error(e) from None
        want_logprobs = bool(body.get("logprobs"))

        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": settings.model_name, "choices": [choice]}

        if body.get("stream"):
            async def events() -> AsyncIterator[str]:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                last = None
                async for delta in _prepend(first, deltas):
                    last = delta
                    logprobs = {"content": [_token_logprobs(engine, delta)]} if want_logprobs else None
                    if delta.text or logprobs:
                        yield _sse(chunk({"content": delta.text}, logprobs=logprobs))
                    if delta.tool_calls:
                        calls = [dict(call.to_openai(), index=i) for i, call in enumerate(delta.tool_calls)]
                        yield _sse(chunk({"tool_calls": calls}))
                    if delta.finish_reason:
                        yield _sse(chunk({}, delta.finish_reason))
                if stream_usage:
                    yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                                "model": settings.model_name, "choices": [], "usage": _usage(last)})
                yield _sse("[DONE]")

            return _ClosingStreamingResponse(events(), media_type="text/event-stream")

        everything = await server.collect(request, _prepend(first, deltas))
        last = everything[-1] if everything else None
        calls = (last.tool_calls if last else None) or []
        message: dict[str, Any] = {"role": "assistant",
                                   "content": None if calls else "".join(d.text for d in everything)}
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        logprobs = {"content": [_token_logprobs(engine, d) for d in everything]} if want_logprobs else None
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created,
                             "model": settings.model_name,
                             "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                                          "finish_reason": last.finish_reason if last else "length"}],
                             "usage": _usage(last)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        engine, body = server.ready_engine(), await server.read_json(request)
        server.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if not (isinstance(prompt, str) and prompt) and not (
                isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt)):
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")
        sampling = server.sampling(body, engine)
        if body.get("logprobs") is not None:
            sampling["logprobs"] = body["logprobs"]
        stream_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = server.deltas(lambda: engine.astream(prompt, **sampling))
        try:
            first, deltas = await server.first_then_rest(deltas)
        except MixtralError as e:
            raise _engine_error(e) from None

        def choice(text: str, finish: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if body.get("stream"):
            async def events() -> AsyncIterator[str]:
                last = None
                async for delta in _prepend(first, deltas):
                    last = delta
                    yield _sse({"id": ident, "object": "text_completion", "created": created,
                                "model": settings.model_name, "choices": [choice(delta.text, delta.finish_reason)]})
                if stream_usage:
                    yield _sse({"id": ident, "object": "text_completion", "created": created,
                                "model": settings.model_name, "choices": [], "usage": _usage(last)})
                yield _sse("[DONE]")

            return _ClosingStreamingResponse(events(), media_type="text/event-stream")

        everything = await server.collect(request, _prepend(first, deltas))
        last = everything[-1] if everything else None
        result = choice("".join(d.text for d in everything), last.finish_reason if last else "length")
        if body.get("logprobs") is not None:
            tokenizer = engine.tokenizer_or_none()
            text = lambda t: tokenizer.decode([t]) if tokenizer else str(t)  # noqa: E731
            result["logprobs"] = {"tokens": [text(d.token_id) for d in everything],
                                  "token_logprobs": [d.logprob for d in everything],
                                  "top_logprobs": [{text(t): lp for t, lp in (d.top_logprobs or {}).items()}
                                                   for d in everything]}
        return JSONResponse({"id": ident, "object": "text_completion", "created": created,
                             "model": settings.model_name, "choices": [result], "usage": _usage(last)})

    return app


async def _prepend(first: Delta | None, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    try:
        if first is not None:
            yield first
            async for delta in rest:
                yield delta
    finally:
        await rest.aclose()
