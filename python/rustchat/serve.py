"""`rustchat serve`: the web chat (web/index.html) and a streaming completions endpoint.

POST /chat/completions {"messages": [...], "temperature", "top_k", "max_tokens", "seed"}
answers `text/event-stream`: `data: {"token": "..."}` per piece of text (a calculator call
comes as `{"token": "[calculator: 2+3 -> 5]", "tool": true}`), then `data: {"done": true}`.
Requests outside the limits below get HTTP 400/413 with {"error": "..."} naming the problem.
One model instance serves one request at a time (a lock); others wait their turn. The server
listens on 127.0.0.1 unless --host says otherwise: it has no authentication.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at
# runtime, and they name classes imported inside create_app
import json
import random
import threading
from pathlib import Path

from .checkpoint import load_model
from .common import RustchatError
from .config import ServeConfig
from .conversation import render_for_completion
from .engine import Engine, stream_reply

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
MAX_BODY_BYTES = 512 * 1024  # 32,000 chars of JSON-escaped text and 500 envelopes fit easily
WEB_DIR = Path(__file__).parent / "web"


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _number(body: dict, key: str, default, lo, hi, integer: bool):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise RequestError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise RequestError(400, f"{key} must be in [{lo}, {hi}], got {v}")
    return int(v) if integer else float(v)


def parse_request(body, *, temperature: float = 0.8, top_k: int = 50, max_tokens: int = 512) -> dict:
    """Check a /chat/completions body against the limits; defaults fill missing settings.
    Returns {"messages", "temperature", "top_k", "max_tokens", "seed"}; raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "messages must be a non-empty list")
    if len(msgs) > MAX_MESSAGES:
        raise RequestError(413, f"too many messages: {len(msgs)} > {MAX_MESSAGES}")
    total = 0
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RequestError(400, f"message {i} must be an object with a string 'content'")
        role = m.get("role")
        if role not in ("system", "user", "assistant") or (role == "system" and i != 0):
            raise RequestError(400, f"message {i}: role must be user or assistant (system only first), got {role!r}")
        n = len(m["content"])
        if n > MAX_MESSAGE_CHARS:
            raise RequestError(413, f"message {i} is too long: {n} > {MAX_MESSAGE_CHARS} characters")
        total += n
        clean.append({"role": role, "content": m["content"]})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(413, f"the conversation is too long: {total} > {MAX_TOTAL_CHARS} characters")
    expect = "user"
    for i, m in enumerate(clean):
        if m["role"] == "system":
            continue
        if m["role"] != expect:
            raise RequestError(400, f"message {i}: expected role {expect!r}, got {m['role']!r} (roles alternate "
                                    "user, assistant, ... and end with user)")
        expect = "assistant" if expect == "user" else "user"
    if clean[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(400, "seed must be a non-negative integer")
    return {
        "messages": clean,
        "temperature": _number(body, "temperature", temperature, *TEMPERATURE_RANGE, integer=False),
        "top_k": _number(body, "top_k", top_k, *TOP_K_RANGE, integer=True),
        "max_tokens": _number(body, "max_tokens", max_tokens, *MAX_TOKENS_RANGE, integer=True),
        "seed": seed,
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
            raise RequestError(413, f"the message is {len(prompt)} tokens; the model's context is {context}")
        del msgs[head:head + 2]


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def create_app(engine, *, temperature: float = 0.8, top_k: int = 50, max_tokens: int = 512,
               model_info: dict | None = None):
    """The FastAPI app around one Engine."""
    # the web stack loads only for this command
    import anyio
    from fastapi import FastAPI, Request  # web stack
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse  # web stack

    lock = threading.Lock()  # one generation at a time on the one model
    context = int(engine.model.config.sequence_len)
    app = FastAPI(title="rustchat", docs_url=None, redoc_url=None, openapi_url=None)
    info = dict(model_info or {})

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse((WEB_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        return {"status": "ok", "busy": lock.locked(), "context": context, **info}

    def events(prompt, req):
        # a sync generator, advanced one item at a time in a worker thread (see below)
        seed = req["seed"] if req["seed"] is not None else random.randrange(1 << 31)
        n = max(1, min(req["max_tokens"], context - len(prompt)))
        with lock:
            try:
                for kind, s in stream_reply(engine, prompt, max_tokens=n, temperature=req["temperature"],
                                            top_k=req["top_k"], seed=seed):
                    yield _sse({"token": s} if kind == "text" else {"token": s, "tool": True})
            except Exception as e:  # headers are sent already: report in the stream
                yield _sse({"error": f"generation failed: {type(e).__name__}: {e}"})
        yield _sse({"done": True})

    @app.post("/chat/completions")
    async def completions(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return error(413, f"request body too large: {declared} > {MAX_BODY_BYTES} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                return error(413, f"request body too large: more than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, or absurdly deep nesting
            return error(400, f"the body is not valid JSON: {e}")
        try:
            req = parse_request(body, temperature=temperature, top_k=top_k, max_tokens=max_tokens)
            prompt = fit_prompt(engine.tok, req["messages"], context, req["max_tokens"])
        except RequestError as e:
            return error(e.status, e.message)

        async def stream():
            gen = events(prompt, req)
            try:
                while True:
                    # not abandoned on cancel: a disconnect waits for the current step, then
                    # close() below stops the generation and releases the lock
                    item = await anyio.to_thread.run_sync(next, gen, None)
                    if item is None:
                        return
                    yield item
            finally:
                gen.close()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def run_server(cfg: ServeConfig) -> None:
    import uvicorn  # the web stack loads only for this command

    for name, v, (lo, hi) in (("--temperature", cfg.temperature, TEMPERATURE_RANGE), ("--top-k", cfg.top_k, TOP_K_RANGE),
                              ("--max-tokens", cfg.max_tokens, MAX_TOKENS_RANGE)):
        if not lo <= v <= hi:
            raise RustchatError(f"{name} must be in [{lo}, {hi}], got {v}")
    if not 0 <= cfg.port <= 65535:
        raise RustchatError(f"--port must be in [0, 65535], got {cfg.port}")
    model, tok, meta = load_model(cfg.source, depth=cfg.depth, step=cfg.step, device=cfg.device, base_dir=cfg.base_dir)
    device = model.get_device()
    label = f"{cfg.source} d{model.config.n_layer} step {meta.get('step')}"
    app = create_app(Engine(model, tok), temperature=cfg.temperature, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                     model_info={"model": label, "device": str(device)})
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {cfg.host}: anyone who can reach it can use the model (no authentication)")
    print(f"rustchat serve: {label} on {device} -> http://{cfg.host}:{cfg.port}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
