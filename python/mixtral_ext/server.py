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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import Engine
from .errors import (ChatFormatError, ContextOverflowError, EngineClosedError, KvCacheFullError, MixtralError,
                     SettingError, TokenError)
from .chat import encode_chat
from .generation import Delta, SamplingSettings

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
    loopback_only: bool = False  # answer only requests whose Host is a loopback name (a server bound to one)


class ApiError(Exception):
    """An error answered as OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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
        if self.waiting >= self._max_waiting:
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


class _Pump:
    """Runs a generation on its own asyncio task and hands its deltas over, so that the task that sends
    them can be cancelled (Starlette cancels it when the client leaves, and anyio cancels it again at
    every await) while the generation is stopped once, by stop(), from a task nobody cancels."""

    _END = object()

    def __init__(self, deltas: AsyncIterator[Delta]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(deltas))

    async def _run(self, deltas: AsyncIterator[Delta]) -> None:
        try:
            async for delta in deltas:
                self._queue.put_nowait(delta)
        except Exception as e:  # handed to the reader
            self._queue.put_nowait(e)
        finally:
            await deltas.aclose()
            self._queue.put_nowait(self._END)

    async def deltas(self) -> AsyncIterator[Delta]:
        while (item := await self._queue.get()) is not self._END:
            if isinstance(item, Exception):
                raise item
            yield item

    async def stop(self) -> None:
        await _cancel(self._task)


class _ClosingStreamingResponse(StreamingResponse):
    """Stops the generation behind its body however the response ends (the client gone included, or
    before the body started), so that the stream is given back at once."""

    def __init__(self, body: AsyncIterator[str], pump: _Pump) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._pump = pump

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._pump.stop()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _event_stream(make_chunks: Callable[[AsyncIterator[Delta]], AsyncIterator[dict]],
                  generation: AsyncIterator[Delta]) -> _ClosingStreamingResponse:
    """The chunks that make_chunks makes of the generation's deltas, as server-sent events, then [DONE]."""
    pump = _Pump(generation)

    async def events() -> AsyncIterator[str]:
        chunks = make_chunks(pump.deltas())
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield _sse(chunk)
        except ApiError as e:  # after the status went out: the error as the stream's last event
            yield _sse(e.body())
        yield _sse("[DONE]")

    return _ClosingStreamingResponse(events(), pump)


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class _Guard:
    """Checks every HTTP request before it reaches the app: its Host (a loopback server answers only to
    loopback names, which stops DNS rebinding), the origin of a browser page, and the API key. A pure
    ASGI middleware, so that the endpoints still see a client that disconnects."""

    def __init__(self, app, server: "_Server") -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            try:
                self.server.check_host(request)
                self.server.check_origin(request)
                if request.url.path not in ("/health", "/"):  # the page holds no data; it asks for the key
                    self.server.check_key(request)
            except ApiError as e:
                return await e.response()(scope, receive, send)
        await self.app(scope, receive, send)


class _Server:
    def __init__(self, settings: ServerSettings, load_engine: Callable[[], Engine]) -> None:
        self.settings = settings
        self.metrics = _Metrics()
        self.engine: Engine | None = None
        self.tokenizer = None  # the engine's, read once (the engine's property takes its lock)
        self.load_error: str | None = None
        self._load_engine = load_engine
        self.queue = _Queue(settings.max_queue, self.metrics)

    def load(self) -> None:
        try:
            engine = self._load_engine()
            self.tokenizer = engine.tokenizer_or_none()
            self.engine = engine
        except Exception as e:  # reported by /health and every request
            self.load_error = f"the model failed to load: {e}"

    # ---- request checks -----------------------------------------------------------

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, self.load_error or "the model is loading", "server_error",
                           headers={"Retry-After": "5"})
        return self.engine

    def ready_tokenizer(self):
        self.ready_engine()
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids")
        return self.tokenizer

    def check_host(self, request: Request) -> None:
        if not self.settings.loopback_only:
            return
        host = request.headers.get("host", "")
        name = (host if host.endswith("]") else host.rsplit(":", 1)[0]).lower().rstrip(".")
        if name not in _LOOPBACK_HOSTS:
            raise ApiError(403, f"this server answers on loopback names only, not {host!r}", "permission_error")

    def check_key(self, request: Request) -> None:
        if self.settings.api_key is None or (request.method == "OPTIONS" and self.settings.allowed_origins):
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
        if origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
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
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the body is larger than {limit} bytes")
        except ClientDisconnect:
            raise ApiError(499, "the client closed the request") from None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, numbers past int's digits, nesting
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = data.get("model")
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.settings.model_name!r}",
                           param="model", code="model_not_found")
        return data

    def sampling(self, body: dict, engine: Engine, logprobs) -> dict[str, Any]:
        """The engine's sampling settings from an OpenAI/vLLM request body, checked."""
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
        if logprobs is not None:
            settings["logprobs"] = logprobs
        try:
            SamplingSettings.from_kwargs(**settings)  # checked before the request waits for its turn
        except MixtralError as e:
            raise _engine_error(e) from None
        return settings

    @staticmethod
    def include_usage(body: dict) -> bool:
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        return bool((options or {}).get("include_usage"))

    async def prompt_ids(self, engine: Engine, make_ids: Callable[[], list[int]]) -> list[int]:
        """The prompt's token ids, made on a thread, checked against the context."""
        try:
            ids = await asyncio.to_thread(make_ids)
        except MixtralError as e:
            raise _engine_error(e) from None
        if len(ids) + 1 > engine.max_context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context of {engine.max_context} leaves no room "
                                "to generate", code="context_length_exceeded")
        return ids

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
            except MixtralError as e:
                raise _engine_error(e) from None
            finally:
                await stream.aclose()

    async def start(self, request: Request, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """Waits for the turn and the first delta, so that a bad request is answered with its status before a
        stream begins; returns the generation (which yields that delta again first). A client that leaves
        meanwhile, in the queue or the prefill, gives up its place."""
        try:
            first = await _unless_disconnected(request, _first(deltas))
        except BaseException:
            await deltas.aclose()
            raise
        return _prepend(first, deltas)

    async def collect(self, request: Request, deltas: AsyncIterator[Delta]) -> list[Delta]:
        """All deltas of a non-streamed answer; the generation stops if the client goes away meanwhile."""
        async with contextlib.aclosing(deltas):
            return await _unless_disconnected(request, _drain(deltas))


async def _unless_disconnected(request: Request, work):
    """Awaits work, cancelling it (and answering 499) when the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.05)
            if not task.done() and await request.is_disconnected():
                await _cancel(task)
                raise ApiError(499, "the client closed the request")
        return task.result()
    except asyncio.CancelledError:  # this request itself was cancelled
        await _cancel(task)
        raise


async def _cancel(task: asyncio.Future) -> None:
    """Cancels the task and waits until it has ended, however often the waiting is cancelled."""
    task.cancel()
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task})


async def _first(deltas: AsyncIterator[Delta]) -> Delta | None:
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return None


async def _drain(deltas: AsyncIterator[Delta]) -> list[Delta]:
    return [delta async for delta in deltas]


async def _prepend(first: Delta | None, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    try:
        if first is not None:
            yield first
            async for delta in rest:
                yield delta
    finally:
        await rest.aclose()


def _usage(delta: Delta | None) -> dict:
    usage = delta.usage if delta is not None and delta.usage is not None else None
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def _chat_logprobs(tokenizer, deltas: list[Delta]) -> dict:
    """OpenAI's choices[].logprobs of a chat completion: content, one entry per token."""
    def entry(token_id: int, logprob: float) -> dict:
        text = _piece(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(entry(d.token_id, d.logprob),
                             top_logprobs=[entry(t, lp) for t, lp in (d.top_logprobs or {}).items()]) for d in deltas]}


def _completion_logprobs(tokenizer, deltas: list[Delta]) -> dict:
    """OpenAI's choices[].logprobs of a (legacy) completion: tokens, their logprobs, the top ones."""
    return {"tokens": [_piece(tokenizer, d.token_id) for d in deltas],
            "token_logprobs": [d.logprob for d in deltas],
            "top_logprobs": [{_piece(tokenizer, t): lp for t, lp in (d.top_logprobs or {}).items()} for d in deltas]}


def create_app(settings: ServerSettings, load_engine: Callable[[], Engine]) -> FastAPI:
    """The server's app; load_engine runs on a thread at startup (/health answers 503 until it is done)."""
    server = _Server(settings, load_engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=server.load, name="mixtral_ext-load", daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.close()

    app = FastAPI(title="mixtral_ext", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Guard, server=server)
    if settings.allowed_origins:  # outermost: it answers the browsers' preflights
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(404)
    async def not_found(request: Request, e) -> JSONResponse:
        return ApiError(404, f"no such path: {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def not_allowed(request: Request, e) -> JSONResponse:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

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
            info = await asyncio.to_thread(server.engine.kv_cache_info)  # the engine's lock, off the event loop
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
        tokenizer = server.ready_tokenizer()
        if "messages" in body:
            messages, tools = body["messages"], body.get("tools")
            make = lambda: encode_chat(tokenizer, messages, tools)  # noqa: E731
        elif isinstance(body.get("prompt"), str):
            prompt, bos = body["prompt"], body.get("add_special_tokens", True) is not False
            make = lambda: tokenizer.encode(prompt, bos=bos)  # noqa: E731
        else:
            raise ApiError(400, "give a prompt (a string) or messages", param="prompt")
        try:
            tokens = await asyncio.to_thread(make)
        except MixtralError as e:
            raise _engine_error(e) from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        engine, body = server.ready_engine(), await server.read_json(request)
        tokenizer = server.ready_tokenizer()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "tokens must be a list of token ids", param="tokens")
        try:
            ids = engine.token_array(tokens).tolist()
        except MixtralError as e:
            raise _engine_error(e) from None
        return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        engine, body = server.ready_engine(), await server.read_json(request)
        tokenizer = server.ready_tokenizer()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        tool_choice = body.get("tool_choice", "auto")
        if tool_choice not in ("auto", "none"):
            raise ApiError(400, "tool_choice must be 'auto' or 'none'", param="tool_choice")
        tools = body.get("tools") if tool_choice == "auto" else None
        want_logprobs = bool(body.get("logprobs"))
        sampling = server.sampling(body, engine, (body.get("top_logprobs") or 0) if want_logprobs else None)
        stream, include_usage = bool(body.get("stream")), server.include_usage(body)
        # Encoded here only to check it before it waits (a bad conversation, or one past the context, is a 400 at
        # once); the engine encodes it again on its worker, as chat_stream takes messages, not ids.
        await server.prompt_ids(engine, lambda: encode_chat(tokenizer, messages, tools))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = await server.start(
            request, server.deltas(lambda: engine.achat_stream(messages, tools=tools, **sampling)))

        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": settings.model_name, "choices": [choice]}

        if stream:
            async def chunks(deltas: AsyncIterator[Delta]) -> AsyncIterator[dict]:
                yield chunk({"role": "assistant", "content": ""})
                last = None
                async for delta in deltas:
                    last = delta
                    logprobs = _chat_logprobs(tokenizer, [delta]) if want_logprobs else None
                    if delta.text or logprobs:
                        yield chunk({"content": delta.text}, logprobs=logprobs)
                    if delta.tool_calls:
                        yield chunk({"tool_calls": [dict(call.to_openai(), index=i)
                                                    for i, call in enumerate(delta.tool_calls)]})
                    if delta.finish_reason:
                        yield chunk({}, delta.finish_reason)
                if include_usage:
                    yield dict(chunk({}), choices=[], usage=_usage(last))

            return _event_stream(chunks, deltas)

        everything = await server.collect(request, deltas)
        last = everything[-1] if everything else None
        calls = (last.tool_calls if last else None) or []
        message: dict[str, Any] = {"role": "assistant",
                                   "content": None if calls else "".join(d.text for d in everything)}
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created,
                             "model": settings.model_name,
                             "choices": [{"index": 0, "message": message,
                                          "logprobs": _chat_logprobs(tokenizer, everything) if want_logprobs else None,
                                          "finish_reason": last.finish_reason if last else "length"}],
                             "usage": _usage(last)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        engine, body = server.ready_engine(), await server.read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            tokenizer = server.ready_tokenizer()
            make = lambda: tokenizer.encode(prompt, bos=True)  # noqa: E731
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            tokenizer = server.tokenizer
            make = lambda: engine.token_array(prompt).tolist()  # noqa: E731
        else:
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")
        logprobs = body.get("logprobs")
        sampling = server.sampling(body, engine, logprobs)
        stream, include_usage = bool(body.get("stream")), server.include_usage(body)
        ids = await server.prompt_ids(engine, make)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = await server.start(request, server.deltas(lambda: engine.astream(ids, **sampling)))

        def completion(text: str, finish: str | None, some: list[Delta]) -> dict:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": _completion_logprobs(tokenizer, some) if logprobs is not None else None}
            return {"id": ident, "object": "text_completion", "created": created, "model": settings.model_name,
                    "choices": [choice]}

        if stream:
            async def chunks(deltas: AsyncIterator[Delta]) -> AsyncIterator[dict]:
                last = None
                async for delta in deltas:
                    last = delta
                    yield completion(delta.text, delta.finish_reason, [delta])
                if include_usage:
                    yield dict(completion("", None, []), choices=[], usage=_usage(last))

            return _event_stream(chunks, deltas)

        everything = await server.collect(request, deltas)
        last = everything[-1] if everything else None
        return JSONResponse(dict(completion("".join(d.text for d in everything), last.finish_reason if last else "length",
                                            everything), usage=_usage(last)))

    return app
