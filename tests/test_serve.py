"""The web server: request limits (4xx naming the problem), the SSE stream, and the real page
driven in headless Chromium over the DevTools protocol against a loopback server."""
import json
import os
import shutil
import signal
import socket
import subprocess
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
    return rustchat.Tokenizer.train([text[i:i + 5000] for i in range(0, len(text), 5000)], vocab_size=512)


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
    model = TalkativeGPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                                   n_embd=64)).eval()
    return Engine(model, tok)


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    return TestClient(create_app(engine, max_tokens=12))


def user(text="hello"):
    return {"role": "user", "content": text}


def sse_events(text):
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block[len("data: "):]))
    return events


@pytest.mark.parametrize("body, status, words", [
    ({"messages": [user()] * 501}, 413, "too many messages"),
    ({"messages": [user("x" * 8001)]}, 413, "message 0 is too long"),
    ({"messages": [user("x" * 7000), {"role": "assistant", "content": "y" * 7000}] * 2 + [user("z" * 7000)]}, 413,
     "conversation is too long"),
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
])
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
    from rustchat.serve import parse_request

    edge = [user("x" * 8000), {"role": "assistant", "content": "y" * 8000}] * 2 + [user("")]  # 32,000 chars
    for extra in ({"temperature": 0, "top_k": 1, "max_tokens": 1}, {"temperature": 2, "top_k": 200, "max_tokens": 4096}):
        req = parse_request({"messages": edge, **extra})
        assert (req["temperature"], req["top_k"], req["max_tokens"]) == tuple(extra.values())
    many = [user("x" * 10), {"role": "assistant", "content": "y"}] * 249 + [user("what now?")]
    req = parse_request({"messages": [{"role": "system", "content": "be brief"}] + many})  # 500 messages
    assert len(req["messages"]) == 500 and req["max_tokens"] == 512
    # over HTTP: a history longer than the model's context is trimmed from the oldest turns
    r = client.post("/chat/completions", json={"messages": [{"role": "system", "content": "be brief"}] + many,
                                               "max_tokens": 2})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == {"done": True} and len(events) >= 2
    # but a last message that alone exceeds the context is refused, naming the problem
    r = client.post("/chat/completions", json={"messages": [user("x" * 8000)]})
    assert r.status_code == 413 and "context" in r.json()["error"]


def test_sse_stream_format(client):
    r = client.post("/chat/completions", json={"messages": [user("tell me a story")], "temperature": 0.9,
                                               "top_k": 40, "max_tokens": 16, "seed": 3})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("\n\n")
    events = sse_events(r.text)
    assert events[-1] == {"done": True}
    tokens = [e["token"] for e in events[:-1]]
    assert tokens and all(isinstance(t, str) for t in tokens)
    assert "".join(tokens)
    # seeded requests repeat
    again = client.post("/chat/completions", json={"messages": [user("tell me a story")], "temperature": 0.9,
                                                   "top_k": 40, "max_tokens": 16, "seed": 3})
    assert again.text == r.text


def test_abandoned_stream_releases_the_model(client):
    with client.stream("POST", "/chat/completions", json={"messages": [user()], "max_tokens": 200}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # read one event, then hang up
    r = client.post("/chat/completions", json={"messages": [user()], "max_tokens": 3})
    assert r.status_code == 200 and sse_events(r.text)[-1] == {"done": True}
    assert client.get("/health").json()["busy"] is False


def test_tool_call_is_streamed(tok):
    from fastapi.testclient import TestClient

    from rustchat.conversation import render_for_completion

    sp = tok.encode_special
    msgs = [user("2+3?")]
    prompt_len = len(render_for_completion(tok, {"messages": msgs + [{"role": "assistant", "content": ""}]}))
    script = [sp("<|python_start|>"), *tok.encode_ordinary("2+3"), sp("<|python_end|>"), 0, 0, 0,
              *tok.encode_ordinary("ok")]

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

    c = TestClient(create_app(Engine(Scripted(), tok)))
    r = c.post("/chat/completions", json={"messages": msgs, "temperature": 0})
    events = sse_events(r.text)
    assert {"token": "[calculator: 2+3 -> 5]", "tool": True} in events
    assert "".join(e.get("token", "") for e in events if not e.get("tool")) == "ok"
    assert events[-1] == {"done": True}


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

        self.ws = websocket.create_connection(ws_url, timeout=10, suppress_origin=True,
                                              http_no_proxy=["127.0.0.1", "localhost"])
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


def test_web_page_in_headless_chromium(engine):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    pytest.importorskip("websocket", reason="needs websocket-client for the DevTools protocol")
    import uvicorn

    app = create_app(engine, max_tokens=24)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free loopback port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    profile = tempfile.mkdtemp(prefix="rustchat_chromium_")
    proc = None
    devtools = None
    try:
        _wait(lambda: server.started, 20, "the server to start")
        proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
             "--disable-background-networking", "--no-proxy-server", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
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
        _wait(lambda: devtools.js("document.readyState === 'complete' && !!document.getElementById('send')"),
              20, "the page to load")

        # type into the box with real input events, then click Send with the mouse
        devtools.js("document.getElementById('input').focus()")
        devtools.call("Input.insertText", text="Hello from the browser test")
        assert devtools.js("document.getElementById('input').value") == "Hello from the browser test"
        rect = devtools.js("(() => { const r = document.getElementById('send').getBoundingClientRect();"
                           " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            devtools.call("Input.dispatchMouseEvent", type=kind, x=rect[0], y=rect[1], button="left", clickCount=1)

        state = _wait(lambda: (lambda s: s if s["replies"] >= 1 and s["state"] == "idle" else None)(devtools.js(
            "({state: document.body.dataset.state, replies: Number(document.body.dataset.replies),"
            " chunks: Number(document.body.dataset.chunks),"
            " user: [...document.querySelectorAll('.msg.user')].map(e => e.textContent),"
            " answer: [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent),"
            " errors: [...document.querySelectorAll('.msg.error')].map(e => e.textContent)})")),
            60, "the streamed answer")
        assert state["errors"] == []
        assert state["user"] == ["Hello from the browser test"]
        assert len(state["answer"]) == 1 and state["answer"][0].strip()
        assert state["chunks"] > 1  # arrived as a stream of pieces, not one blob
        assert devtools.js("document.getElementById('input').value") == ""
    finally:
        if devtools is not None:
            devtools.close()
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the browser's own process group (start_new_session)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        server.should_exit = True
        th.join(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
