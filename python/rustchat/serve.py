"""`rustchat serve`: the web chat (web/index.html), its streaming endpoint, and the OpenAI chat API.

- GET /v1/models, POST /v1/chat/completions: OpenAI's request and response shapes (streamed as
  `chat.completion.chunk` events ending in `data: [DONE]`), errors as
  {"error": {"message", "type", "param", "code"}}. A calculator call shows in the content as
  `[calculator: 2+3 -> 5]`.
- POST /chat/completions (the page's): `data: {"token": "..."}` per piece of text (a calculator
  call comes as `{"token": "[calculator: 2+3 -> 5]", "tool": true}`), then `data: {"done": true}`.
- GET /health: the loaded model, and how many requests run and wait.

Requests outside the limits below get a 4xx naming the problem. Generation runs on one
scheduler thread with continuous batching (rustchat.batching): handlers only await events, so
no request holds a worker thread while it waits. The server has no authentication: it listens
on 127.0.0.1 unless --host says otherwise, and refuses (403) a `Host` other than the bound
address or localhost (DNS rebinding) and an `Origin` of another site unless --allow-origin names it.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at
# runtime, and they name classes imported inside create_app
import asyncio
import json
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path

from .batching import BatchScheduler, GenRequest
from .checkpoint import load_model
from .common import RustchatError
from .config import DEFAULT_TEMPERATURE, ServeConfig
from .conversation import render_for_completion
from .engine import Engine, ReplyEvents

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
MAX_STOPS, MAX_STOP_CHARS = 4, 100
MAX_BODY_BYTES = 512 * 1024  # 32,000 chars of JSON-escaped text and 500 envelopes fit easily
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
WEB_DIR = Path(__file__).parent / "web"


class RequestError(Exception):
    """A refused request: HTTP status, message, and for the OpenAI shape the offending param
    and a machine-readable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _number(body: dict, key: str, default, lo, hi, integer: bool, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise RequestError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}",
                           key, "invalid_type")
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        raise RequestError(400, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key,
                           "invalid_value")
    return int(v) if integer else float(v)


def _content_text(content, i: int):
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"message {i} must be an object with a string 'content' (or text parts)",
                           f"messages.[{i}].content", "invalid_type")
    return content


def parse_request(body, *, temperature: float = DEFAULT_TEMPERATURE, top_k: int = 50, max_tokens: int = 512,
                  model_id: str | None = None) -> dict:
    """Check a chat completions body (the page's or OpenAI's) against the limits; defaults fill
    missing settings. Returns {"messages", "temperature", "top_k", "top_p", "max_tokens", "seed",
    "stop", "stream", "include_usage"}; raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if model_id is not None and body.get("model") not in (None, model_id):  # as OpenAI answers an unknown model
        raise RequestError(404, f"The model {json.dumps(body['model'])[:80]} does not exist; this server has "
                                f"{model_id!r} (GET /v1/models)", "model", "model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise RequestError(413, f"too many messages: {len(msgs)} > {MAX_MESSAGES}", "messages",
                           "array_above_max_length")
    total = 0
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(400, f"message {i} must be an object with a string 'content'", f"messages.[{i}]")
        content = _content_text(m.get("content"), i)
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name
        if role not in ("system", "user", "assistant") or (role == "system" and i != 0):
            raise RequestError(400, f"message {i}: role must be user or assistant (system only first), got {role!r}",
                               f"messages.[{i}].role")
        n = len(content)
        if n > MAX_MESSAGE_CHARS:
            raise RequestError(413, f"message {i} is too long: {n} > {MAX_MESSAGE_CHARS} characters",
                               f"messages.[{i}].content", "string_above_max_length")
        total += n
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(413, f"the conversation is too long: {total} > {MAX_TOTAL_CHARS} characters", "messages",
                           "context_length_exceeded")
    expect = "user"
    for i, m in enumerate(clean):
        if m["role"] == "system":
            continue
        if m["role"] != expect:
            raise RequestError(400, f"message {i}: expected role {expect!r}, got {m['role']!r} (roles alternate "
                                    "user, assistant, ... and end with user)", f"messages.[{i}].role")
        expect = "assistant" if expect == "user" else "user"
    if clean[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user", "messages")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(400, "seed must be a non-negative integer", "seed")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(400, "only n=1 is supported", "n")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise RequestError(400, f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at "
                                f"most {MAX_STOP_CHARS} characters", "stop")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise RequestError(400, "stream must be true or false and stream_options an object", "stream")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return {
        "messages": clean,
        "temperature": _number(body, "temperature", temperature, *TEMPERATURE_RANGE, integer=False),
        "top_k": _number(body, "top_k", top_k, *TOP_K_RANGE, integer=True),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, integer=False, lo_open=True),
        "max_tokens": _number(body, key, max_tokens, *MAX_TOKENS_RANGE, integer=True),
        "seed": seed,
        "stop": stops,
        "stream": stream,
        "include_usage": bool(options.get("include_usage")),
    }


def fit_prompt(tok, messages: list[dict], context: int, max_tokens: int = 1) -> list[int]:
    """Prompt ids for the reply. The oldest user/assistant pairs (after a leading system
    message) are dropped while the prompt leaves less than min(max_tokens, context/2) tokens of
    the model's context for the reply; RequestError if the last turn alone fills the context."""
    msgs = list(messages)
    head = 1 if msgs[0]["role"] == "system" else 0
    room = max(1, min(max_tokens, context // 2))
    while True:
        prompt = render_for_completion(tok, {"messages": msgs + [{"role": "assistant", "content": ""}]})
        if len(prompt) + room <= context:
            return [int(t) for t in prompt]
        if len(msgs) - head <= 1:
            if len(prompt) < context:
                return [int(t) for t in prompt]  # a shorter reply, but an answer
            raise RequestError(413, f"the message is {len(prompt)} tokens; the model's context is {context}",
                               "messages", "context_length_exceeded")
        del msgs[head:head + 2]


class StopText:
    """Cuts streamed text at the first stop string; text that may be the start of one is held
    back until it is known not to be."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf = stops, ""

    def feed(self, s: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        self.buf += s
        hits = [i for i in (self.buf.find(x) for x in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = max((n for x in self.stops for n in range(min(len(x) - 1, len(self.buf)), 0, -1)
                    if self.buf.endswith(x[:n])), default=0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Mailbox:
    """Hands the scheduler thread's events to the event loop in one wake-up per batch step
    rather than one per token: with 200 streams, a call_soon_threadsafe per token would keep
    the loop busy waking up instead of answering."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list = []

    def post(self, q: asyncio.Queue, event) -> bool:
        """False when the loop has closed (nobody will read the event)."""
        if self.loop.is_closed():
            return False
        with self.lock:
            self.pending.append((q, event))
            if len(self.pending) > 1:
                return True  # a delivery is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for q, event in items:
            q.put_nowait(event)


class Reply:
    """One request's generation as seen from the event loop: `pieces()` yields ("text", s) and
    ("tool", s) until the reply ends; then `finish_reason` ("stop"/"length") and
    `completion_tokens` are set. Leaving `pieces()` early cancels the generation, which frees
    its batch slot at the next step."""

    def __init__(self, scheduler: BatchScheduler, mailbox: Mailbox, tok, prompt: list[int], req: dict,
                 max_tokens: int):
        self.events: asyncio.Queue = asyncio.Queue()
        self.mailbox = mailbox
        self.gen = GenRequest(prompt, self._post,
                              max_tokens=max_tokens, temperature=req["temperature"], top_k=req["top_k"],
                              top_p=req["top_p"], seed=req["seed"])
        self.tok, self.stops = tok, StopText(req["stop"])
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        scheduler.submit(self.gen)

    def _post(self, event) -> None:  # on the scheduler thread
        if not self.mailbox.post(self.events, event):
            self.gen.cancelled = True  # the loop that would read it is gone

    async def pieces(self):
        display = ReplyEvents(self.tok)
        try:
            while self.finish_reason is None:
                ev = await self.events.get()
                if ev[0] == "error":
                    raise RustchatError(ev[1])
                if ev[0] == "end":
                    out = display.finish(cut=ev[1] == "length")
                    self.finish_reason = "length" if ev[1] == "length" else "stop"
                else:
                    out = display.feed(ev[1])
                    self.completion_tokens += int(not display.finished)  # the stop token is not counted
                for kind, s in out:
                    s, hit = self.stops.feed(s)
                    if s:
                        yield kind, s
                    if hit:
                        self.finish_reason = "stop"
                        break
            rest = self.stops.flush()
            if rest:
                yield "text", rest
        finally:
            self.gen.cancelled = True  # no-op once ended; otherwise the slot frees at the next step


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class HostOriginGuard:
    """ASGI middleware: 403 for a Host header not naming this server (DNS rebinding) and for an
    Origin of another site, unless allowed; CORS headers and preflights for allowed origins."""

    def __init__(self, app, *, host: str, allow_origins: list[str]):
        self.app = app
        # bound to every interface: any name may reach it, the user chose so with --host
        self.hosts = None if host in WILDCARD_HOSTS else {*LOOPBACK_HOSTS, _host_name(host)}
        self.origins = {o.rstrip("/").lower() for o in allow_origins}

    async def _refuse(self, send, message: str):
        body = json.dumps({"error": {"message": message, "type": "permission_error", "param": None,
                                     "code": "forbidden"}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            return await self._refuse(send, f"Host {host[:100]!r} is not this server (see --host)")
        origin = headers.get("origin")
        if origin is None or origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}"):
            return await self.app(scope, receive, send)  # no Origin (not a browser) or same origin
        if "*" not in self.origins and origin.rstrip("/").lower() not in self.origins:
            return await self._refuse(send, f"Origin {origin[:100]!r} is not allowed (see --allow-origin)")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":  # a preflight
            await send({"type": "http.response.start", "status": 204, "headers": cors + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


def create_app(engine, *, temperature: float = DEFAULT_TEMPERATURE, top_k: int = 50, max_tokens: int = 512,
               model_info: dict | None = None, max_batch: int = 32, max_queue: int = 1024,
               host: str = "127.0.0.1", allow_origins: list[str] | None = None):
    """The ASGI app around one Engine (FastAPI inside the Host/Origin guard). Its scheduler
    thread starts now; `app.state.scheduler` / the app's shutdown closes it."""
    # the web stack loads only for this command
    from fastapi import FastAPI, Request  # web stack
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse  # web stack

    context = int(engine.model.config.sequence_len)
    info = {"id": "rustchat", "model": "rustchat", **(model_info or {})}
    model_id = info["id"]
    scheduler = BatchScheduler(engine, max_batch=max_batch, max_queue=max_queue)
    app = FastAPI(title="rustchat", docs_url=None, redoc_url=None, openapi_url=None,
                  on_shutdown=[scheduler.close])
    app.state.scheduler = scheduler
    page = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    # one per event loop (uvicorn has one; a TestClient may start one per request)
    mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def openai_error(e: RequestError):
        # OpenAI answers oversized content with 400 (its client: BadRequestError); only a body
        # too large to read stays 413
        status = 400 if e.status == 413 and e.code != "request_too_large" else e.status
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                            status_code=status)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return openai_error(RequestError(404, f"no route {request.method} {request.url.path}", None, "not_found"))

    @app.exception_handler(405)
    async def bad_method(request, exc):
        return openai_error(RequestError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                         "method_not_allowed"))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        stats = scheduler.stats()
        return {"status": "ok", "busy": stats["running"] + stats["queued"] > 0, "context": context, **stats, **info}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "rustchat"}]}

    async def read_request(request: Request) -> tuple[dict, list[int], int]:
        """The checked body, its prompt ids and the reply's token budget."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body too large: {declared} > {MAX_BODY_BYTES} bytes", None,
                               "request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise RequestError(413, f"request body too large: more than {MAX_BODY_BYTES} bytes", None,
                                   "request_too_large")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, or absurdly deep nesting
            raise RequestError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
        req = parse_request(body, temperature=temperature, top_k=top_k, max_tokens=max_tokens, model_id=model_id)
        prompt = fit_prompt(engine.tok, req["messages"], context, req["max_tokens"])
        return req, prompt, max(1, min(req["max_tokens"], context - len(prompt)))

    async def open_reply(request: Request) -> tuple[dict, Reply]:
        """The checked request and its generation, queued; RequestError when refused."""
        req, prompt, n = await read_request(request)
        try:
            loop = asyncio.get_running_loop()
            if loop not in mailboxes:
                mailboxes[loop] = Mailbox(loop)
            return req, Reply(scheduler, mailboxes[loop], engine.tok, prompt, req, n)
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

    def event_stream(request: Request, reply: Reply, agen):
        return StreamingResponse(with_watch(request, reply, agen), media_type="text/event-stream",
                                 headers=sse_headers)

    @app.post("/chat/completions")
    async def page_completions(request: Request):
        try:
            _, reply = await open_reply(request)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)

        async def stream():
            try:
                async for kind, s in reply.pieces():
                    yield _sse({"token": s} if kind == "text" else {"token": s, "tool": True})
            except RustchatError as e:  # headers are sent already: report in the stream
                yield _sse({"error": str(e)})
            yield _sse({"done": True})

        return event_stream(request, reply, stream())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req, reply = await open_reply(request)
        except RequestError as e:
            return openai_error(e)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage():
            return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens}

        if not req["stream"]:
            text = []
            try:
                async for _kind, s in with_watch(request, reply, reply.pieces()):
                    text.append(s)
            except RustchatError as e:
                return openai_error(RequestError(500, str(e), None, "generation_failed"))
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "logprobs": None, "finish_reason": reply.finish_reason}],
                    "usage": usage()}

        def chunk(delta: dict, finish=None) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for _kind, s in reply.pieces():
                    yield chunk({"content": s})
            except RustchatError as e:  # headers are sent already: report in the stream
                yield _sse({"error": {"message": str(e), "type": "server_error", "param": None,
                                      "code": "generation_failed"}})
                return
            yield chunk({}, reply.finish_reason)
            if req["include_usage"]:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                            "choices": [], "usage": usage()})
            yield b"data: [DONE]\n\n"

        return event_stream(request, reply, stream())

    return HostOriginGuard(app, host=host, allow_origins=allow_origins or [])


def run_server(cfg: ServeConfig) -> None:
    import uvicorn  # the web stack loads only for this command

    for name, v, (lo, hi) in (("--temperature", cfg.temperature, TEMPERATURE_RANGE), ("--top-k", cfg.top_k, TOP_K_RANGE),
                              ("--max-tokens", cfg.max_tokens, MAX_TOKENS_RANGE)):
        if not lo <= v <= hi:
            raise RustchatError(f"{name} must be in [{lo}, {hi}], got {v}")
    if not 0 <= cfg.port <= 65535:
        raise RustchatError(f"--port must be in [0, 65535], got {cfg.port}")
    origins = [o.strip() for o in (cfg.allow_origin or "").split(",") if o.strip()]
    for o in origins:
        if o != "*" and not o.startswith(("http://", "https://")):
            raise RustchatError(f"--allow-origin: {o!r} is not an origin like http://host:port (or *)")
    model, tok, meta = load_model(cfg.source, depth=cfg.depth, step=cfg.step, device=cfg.device, base_dir=cfg.base_dir)
    device = model.get_device()
    depth, step = model.config.n_layer, meta.get("step")
    info = {"id": f"rustchat-{cfg.source}-d{depth}" + (f"-step{step}" if step is not None else ""),
            "model": f"{cfg.source} d{depth} step {step}", "stage": cfg.source, "depth": depth, "step": step,
            "device": str(device)}
    app = create_app(Engine(model, tok), temperature=cfg.temperature, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                     model_info=info, max_batch=cfg.max_batch, host=cfg.host, allow_origins=origins)
    # the event loop gives up the GIL at every socket write; with the default 5 ms switch
    # interval each write can then wait 5 ms behind the scheduler thread (a convoy that made
    # /health take seconds under 200 streams)
    sys.setswitchinterval(0.0005)
    if cfg.host not in LOOPBACK_HOSTS:
        print(f"warning: listening on {cfg.host}: anyone who can reach it can use the model (no authentication)")
    print(f"rustchat serve: {info['model']} on {device} -> http://{cfg.host}:{cfg.port}/ "
          f"(OpenAI API at /v1, model id {info['id']})")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
