"""The web server: request limits (4xx naming the problem), the SSE stream, the OpenAI API driven
by the official `openai` client, 200 concurrent streams, Host/Origin checks, and the real page
driven in headless Chromium over the DevTools protocol, all against loopback servers."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # FastAPI's TestClient

import rustchat  # noqa: E402
from rustchat.engine import Engine  # noqa: E402
from rustchat.model import GPT, GPTConfig  # noqa: E402
from rustchat.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def tok(corpus):
    text = corpus["code"][:200_000]
    return rustchat.Tokenizer.train([text[i : i + 5000] for i in range(0, len(text), 5000)], vocab_size=512)


class TalkativeGPT(GPT):
    """A real (random) GPT that never samples a special token, so every reply runs to max_tokens."""

    def forward(self, idx, targets=None, **kw):
        logits = super().forward(idx, targets, **kw)
        if targets is None:
            logits[..., -9:] = -1e4  # the 9 special tokens are the last ids
        return logits


@pytest.fixture(scope="module")
def engine(tok):
    torch.manual_seed(0)
    model = TalkativeGPT(
        GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    ).eval()
    return Engine(model, tok)


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    # TestClient's default Host ("testserver") is refused like any foreign name
    return TestClient(create_app(engine, max_tokens=12), base_url="http://localhost")


def user(text="hello"):
    return {"role": "user", "content": text}


def sse_events(text):
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block[len("data: ") :]))
    return events


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"messages": [user()] * 501}, 413, "too many messages"),
        ({"messages": [user("x" * 8001)]}, 413, "message 0 is too long"),
        (
            {"messages": [user("x" * 7000), {"role": "assistant", "content": "y" * 7000}] * 2 + [user("z" * 7000)]},
            413,
            "conversation is too long",
        ),
        ({"messages": [user()], "temperature": 2.5}, 400, "temperature"),
        ({"messages": [user()], "temperature": -0.1}, 400, "temperature"),
        ({"messages": [user()], "top_k": 0}, 400, "top_k"),
        ({"messages": [user()], "top_k": 201}, 400, "top_k"),
        ({"messages": [user()], "top_k": 2.5}, 400, "top_k"),
        ({"messages": [user()], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [user()], "max_tokens": 4097}, 400, "max_tokens"),
        ({"messages": [user()], "temperature": "hot"}, 400, "temperature"),
        ({"messages": []}, 400, "messages"),
        ({"messages": "hello"}, 400, "messages"),
        ({}, 400, "messages"),
        ({"messages": [user(), user()]}, 400, "message 1: expected role 'assistant'"),
        ({"messages": [user(), {"role": "assistant", "content": "hi"}]}, 400, "last message must be from the user"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_limits_are_enforced(client, body, status, words):
    r = client.post("/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_bad_json_and_huge_body(client):
    r = client.post("/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = client.post("/chat/completions", content=b"x" * (600 * 1024), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_limits_at_the_edges_are_accepted(client):
    from rustchat.serve_request import parse_request

    edge = [user("x" * 8000), {"role": "assistant", "content": "y" * 8000}] * 2 + [user("")]  # 32,000 chars
    for extra in (
        {"temperature": 0, "top_k": 1, "max_tokens": 1},
        {"temperature": 2, "top_k": 200, "max_tokens": 4096},
    ):
        req = parse_request({"messages": edge, **extra})
        assert (req["temperature"], req["top_k"], req["max_tokens"]) == tuple(extra.values())
    many = [user("x" * 10), {"role": "assistant", "content": "y"}] * 249 + [user("what now?")]
    req = parse_request({"messages": [{"role": "system", "content": "be brief"}] + many})  # 500 messages
    assert len(req["messages"]) == 500 and req["max_tokens"] == 512
    # over HTTP: a history longer than the model's context is trimmed from the oldest turns
    r = client.post(
        "/chat/completions", json={"messages": [{"role": "system", "content": "be brief"}] + many, "max_tokens": 2}
    )
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == {"done": True} and len(events) >= 2
    # but a last message that alone exceeds the context is refused, naming the problem
    r = client.post("/chat/completions", json={"messages": [user("x" * 8000)]})
    assert r.status_code == 413 and "context" in r.json()["error"]


def test_sse_stream_format(client):
    r = client.post(
        "/chat/completions",
        json={"messages": [user("tell me a story")], "temperature": 0.9, "top_k": 40, "max_tokens": 16, "seed": 3},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("\n\n")
    events = sse_events(r.text)
    assert events[-1] == {"done": True}
    tokens = [e["token"] for e in events[:-1]]
    assert tokens and all(isinstance(t, str) for t in tokens)
    assert "".join(tokens)
    # seeded requests repeat
    again = client.post(
        "/chat/completions",
        json={"messages": [user("tell me a story")], "temperature": 0.9, "top_k": 40, "max_tokens": 16, "seed": 3},
    )
    assert again.text == r.text


def test_abandoned_stream_releases_the_model(client):
    with client.stream("POST", "/chat/completions", json={"messages": [user()], "max_tokens": 200}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # read one event, then hang up
    r = client.post("/chat/completions", json={"messages": [user()], "max_tokens": 3})
    assert r.status_code == 200 and sse_events(r.text)[-1] == {"done": True}
    _wait(lambda: client.get("/health").json()["busy"] is False, 30, "the abandoned request to leave")


def test_tool_call_is_streamed(tok):
    from fastapi.testclient import TestClient

    from rustchat.conversation import render_for_completion

    sp = tok.encode_special
    msgs = [user("2+3?")]
    prompt_len = len(render_for_completion(tok, {"messages": msgs + [{"role": "assistant", "content": ""}]}))
    script = [
        sp("<|python_start|>"),
        *tok.encode_ordinary("2+3"),
        sp("<|python_end|>"),
        0,
        0,
        0,
        *tok.encode_ordinary("ok"),
    ]

    class Scripted(torch.nn.Module):
        config = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)

        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(8, tok.vocab_size, bias=False)

        def get_device(self):
            return self.lm_head.weight.device

        def forward(self, idx, targets=None, *, kv_cache=None, **kw):
            B, T = idx.shape
            logits = torch.zeros(B, T, tok.vocab_size)
            for t in range(T):
                k = kv_cache.pos + t + 1 - prompt_len
                logits[:, t, script[k] if 0 <= k < len(script) else sp("<|assistant_end|>")] = 10.0
            kv_cache.advance(T)
            return logits

    c = TestClient(create_app(Engine(Scripted(), tok)), base_url="http://127.0.0.1:8000")
    r = c.post("/chat/completions", json={"messages": msgs, "temperature": 0})
    events = sse_events(r.text)
    assert {"token": "[calculator: 2+3 -> 5]", "tool": True} in events
    assert "".join(e.get("token", "") for e in events if not e.get("tool")) == "ok"
    assert events[-1] == {"done": True}
    # the OpenAI endpoint shows the call inside the content
    r = c.post("/v1/chat/completions", json={"model": "rustchat", "messages": msgs, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == "[calculator: 2+3 -> 5]ok"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_health_and_page(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="send"' in page.text and "/chat/completions" in page.text


def test_serve_listens_on_loopback_by_default():
    from rustchat.cli import build_parser
    from rustchat.config import from_args

    args = build_parser().parse_args(["serve"])
    cfg = from_args(args.config_class, args)
    assert cfg.host == "127.0.0.1" and cfg.port == 8000


# ----------------------------------------------------------------------------- real browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _DevTools:
    """Minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url):
        import websocket

        self.ws = websocket.create_connection(
            ws_url, timeout=10, suppress_origin=True, http_no_proxy=["127.0.0.1", "localhost"]
        )
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self):
        self.ws.close()


def _wait(pred, timeout, what):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.e2e
def test_web_page_in_headless_chromium(engine):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    pytest.importorskip("websocket", reason="needs websocket-client for the DevTools protocol")
    app = create_app(
        engine, max_tokens=24, model_info={"model": "sft d2 step 7", "stage": "sft", "depth": 2, "step": 7}
    )
    profile = tempfile.mkdtemp(prefix="rustchat_chromium_")
    proc = None
    devtools = None
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(serving(app))
        stack.callback(shutil.rmtree, profile, ignore_errors=True)
        stack.callback(lambda: devtools is not None and devtools.close())
        stack.callback(lambda: proc is not None and _kill_group(proc))
        proc = subprocess.Popen(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-sync",
                "--disable-background-networking",
                "--no-proxy-server",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        # the browser prints its DevTools endpoint; wait for it without blocking forever
        found = {}

        def read_stderr():
            for line in proc.stderr:
                if "DevTools listening on ws://" in line:
                    found["url"] = line.split("DevTools listening on ", 1)[1].strip()
                    break

        threading.Thread(target=read_stderr, daemon=True).start()
        _wait(lambda: "url" in found or proc.poll() is not None, 30, "chromium's DevTools endpoint")
        if "url" not in found:
            pytest.skip(f"chromium exited with {proc.returncode} before opening DevTools")
        dt_port = int(found["url"].split("ws://127.0.0.1:", 1)[1].split("/", 1)[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        targets = json.loads(opener.open(f"http://127.0.0.1:{dt_port}/json/list", timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        devtools = _DevTools(page["webSocketDebuggerUrl"])
        devtools.call("Page.enable")
        devtools.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        _wait(
            lambda: devtools.js("document.readyState === 'complete' && !!document.getElementById('send')"),
            20,
            "the page to load",
        )

        # type into the box with real input events, then click Send with the mouse
        devtools.js("document.getElementById('input').focus()")
        devtools.call("Input.insertText", text="Hello from the browser test")
        assert devtools.js("document.getElementById('input').value") == "Hello from the browser test"
        rect = devtools.js(
            "(() => { const r = document.getElementById('send').getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            devtools.call("Input.dispatchMouseEvent", type=kind, x=rect[0], y=rect[1], button="left", clickCount=1)

        state = _wait(
            lambda: (lambda s: s if s["replies"] >= 1 and s["state"] == "idle" else None)(
                devtools.js(
                    "({state: document.body.dataset.state, replies: Number(document.body.dataset.replies),"
                    " chunks: Number(document.body.dataset.chunks),"
                    " user: [...document.querySelectorAll('.msg.user')].map(e => e.textContent),"
                    " answer: [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent),"
                    " errors: [...document.querySelectorAll('.msg.error')].map(e => e.textContent)})"
                )
            ),
            60,
            "the streamed answer",
        )
        assert state["errors"] == []
        assert state["user"] == ["Hello from the browser test"]
        assert len(state["answer"]) == 1 and state["answer"][0].strip()
        assert state["chunks"] > 1  # arrived as a stream of pieces, not one blob
        assert devtools.js("document.getElementById('input').value") == ""
        # the header names the loaded checkpoint (from /health)
        assert _wait(lambda: devtools.js("document.getElementById('model').dataset.loaded"), 10, "the model label")
        assert devtools.js("document.getElementById('model').textContent") == "sft · d2 · step 7"


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the browser's own process group (start_new_session)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- real servers on loopback
@contextlib.contextmanager
def serving(app):
    """uvicorn running `app` in a thread on a free 127.0.0.1 port; yields the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    from rustchat.serve_connections import protocol_class

    # the protocol `rustchat serve` runs (deadlines, connection cap, JSON 400s)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, http=protocol_class(256))
    )
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        _wait(lambda: server.started, 20, "the server to start")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        th.join(timeout=20)


MODEL_ID = "rustchat-sft-d2-step7"


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, max_tokens=12, model_info={"id": MODEL_ID}, max_batch=32)
    with serving(app) as port:
        yield port, app.app.state.scheduler


def openai_client(port, cls=None):
    import httpx
    import openai

    http = (httpx.AsyncClient if cls is openai.AsyncOpenAI else httpx.Client)(trust_env=False, timeout=120)
    return (cls or openai.OpenAI)(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, http_client=http
    )


def engine_text(engine, messages, max_tokens):
    """The reply the Engine alone gives (greedy), through the server's own prompt rendering."""
    from rustchat.engine import stream_reply
    from rustchat.serve_request import fit_prompt

    prompt = fit_prompt(engine.tok, messages, engine.model.config.sequence_len, max_tokens)
    text = "".join(s for _, s in stream_reply(engine, prompt, max_tokens=max_tokens, temperature=0.0, top_k=None))
    return text, len(prompt)


@pytest.mark.e2e
def test_openai_client_round_trip(server, engine):
    port, _ = server
    client = openai_client(port)
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    msgs = [{"role": "system", "content": "be brief"}, user("what is a tokenizer?")]
    expected, prompt_len = engine_text(engine, msgs, 10)
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_ID
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].finish_reason == "length"  # TalkativeGPT never ends a reply by itself
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 10, prompt_len + 10)
    # streamed: the same text in chat.completion.chunk events, then [DONE] (the client stops there)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    # max_completion_tokens is OpenAI's newer name for max_tokens
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and expected.startswith(r.choices[0].message.content)
    # stop strings cut the text before them, streamed or not
    stop = expected[4:7]
    cut = expected[: expected.find(stop)]
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=10, temperature=0, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.chat.completions.create(
        model=MODEL_ID, messages=msgs, max_tokens=10, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    # seeded sampling (top_p) repeats
    a, b = (
        client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
        .choices[0]
        .message.content
        for _ in range(2)
    )
    assert a == b


@pytest.mark.e2e
def test_openai_errors(server):
    import httpx
    import openai

    port, _ = server
    client = openai_client(port)

    def refused(exc, **kw):
        with pytest.raises(exc) as e:
            client.chat.completions.create(model=MODEL_ID, **{"messages": [user()], **kw})
        return e.value

    e = refused(openai.BadRequestError, messages=[user("x" * 8001)])
    assert e.code == "string_above_max_length" and "too long" in e.message
    e = refused(
        openai.BadRequestError,
        messages=[user("x" * 7000), {"role": "assistant", "content": "y" * 7000}] * 2 + [user("z" * 7000)],
    )
    assert e.code == "context_length_exceeded"
    assert refused(openai.BadRequestError, temperature=2.5).param == "temperature"
    assert refused(openai.BadRequestError, top_p=0).param == "top_p"
    assert refused(openai.BadRequestError, max_tokens=0).param == "max_tokens"
    assert refused(openai.BadRequestError, messages=[]).param == "messages"
    assert refused(openai.BadRequestError, n=2).param == "n"
    assert refused(openai.BadRequestError, stop=["a"] * 5).param == "stop"
    e = refused(openai.APIStatusError, messages=[user("x" * 600_000)])
    assert e.status_code == 413 and e.code == "request_too_large"
    with httpx.Client(trust_env=False, timeout=30) as http:
        base = f"http://127.0.0.1:{port}"
        r = http.post(base + "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.get(base + "/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    # a model this server does not have: OpenAI's 404 model_not_found (its client: NotFoundError)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL_ID + "-x", messages=[user()])
    assert e.value.code == "model_not_found" and e.value.param == "model"


@pytest.mark.e2e
def test_16_concurrent_openai_requests_each_get_their_own_answer(server, engine):
    import openai

    port, _ = server
    prompts = [[user(f"question {i}: " + "why " * i)] for i in range(16)]  # different prompt lengths

    async def ask(client, i):
        if i % 2:
            stream = await client.chat.completions.create(
                model=MODEL_ID, messages=prompts[i], max_tokens=8, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        r = await client.chat.completions.create(model=MODEL_ID, messages=prompts[i], max_tokens=8, temperature=0)
        return r.choices[0].message.content

    async def main():
        client = openai_client(port, openai.AsyncOpenAI)
        try:
            return await asyncio.gather(*(ask(client, i) for i in range(16)))
        finally:
            await client.close()

    answers = asyncio.run(main())
    assert answers == [engine_text(engine, p, 8)[0] for p in prompts]


@pytest.fixture(scope="module")
def serve_base(tok, tmp_path_factory):
    """A base dir holding the tokenizer and a random sft checkpoint (depth 2, step 7)."""
    from rustchat.checkpoint import save_checkpoint, stage_dir

    base = tmp_path_factory.mktemp("serve_base")
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    save_checkpoint(stage_dir("sft", 2, base), 7, GPT(cfg), None, {})
    return base


@contextlib.contextmanager
def cli_serving(base, *flags, preexec_fn=None, log_name="serve.log"):
    """`rustchat serve` in its own process on `base`; yields (port, first /health answer, log path)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = base / log_name
    log = open(log_path, "w+")  # a file, not a pipe: a full pipe would block the server's logging
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rustchat.cli",
            "serve",
            "--base-dir",
            str(base),
            "--port",
            str(port),
            "--device",
            "cpu",
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )
    try:

        def up():
            if proc.poll() is not None:
                raise AssertionError(f"rustchat serve exited: {log_path.read_text()[-2000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).json()
            except httpx.TransportError:
                return None

        yield port, _wait(up, 120, "rustchat serve to answer"), log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def cli_server(serve_base):
    """`rustchat serve` in its own process (as users run it) on a saved random sft checkpoint, so
    load-test clients in this process never compete with the server for the GIL."""
    with cli_serving(serve_base, "--max-tokens", "6") as (port, health, _log):
        yield port, health


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_server_names_its_model(cli_server):
    port, health = cli_server
    assert (health["stage"], health["depth"], health["step"]) == ("sft", 2, 7)
    assert [m.id for m in openai_client(port).models.list()] == ["rustchat-sft-d2-step7"]


# polls a URL every 50 ms until its stdin closes; prints one JSON answer per poll (null: none
# within 30 s)
HEALTH_POLLER = """
import json, select, sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
answers = []
while not select.select([sys.stdin], [], [], 0)[0] and len(answers) < 10000:
    try:
        answers.append(json.loads(opener.open(sys.argv[1], timeout=30).read()))
    except (OSError, ValueError):
        answers.append(None)
    time.sleep(0.05)
print(json.dumps(answers))
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_200_streaming_clients_all_finish_and_health_answers(cli_server):
    """Outcomes only (how fast /health answers is scripts/bench_serve.py's target): every client
    gets its whole stream, every /health poll gets an answer, and the slots all come back."""
    import httpx

    port, _ = cli_server
    base = f"http://127.0.0.1:{port}"

    async def client(http, i):
        body = {"model": "rustchat-sft-d2-step7", "messages": [user(f"client {i}")], "temperature": 0.7, "stream": True}
        finish, finished = None, False
        async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                elif line.startswith("data: "):
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return finished, finish

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=300) as http:
            return await asyncio.wait_for(asyncio.gather(*(client(http, i) for i in range(200))), 300)

    # /health is polled from its own process, so it competes with the server, not these clients
    poller = subprocess.Popen(
        [sys.executable, "-c", HEALTH_POLLER, base + "/health"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        results = asyncio.run(main())
    finally:
        out, _ = poller.communicate("", timeout=60)  # closing stdin stops it
    answers = json.loads(out)
    assert len(results) == 200
    assert all(done and finish in ("stop", "length") for done, finish in results)
    assert len(answers) >= 2 and all(a is not None and a["status"] == "ok" for a in answers)
    after = _wait(
        lambda: (lambda h: h if not h["busy"] else None)(httpx.get(base + "/health", trust_env=False).json()),
        30,
        "the slots to come back",
    )
    assert (after["running"], after["queued"]) == (0, 0)


class SlowGPT(TalkativeGPT):
    """Each forward takes 10 ms more, so a long reply outlives the client that asked for it."""

    def forward(self, idx, targets=None, **kw):
        time.sleep(0.01)
        return super().forward(idx, targets, **kw)


@pytest.mark.e2e
def test_disconnected_client_frees_its_slot(engine):
    import httpx

    slow = SlowGPT(engine.model.config).eval()
    slow.load_state_dict(engine.model.state_dict())
    app = create_app(Engine(slow, engine.tok), max_tokens=4096)
    scheduler = app.app.state.scheduler
    with serving(app) as port, httpx.Client(trust_env=False, timeout=60) as http:
        with http.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "rustchat", "messages": [user()], "stream": True},
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # a first piece of text: hang up
        steps_at_hangup = scheduler.steps
        _wait(lambda: scheduler.stats()["running"] == 0, 30, "the slot to free")
        # the reply would have run to the context (~240 steps at 10 ms); it stopped within a few
        assert scheduler.steps - steps_at_hangup < 100
        assert http.get(f"http://127.0.0.1:{port}/health").json()["busy"] is False


def test_host_and_origin_are_checked(engine):
    from fastapi.testclient import TestClient

    app = create_app(engine, max_tokens=2)
    c = TestClient(app, base_url="http://127.0.0.1:8000")
    for host in ("127.0.0.1:8000", "localhost:8000", "localhost", "[::1]:8000"):
        assert c.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        r = c.get("/health", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", host
    assert c.get("/health", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200  # the page itself
    r = c.post("/v1/chat/completions", headers={"Origin": "http://evil.example"}, json={"messages": [user()]})
    assert r.status_code == 403 and "Origin" in r.json()["error"]["message"]
    assert c.get("/", headers={"Origin": "http://localhost:8001"}).status_code == 403  # another port: another site
    assert c.get("/", headers={"Origin": "null"}).status_code == 403
    # --allow-origin names pages that may call it (with CORS headers and preflights)
    allowed = TestClient(create_app(engine, allow_origins=["http://app.example"]), base_url="http://localhost")
    r = allowed.get("/v1/models", headers={"Origin": "http://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = allowed.options(
        "/v1/chat/completions", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 204 and "POST" in r.headers["access-control-allow-methods"]
    assert allowed.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 403
    anyone = TestClient(create_app(engine, allow_origins=["*"]), base_url="http://localhost")
    assert anyone.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200
    # --host: a named address is accepted as Host; binding every interface accepts any name
    named = TestClient(create_app(engine, host="192.168.1.5"), base_url="http://192.168.1.5:8000")
    assert named.get("/health").status_code == 200
    assert named.get("/health", headers={"Host": "evil.example"}).status_code == 403
    wide = TestClient(create_app(engine, host="0.0.0.0"), base_url="http://my-box.lan:8000")
    assert wide.get("/health").status_code == 200
    assert wide.get("/health", headers={"Origin": "http://evil.example"}).status_code == 403


def test_serve_flags():
    from rustchat.cli import build_parser
    from rustchat.config import from_args

    args = build_parser().parse_args(
        ["serve", "--allow-origin", "http://a.example,http://b.example", "--max-batch", "8"]
    )
    cfg = from_args(args.config_class, args)
    assert cfg.allow_origin == "http://a.example,http://b.example" and cfg.max_batch == 8


def test_bad_allow_origin_is_refused_before_loading(tmp_path):
    from rustchat.common import RustchatError
    from rustchat.config import ServeConfig
    from rustchat.serve import run_server

    with pytest.raises(RustchatError, match="allow-origin"):
        run_server(ServeConfig(allow_origin="evil.example", base_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- every parameter honoured or refused
@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required"},
            "tools",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"n": True}, "n"),
        ({"n": 2}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 10**400}, "max_tokens"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_logprobs": -(10**400), "logprobs": True}, "top_logprobs"),
        ({"top_k": False}, "top_k"),
        ({"seed": True}, "seed"),
        ({"stream_options": {"include_usage": "yes"}}, "include_usage"),
        ({"temperature_typo": 0.5}, "temperature_typo"),
        ({"user": 5}, "user"),
    ],
)
def test_unsupported_or_mistyped_parameters_are_refused_by_name(client, extra, param):
    r = client.post("/v1/chat/completions", json={"model": "rustchat", "messages": [user()], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and param.split("_")[0] in err["message"]


def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    body = {
        "model": "rustchat",
        "messages": [user()],
        "max_tokens": 2,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logit_bias": {},
        "user": "me",
        "metadata": {"k": "v"},
        "store": False,
        "n": 1,
        "logprobs": False,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None


def _reference_logprobs(model, ids: list[int], prompt_len: int):
    """log-softmax of the model's logits at each generated position, float64, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, prompt_len - 1 :].double()
    return torch.log_softmax(logits, dim=-1)


def _check_logprobs(engine, entries, prompt_len, msgs, kw, top):
    """Entries against the model's own softmax, for the tokens Engine.generate gives."""
    from rustchat.serve_request import fit_prompt

    prompt = fit_prompt(engine.tok, msgs, engine.model.config.sequence_len, kw["max_tokens"])
    assert len(prompt) == prompt_len
    toks = [c[0] for c, _ in engine.generate(prompt, 1, kw["max_tokens"], kw["temperature"], kw["top_k"], kw["seed"])]
    ref = _reference_logprobs(engine.model, prompt + toks, len(prompt))
    assert len(entries) == len(toks)
    for k, (t, e) in enumerate(zip(toks, entries)):
        assert bytes(e["bytes"]) == engine.tok.decode_bytes([t])
        assert e["logprob"] == pytest.approx(float(ref[k, t]), abs=1e-4)
        vals, ids = ref[k].topk(top)
        assert [bytes(a["bytes"]) for a in e["top_logprobs"]] == [engine.tok.decode_bytes([i]) for i in ids.tolist()]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(vals.tolist(), abs=1e-4)


@pytest.mark.e2e
def test_logprobs_are_the_models_own(server, engine):
    """logprobs + top_logprobs through the openai client, streamed and not, equal log-softmax of
    the model's logits (float64, no KV cache) at the tokens the engine generates."""
    import random

    port, _ = server
    client = openai_client(port)
    seed = random.randrange(1 << 30)
    msgs = [user(f"say something about {seed % 1000}")]
    kw = dict(max_tokens=8, temperature=0.9, top_k=40, seed=seed)
    top = 5
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=msgs,
        max_tokens=8,
        temperature=0.9,
        seed=seed,
        logprobs=True,
        top_logprobs=top,
        extra_body={"top_k": 40},
    )
    entries = [e.model_dump() for e in r.choices[0].logprobs.content]
    _check_logprobs(engine, entries, r.usage.prompt_tokens, msgs, kw, top)
    # the tokens' bytes, joined, are the reply: a token may hold part of a UTF-8 character, so its own
    # text can differ (one U+FFFD per fragment) while the joined bytes decode as the reply does
    raw = b"".join(bytes(e["bytes"]) for e in entries)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=msgs,
        max_tokens=8,
        temperature=0.9,
        seed=seed,
        logprobs=True,
        top_logprobs=top,
        extra_body={"top_k": 40},
        stream=True,
    )
    streamed = [
        e.model_dump() for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert streamed == entries
    # logprobs without top_logprobs: the chosen token's only
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=3, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[], [], []]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "poison", [{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1.0, "top_p": 1e-46}]
)
def test_a_degenerate_request_among_8_streams_changes_no_other_reply(server, poison):
    """The attack: one request with a value that underflows float32 among 8 streaming ones.
    The other 7 replies equal their solo replies; the poisoned one is the greedy reply."""
    import openai

    port, _ = server
    reqs = [
        dict(messages=[user(f"stream {i}: " + "go " * i)], max_tokens=10, temperature=0.9, seed=100 + i)
        for i in range(8)
    ]
    reqs[4] = dict(messages=[user("poison")], max_tokens=10, seed=1, **poison)

    async def ask(client, kw):
        stream = await client.chat.completions.create(model=MODEL_ID, stream=True, **kw)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def together():
        client = openai_client(port, openai.AsyncOpenAI)
        try:
            return await asyncio.gather(*(ask(client, kw) for kw in reqs))
        finally:
            await client.close()

    async def alone():
        client = openai_client(port, openai.AsyncOpenAI)
        try:
            return [await ask(client, kw) for kw in reqs]
        finally:
            await client.close()

    batched, solo = asyncio.run(together()), asyncio.run(alone())
    assert batched == solo and all(solo)
    greedy = dict(reqs[4], temperature=0)
    greedy.pop("top_p", None)
    assert batched[4] == asyncio.run(_one(port, ask, greedy))


async def _one(port, ask, kw):
    import openai

    client = openai_client(port, openai.AsyncOpenAI)
    try:
        return await ask(client, kw)
    finally:
        await client.close()


# ----------------------------------------------------------------------------- no plain-text 500s
@pytest.mark.e2e
def test_tokenizer_refusal_is_a_400_and_any_failure_is_json(tmp_path):
    """A split pattern whose regex gives up on a user's text (its backtracking limit) is a 400
    saying so; an exception anywhere in a request is a JSON 500 in OpenAI's shape."""
    import httpx

    from rustchat.tokenizer import SPECIAL_TOKENS

    ranks = {bytes([i]): i for i in range(256)}
    tok = rustchat.Tokenizer.from_ranks(
        ranks, r"(?:a|aa)+(?=b)|\w+|\s+|.", {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}
    )
    with pytest.raises(ValueError, match="backtrack"):
        tok.encode("a" * 40 + "c")
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    ).eval()
    app = create_app(Engine(model, tok), max_tokens=3)
    with serving(app) as port, httpx.Client(trust_env=False, timeout=60) as http:
        url = f"http://127.0.0.1:{port}"
        for path in ("/v1/chat/completions", "/chat/completions"):
            r = http.post(url + path, json={"messages": [user("a" * 40 + "c")]})
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
            err = r.json()["error"]
            assert "tokenizer" in (err if isinstance(err, str) else err["message"])
        assert http.post(url + "/v1/chat/completions", json={"messages": [user("hi")]}).status_code == 200
        # a request HTTP cannot parse: JSON too
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n")
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
        assert json.loads(body)["error"]["code"] == "invalid_http"
        # a failure no handler expected: the scheduler's stats break
        app.app.state.scheduler.stats = lambda: 1 / 0
        r = http.get(url + "/health")
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["type"] == "server_error" and "ZeroDivisionError" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- idle and slow clients
@pytest.mark.e2e
@pytest.mark.slow
def test_idle_connections_cannot_take_the_server_down(serve_base):
    """The attack, scaled to a 1,024-descriptor limit: more idle sockets than the server may
    open. /health and a completion still answer (an idle connection makes room), every idle
    socket is closed by the server, and so are a request whose headers never end and one whose
    body never ends."""
    import resource

    import httpx

    limit, sockets = 1024, 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < sockets + 200:
        if hard != resource.RLIM_INFINITY and hard < sockets + 200:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (sockets + 200, hard))

    def lower_limit():  # in the server's process, before it starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    idle = []
    try:
        with cli_serving(
            serve_base, "--max-tokens", "4", "--request-timeout", "3", preexec_fn=lower_limit, log_name="idle.log"
        ) as (port, _, log_path):
            for _ in range(sockets):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                idle.append(s)
            half_headers = socket.create_connection(("127.0.0.1", port), timeout=10)
            half_headers.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never ends
            half_body = socket.create_connection(("127.0.0.1", port), timeout=10)
            half_body.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b'application/json\r\nContent-Length: 1000\r\n\r\n{"messages": '
            )
            with httpx.Client(trust_env=False, timeout=60) as http:
                base = f"http://127.0.0.1:{port}"
                health = http.get(base + "/health")
                assert health.status_code == 200 and health.json()["status"] == "ok"
                r = http.post(base + "/v1/chat/completions", json={"messages": [user("still there?")]})
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")

            def closed(s):
                s.settimeout(0.05)
                try:
                    return s.recv(1) == b""
                except socket.timeout:
                    return False
                except OSError:  # reset
                    return True

            still_open = idle + [half_headers, half_body]

            def all_closed():
                still_open[:] = [s for s in still_open if not closed(s)]
                return not still_open

            all_closed()
            made_room = len(idle) + 2 - len(still_open)
            _wait(all_closed, 120, "the server to close every idle connection")
            print(
                f"descriptor limit {limit}: {sockets} idle sockets + 2 half-sent requests; /health and a completion "
                f"answered; {made_room} of them closed by the server by then (to make room or at their deadline), "
                "the rest after"
            )
            with httpx.Client(trust_env=False, timeout=60) as http:  # and it still serves
                assert http.get(f"http://127.0.0.1:{port}/health").status_code == 200
            log = log_path.read_text()
            assert log.count("Too many open files") + log.count("out of system resource") <= 2, log[-2000:]
    finally:
        for s in idle:
            s.close()


def test_accept_errors_are_logged_once_per_interval():
    import errno
    import logging

    from rustchat.serve_connections import ThrottledLog

    f = ThrottledLog(interval=3600)

    def record(msg, exc=None):
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, msg, None, (type(exc), exc, None) if exc else None
        )

    emfile = OSError(errno.EMFILE, "Too many open files")
    assert f.filter(record("socket.accept() out of system resource", emfile))
    assert not any(f.filter(record("socket.accept() out of system resource", emfile)) for _ in range(500))
    assert f.filter(record("an unrelated error"))  # others pass
    f.last -= 3600  # an interval later: one line with the count of those held back
    r = record("socket.accept() out of system resource", emfile)
    assert f.filter(r) and "500 more" in r.getMessage()


def test_connection_flags_are_checked(tmp_path):
    import resource

    from rustchat.cli import build_parser
    from rustchat.common import RustchatError
    from rustchat.config import ServeConfig, from_args
    from rustchat.serve import run_server
    from rustchat.serve_connections import FD_RESERVE, connection_cap

    for value, words in (("nan", ">= 0.1"), ("0", ">= 0.1"), ("inf", "at most 3600")):
        with pytest.raises(RustchatError, match=words):
            args = build_parser().parse_args(["serve", "--request-timeout", value, "--base-dir", str(tmp_path)])
            run_server(from_args(args.config_class, args))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = soft == resource.RLIM_INFINITY
    assert connection_cap(10**9) == (10**9 if unlimited else soft - FD_RESERVE) and connection_cap(10) == 10
    assert ServeConfig().max_connections == 2048


def test_random_bodies_are_answered_or_refused_never_crash():
    """parse_request on random JSON values for every field it knows (and some it does not):
    a dict of settings, or a RequestError; nothing else escapes."""
    import random

    from rustchat.serve_request import ACCEPTED, NEUTRAL, RequestError, parse_request

    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    scalars = [
        None,
        True,
        False,
        0,
        1,
        -1,
        2,
        20,
        21,
        0.5,
        1e-300,
        -0.0,
        1e308,
        10**400,
        float("nan"),
        float("inf"),
        "",
        "x",
        "text",
        "none",
        "auto",
        "required",
        [],
        {},
        [1],
        ["text"],
        {"type": "text"},
        {"type": "json_object"},
        {"include_usage": True},
        {"include_usage": 1},
    ]

    def value(depth=0):
        r = rng.random()
        if depth < 2 and r < 0.15:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        if depth < 2 and r < 0.3:
            names = ["role", "content", "type", "text", "x"]
            return {rng.choice(names): value(depth + 1) for _ in range(rng.randrange(3))}
        return rng.choice(scalars)

    keys = list(ACCEPTED) + list(NEUTRAL) + ["bogus", "Temperature"]
    accepted = 0
    for _ in range(3000):
        body = {k: value() for k in rng.sample(keys, rng.randrange(1, 6))}
        if rng.random() < 0.7:
            body["messages"] = [{"role": "user", "content": "hi"}]
        try:
            req = parse_request(body)
        except RequestError as e:
            assert 400 <= e.status < 500 and e.message, (seed, body)
            continue
        accepted += 1
        assert 0 <= req["temperature"] <= 2 and 0 < req["top_p"] <= 1 and 1 <= req["max_tokens"] <= 4096, (seed, body)
        assert req["logprobs"] is None or 0 <= req["logprobs"] <= 20
    assert accepted > 0, seed
