"""Pretraining loader: exact stream contents, resume from any cursor, rank split, hub download
through HF_ENDPOINT (a local HTTP server), and clear errors for bad shards."""

import functools
import http.server
import random
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rustchat import Tokenizer
from rustchat.common import RustchatError
from rustchat.data.pretrain import DocumentSource, PretrainLoader, download_shards, shard_url
from rustchat.data.textsource import TextSourceError

from helpers import with_states

WORDS = "the cat sat on a mat while dogs ran far away from home and 42 birds sang songs".split()


def _doc(rnd):
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 60)))


@pytest.fixture(scope="module")
def tok():
    rnd = random.Random()
    return Tokenizer.train([_doc(rnd) for _ in range(300)], vocab_size=300)


@pytest.fixture
def shards(tmp_path):
    rnd = random.Random()
    docs_all = []
    for i in range(3):
        docs = [_doc(rnd) for _ in range(rnd.randint(20, 50))]
        docs_all.append(docs)
        table = pa.table({"text": docs, "id": list(range(len(docs)))})
        pq.write_table(table, tmp_path / f"shard_{i:05d}.parquet", row_group_size=rnd.randint(5, 12))
    return tmp_path, docs_all


def _take(loader, n):
    out = []
    for x, y, cur in with_states(loader):
        out.append((x.clone(), y.clone(), cur))
        if len(out) == n:
            break
    return out


def test_stream_is_bos_prefixed_documents_in_order(tok, shards):
    d, docs_all = shards
    B, T = 2, 16
    loader = PretrainLoader(tok, DocumentSource.from_paths([d]), B, T)
    batches = _take(loader, 5)
    expected = []
    for docs in docs_all:
        for doc in docs:
            expected += [tok.bos_token_id] + tok.encode_ordinary(doc)
    for j, (x, y, _) in enumerate(batches):
        start = j * B * T
        ref = np.array(expected[start : start + B * T + 1])
        assert x.flatten().tolist() == ref[:-1].tolist()
        assert y.flatten().tolist() == ref[1:].tolist()


def test_resume_from_any_cursor_matches(tok, shards):
    d, _ = shards
    src = DocumentSource.from_paths([d])
    B, T = 3, 8
    full = _take(PretrainLoader(tok, src, B, T), 12)
    j = random.randrange(1, 11)
    cursor = full[j][2]
    resumed = _take(PretrainLoader(tok, src, B, T, state=cursor), 11 - j)
    assert len(resumed) == 11 - j
    for (x1, y1, c1), (x2, y2, c2) in zip(full[j + 1 :], resumed):
        assert (x1 == x2).all() and (y1 == y2).all() and c1 == c2


def test_epochs_wrap_and_ranks_split_groups(tok, shards):
    d, docs_all = shards
    src = DocumentSource.from_paths([d])
    held = sum(1 + len(tok.encode_ordinary(doc)) for docs in docs_all for doc in docs)
    n = held // (4 * 64) + 2  # more tokens than the shards hold, whatever their random size
    many = _take(PretrainLoader(tok, src, 4, 64), n)
    assert many[0][2]["epoch"] == 0 and many[-1][2]["epoch"] >= 1
    r0 = _take(PretrainLoader(tok, src, 1, 8, rank=0, world_size=2), 3)
    r1 = _take(PretrainLoader(tok, src, 1, 8, rank=1, world_size=2), 3)
    assert r0[0][2]["group"] % 2 == 0 and r1[0][2]["group"] % 2 == 1
    assert not all((a[0] == b[0]).all() for a, b in zip(r0, r1))


def test_text_files_and_errors(tok, tmp_path):
    (tmp_path / "a.txt").write_text("first doc here\n\nsecond doc\n")
    x, y = next(iter(PretrainLoader(tok, DocumentSource.from_paths([tmp_path / "a.txt"]), 1, 4)))
    assert x[0, 0].item() == tok.bos_token_id
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    loader = PretrainLoader(tok, DocumentSource.from_paths([tmp_path / "bad.parquet"]), 1, 4)
    with pytest.raises(TextSourceError, match="bad.parquet: parquet shard has no 'text' column"):
        next(iter(loader))
    with pytest.raises(TextSourceError, match="no such file"):
        DocumentSource.from_paths([tmp_path / "missing"])


def test_download_honours_hf_endpoint(tmp_path, monkeypatch):
    served = tmp_path / "served" / "datasets" / "org" / "ds" / "resolve" / "main"
    served.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["hello world"]}), served / "shard_00003.parquet")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert shard_url(3, "org/ds").startswith("http://127.0.0.1")
        [path] = download_shards([3], tmp_path / "data", repo="org/ds")
        assert pq.read_table(path).column("text").to_pylist() == ["hello world"]
        with pytest.raises(RustchatError, match="could not download"):
            download_shards([4], tmp_path / "data", repo="org/ds", retries=1)
        assert not list((tmp_path / "data").glob("*.part"))
    finally:
        server.shutdown()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request's Authorization header; `self.server.respond(handler)` answers."""

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        self.server.respond(self)

    def log_message(self, *args):
        pass


def _serve(respond):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen, server.respond = [], respond
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _parquet_bytes(tmp_path, texts):
    pq.write_table(pa.table({"text": texts}), tmp_path / "src.parquet")
    return (tmp_path / "src.parquet").read_bytes()


def test_download_token_stays_on_its_host(tmp_path, monkeypatch):
    body = _parquet_bytes(tmp_path, ["hello cdn"])

    def cdn(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    cdn_server = _serve(cdn)

    def hub(h):  # like the hub: a same-host hop, then a 302 to the CDN on another host
        h.send_response(302)
        target = (
            f"http://localhost:{cdn_server.server_address[1]}/blob"
            if h.path.startswith("/again")
            else "/again" + h.path
        )
        h.send_header("Location", target)
        h.send_header("Content-Length", "0")
        h.end_headers()

    hub_server = _serve(hub)
    token = f"hf_{random.getrandbits(64):x}"
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub_server.server_address[1]}")
        monkeypatch.setenv("HF_TOKEN", token)
        [path] = download_shards([7], tmp_path / "data", repo="org/ds", retries=1)
        assert pq.read_table(path).column("text").to_pylist() == ["hello cdn"]
    finally:
        hub_server.shutdown()
        cdn_server.shutdown()
    # the hub (both hops on 127.0.0.1) got the token; the other host (localhost) never did
    assert [auth for _, auth in hub_server.seen] == [f"Bearer {token}"] * 2
    assert cdn_server.seen == [("/blob", None)]


@pytest.mark.parametrize("declared", [True, False])
def test_short_download_leaves_no_shard(tmp_path, monkeypatch, declared):
    body = _parquet_bytes(tmp_path, [f"doc {i} " * 50 for i in range(200)])

    def cut(h):  # promises the whole file (or says nothing) and closes halfway
        h.send_response(200)
        if declared:
            h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])
        h.wfile.flush()
        h.close_connection = True

    server = _serve(cut)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(RustchatError, match="could not download .*shard_00002.parquet"):
            download_shards([2], tmp_path / "data", repo="org/ds", retries=1)
    finally:
        server.shutdown()
    assert len(server.seen) == 1
    assert list((tmp_path / "data").iterdir()) == []  # neither a shard nor a temp file
