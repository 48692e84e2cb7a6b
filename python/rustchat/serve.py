"""`rustchat serve`: the web chat (web/index.html), its streaming endpoint, and the OpenAI chat API.

- GET /v1/models, POST /v1/chat/completions: OpenAI's request and response shapes (streamed as
  `chat.completion.chunk` events ending in `data: [DONE]`), errors as
  {"error": {"message", "type", "param", "code"}}. A calculator call shows in the content as
  `[calculator: 2+3 -> 5]`. `logprobs`/`top_logprobs` report each token's log-probability.
- POST /chat/completions (the page's): `data: {"token": "..."}` per piece of text (a calculator
  call comes as `{"token": "[calculator: 2+3 -> 5]", "tool": true}`), then `data: {"done": true}`.
- GET /health: the loaded model, and how many requests run and wait.

The pieces, one job each: requests are checked by rustchat.serve_request (4xx naming the
problem), generated on one scheduler thread with continuous batching (rustchat.batching) and
handed to the event loop by rustchat.serve_bridge, so no request holds a worker thread while
it waits; rustchat.serve_guard refuses (403) a `Host` other than the bound address or
localhost (DNS rebinding) and an `Origin` of another site unless --allow-origin names it (the
server has no authentication and listens on 127.0.0.1 unless --host says otherwise);
rustchat.serve_connections closes idle and slow connections and caps how many are open. This
module holds the routes: module-level handlers over one AppState. Any failure inside a request
is answered as JSON in OpenAI's error shape, never as a plain-text 500.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request)
# at runtime
import asyncio
import json
import sys
import time
import traceback
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from .batching import BatchScheduler
from .checkpoint import load_model
from .common import MAX_ROWS, MAX_SERVE_QUEUE, OutOfRangeError, RustchatError, check_count
from .config import DEFAULT_TEMPERATURE, MAX_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_K_RANGE, ServeConfig
from .engine import Engine
from .serve_bridge import Mailbox, Reply
from .serve_connections import (
    KEEP_ALIVE_S,
    MAX_REQUEST_TIMEOUT_S,
    connection_cap,
    protocol_class,
    throttle_accept_errors,
)
from .serve_guard import LOOPBACK_HOSTS, HostOriginGuard
from .serve_request import (
    MAX_BODY_BYTES,
    RequestError,
    error_body,
    fit_prompt,
    parse_request,
)

WEB_DIR = Path(__file__).parent / "web"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class AppState:
    """What the handlers share: the engine and its scheduler, the request defaults, the model's
    description, and one Mailbox per event loop (uvicorn has one; a TestClient may start one per
    request)."""

    engine: Engine
    scheduler: BatchScheduler
    defaults: dict  # temperature, top_k, max_tokens for requests that give none
    info: dict  # /health's description of the model; info["id"] is the API's model id
    page: str
    mailboxes: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    @property
    def context(self) -> int:
        return int(self.engine.model.config.sequence_len)


def _state(request: Request) -> AppState:
    return request.app.state.rustchat


def openai_error(e: RequestError) -> JSONResponse:
    # OpenAI answers oversized content with 400 (its client: BadRequestError); only a body too
    # large to read stays 413
    status = 400 if e.status == 413 and e.code != "request_too_large" else e.status
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_body(e.message, kind, e.param, e.code), status_code=status)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _failure(e: Exception) -> str:
    """A generation failure as the client sees it (the traceback goes to the server's log)."""
    if isinstance(e, RustchatError):
        return str(e)
    traceback.print_exception(e)
    return f"generation failed: {type(e).__name__}"


# ----------------------------------------------------------------------------- error handlers
async def not_found(request: Request, exc):
    return openai_error(RequestError(404, f"no route {request.method} {request.url.path[:100]}", None, "not_found"))


async def bad_method(request: Request, exc):
    return openai_error(
        RequestError(405, f"{request.method} is not allowed on {request.url.path[:100]}", None, "method_not_allowed")
    )


async def internal_error(request: Request, exc: Exception):
    """Whatever escaped a handler: JSON, in OpenAI's shape (Starlette logs the traceback)."""
    return openai_error(RequestError(500, f"internal error: {type(exc).__name__}", None, "internal_error"))


# ----------------------------------------------------------------------------- plain routes
async def index(request: Request):
    return HTMLResponse(_state(request).page)


async def health(request: Request):
    state = _state(request)
    stats = state.scheduler.stats()
    return {
        "status": "ok",
        "busy": stats["running"] + stats["queued"] > 0,
        "context": state.context,
        **stats,
        **state.info,
    }


async def models(request: Request):
    model_id = _state(request).info["id"]
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "rustchat"}]}


# ----------------------------------------------------------------------------- completions
async def read_body(request: Request):
    """The body as JSON, at most MAX_BODY_BYTES read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(
            413, f"request body too large: {declared[:20]} > {MAX_BODY_BYTES} bytes", None, "request_too_large"
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(
                413, f"request body too large: more than {MAX_BODY_BYTES} bytes", None, "request_too_large"
            )
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, or absurdly deep nesting
        raise RequestError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None


async def open_reply(request: Request) -> tuple[dict, Reply]:
    """The checked request and its generation, queued; RequestError when refused."""
    state = _state(request)
    req = parse_request(await read_body(request), **state.defaults, model_id=state.info["id"])
    prompt = fit_prompt(state.engine.tok, req["messages"], state.context, req["max_tokens"])
    budget = max(1, min(req["max_tokens"], state.context - len(prompt)))
    loop = asyncio.get_running_loop()
    if loop not in state.mailboxes:
        state.mailboxes[loop] = Mailbox(loop)
    try:
        return req, Reply(state.scheduler, state.mailboxes[loop], state.engine.tok, prompt, req, budget)
    except RustchatError as e:  # the queue is full
        raise RequestError(429, str(e), None, "server_busy") from None


async def watch_disconnect(request: Request, reply: Reply):
    # the body has been read, so the next message is the client going away (or the end)
    while (await request.receive())["type"] != "http.disconnect":
        pass
    reply.gen.cancelled = True


async def with_watch(request: Request, reply: Reply, agen):
    watcher = asyncio.ensure_future(watch_disconnect(request, reply))
    try:
        async for item in agen:
            yield item
    finally:
        watcher.cancel()
        reply.gen.cancelled = True


def event_stream(request: Request, reply: Reply, agen) -> StreamingResponse:
    return StreamingResponse(with_watch(request, reply, agen), media_type="text/event-stream", headers=SSE_HEADERS)


async def page_completions(request: Request):
    try:
        _, reply = await open_reply(request)
    except RequestError as e:
        return JSONResponse({"error": e.message}, status_code=e.status)

    async def stream():
        try:
            async for kind, s in reply.pieces():
                yield _sse({"token": s} if kind == "text" else {"token": s, "tool": True})
        except Exception as e:  # headers are sent already: report in the stream
            yield _sse({"error": _failure(e)})
        yield _sse({"done": True})

    return event_stream(request, reply, stream())


class _Completion:
    """One /v1/chat/completions answer's envelope: id, timestamps, usage, log-probabilities."""

    def __init__(self, state: AppState, req: dict, reply: Reply):
        self.model, self.req, self.reply = state.info["id"], req, reply
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.sent = 0  # log-probability entries already sent

    def usage(self) -> dict:
        r = self.reply
        return {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        }

    def logprobs(self):
        """The entries not sent yet, as OpenAI's `logprobs` (None when not asked for)."""
        if self.req["logprobs"] is None:
            return None
        new, self.sent = self.reply.logprobs[self.sent :], len(self.reply.logprobs)
        return {"content": new, "refusal": None}

    def whole(self, text: str) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self.logprobs(),
                    "finish_reason": self.reply.finish_reason,
                }
            ],
            "usage": self.usage(),
        }

    def chunk(self, delta: dict, finish=None, logprobs=None) -> bytes:
        return _sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }
        )

    def usage_chunk(self) -> bytes:
        return _sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(),
            }
        )


async def chat_completions(request: Request):
    state = _state(request)
    try:
        req, reply = await open_reply(request)
    except RequestError as e:
        return openai_error(e)
    out = _Completion(state, req, reply)
    if not req["stream"]:
        text = []
        try:
            async for _kind, s in with_watch(request, reply, reply.pieces()):
                text.append(s)
        except Exception as e:
            return openai_error(RequestError(500, _failure(e), None, "generation_failed"))
        return out.whole("".join(text))

    async def stream():
        yield out.chunk({"role": "assistant", "content": ""})
        try:
            async for _kind, s in reply.pieces():
                yield out.chunk({"content": s}, logprobs=out.logprobs())
        except Exception as e:  # headers are sent already: report in the stream
            yield _sse(error_body(_failure(e), "server_error", None, "generation_failed"))
            return
        yield out.chunk({}, reply.finish_reason, logprobs=out.logprobs())
        if req["include_usage"]:
            yield out.usage_chunk()
        yield b"data: [DONE]\n\n"

    return event_stream(request, reply, stream())


def create_app(
    engine,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 50,
    max_tokens: int = 512,
    model_info: dict | None = None,
    max_batch: int = 32,
    max_queue: int = 1024,
    host: str = "127.0.0.1",
    allow_origins: list[str] | None = None,
):
    """The ASGI app around one Engine (FastAPI inside the Host/Origin guard). Its scheduler
    thread starts now; `app.state.scheduler` / the app's shutdown closes it. The counts and
    defaults take what `rustchat serve`'s flags take (OutOfRangeError, a ValueError, otherwise)."""
    check_count("max_batch", max_batch, 1, MAX_ROWS)
    check_count("max_queue", max_queue, 0, MAX_SERVE_QUEUE)
    check_count("top_k", top_k, *TOP_K_RANGE)
    check_count("max_tokens", max_tokens, *MAX_TOKENS_RANGE)
    if not TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]:
        raise OutOfRangeError(
            f"temperature must be in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}], got {temperature}"
        )
    scheduler = BatchScheduler(engine, max_batch=max_batch, max_queue=max_queue)
    app = FastAPI(
        title="rustchat",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        on_shutdown=[scheduler.close],
        exception_handlers={404: not_found, 405: bad_method, Exception: internal_error},
    )
    app.state.scheduler = scheduler
    app.state.rustchat = AppState(
        engine,
        scheduler,
        {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens},
        {"id": "rustchat", "model": "rustchat", **(model_info or {})},
        (WEB_DIR / "index.html").read_text("utf-8"),
    )
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/chat/completions", page_completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return HostOriginGuard(app, host=host, allow_origins=allow_origins or [])


def run_server(cfg: ServeConfig) -> None:
    max_connections = connection_cap(cfg.max_connections)  # before loading: a bad ulimit fails fast
    # (the counts and the request defaults were checked by ServeConfig against their ranges)
    if not cfg.request_timeout <= MAX_REQUEST_TIMEOUT_S:
        raise RustchatError(f"--request-timeout must be at most {MAX_REQUEST_TIMEOUT_S:g} s, got {cfg.request_timeout}")
    origins = [o.strip() for o in (cfg.allow_origin or "").split(",") if o.strip()]
    for o in origins:
        if o != "*" and not o.startswith(("http://", "https://")):
            raise RustchatError(f"--allow-origin: {o!r} is not an origin like http://host:port (or *)")
    model, tok, meta = load_model(cfg.source, depth=cfg.depth, step=cfg.step, device=cfg.device, base_dir=cfg.base_dir)
    device = model.get_device()
    depth, step = model.config.n_layer, meta.get("step")
    info = {
        "id": f"rustchat-{cfg.source}-d{depth}" + (f"-step{step}" if step is not None else ""),
        "model": f"{cfg.source} d{depth} step {step}",
        "stage": cfg.source,
        "depth": depth,
        "step": step,
        "device": str(device),
    }
    app = create_app(
        Engine(model, tok),
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        max_tokens=cfg.max_tokens,
        model_info=info,
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        host=cfg.host,
        allow_origins=origins,
    )
    # the event loop gives up the GIL at every socket write; with the default 5 ms switch
    # interval each write can then wait 5 ms behind the scheduler thread (a convoy that made
    # /health take seconds under 200 streams)
    sys.setswitchinterval(0.0005)
    if cfg.host not in LOOPBACK_HOSTS:
        print(f"warning: listening on {cfg.host}: anyone who can reach it can use the model (no authentication)")
    print(
        f"rustchat serve: {info['model']} on {device} -> http://{cfg.host}:{cfg.port}/ "
        f"(OpenAI API at /v1, model id {info['id']})"
    )
    throttle_accept_errors()
    protocol = protocol_class(max_connections, headers_s=cfg.request_timeout, body_s=cfg.request_timeout)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", http=protocol, timeout_keep_alive=KEEP_ALIVE_S)
