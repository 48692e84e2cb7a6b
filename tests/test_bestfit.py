"""BOS-aligned best-fit packing: the Rust packer and the loader against a plain-Python
reference of nanochat's algorithm (its loader at 92d63d4) on random documents, exact resume, and the rank split."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rustchat import Tokenizer
from rustchat._core import BestFitPacker
from rustchat.common import RustchatError
from rustchat.data.bestfit import BestFitLoader
from rustchat.data.pretrain import DocumentSource, PretrainLoader

from helpers import with_states

WORDS = "the cat sat on a mat while dogs ran far away from home and 42 birds sang songs".split()


def reference_rows(chunks, n_rows: int, row_capacity: int, buffer_size: int):
    """nanochat 92d63d4's loader, plainly: before each placement top the buffer up (a chunk of documents
    at a time) to `buffer_size`; take the largest document that fits the space left, else crop
    the shortest to fill the row. Returns the rows and the cropped token count."""
    chunks = iter(chunks)
    buf, rows, cropped = [], [], 0
    for _ in range(n_rows):
        row = []
        while len(row) < row_capacity:
            while len(buf) < buffer_size:
                buf.extend(next(chunks))
            remaining = row_capacity - len(row)
            best, best_len = -1, 0
            for i, doc in enumerate(buf):
                if best_len < len(doc) <= remaining:
                    best, best_len = i, len(doc)
            if best >= 0:
                row += buf.pop(best)
            else:
                shortest = min(range(len(buf)), key=lambda i: len(buf[i]))
                doc = buf.pop(shortest)
                row += doc[:remaining]
                cropped += len(doc) - remaining
        rows.append(row)
    return rows, cropped


def _push(packer, docs, first_tag=0):
    ids = [t for d in docs for t in d]
    offs = [0]
    for d in docs:
        offs.append(offs[-1] + len(d))
    packer.push(
        np.array(ids, dtype="<u4").tobytes(),
        np.array(offs, dtype="<i8").tobytes(),
        np.arange(first_tag, first_tag + len(docs), dtype="<u8").tobytes(),
    )


def test_packer_matches_the_reference_on_random_lengths():
    rng = random.Random()
    for _ in range(30):
        cap = rng.randint(4, 200)
        buffer_size, chunk = rng.randint(1, 40), rng.randint(1, 16)
        n_docs = 4000
        # a mix of short documents and documents longer than a row
        docs = []
        for _ in range(n_docs):
            start = rng.randrange(1 << 20)  # distinct ids, so a misplaced document shows
            docs.append(list(range(start, start + rng.choice([rng.randint(1, cap), rng.randint(1, 3 * cap)]))))
        chunks = [docs[i : i + chunk] for i in range(0, n_docs, chunk)]
        n_rows = rng.randint(1, 30)
        want, cropped = reference_rows(chunks, n_rows, cap, buffer_size)
        p = BestFitPacker(cap, buffer_size)
        fed, got = 0, []
        while len(got) < n_rows:
            k = rng.randint(1, n_rows - len(got))
            while not p.fill(k):
                _push(p, chunks[fed], fed * chunk)
                fed += 1
            got += np.frombuffer(p.take(k), dtype="<u4").reshape(k, cap).tolist()
        assert got == want
        assert p.cropped_tokens == cropped and p.placed_tokens == n_rows * cap
    with pytest.raises(ValueError):
        BestFitPacker(0, 1)


@pytest.fixture(scope="module")
def tok():
    rnd = random.Random()
    return Tokenizer.train([" ".join(rnd.choice(WORDS) for _ in range(60)) for _ in range(100)], vocab_size=300)


@pytest.fixture
def shards(tmp_path):
    """3 parquet shards of random documents (some longer than a row), small row groups."""
    rnd = random.Random()
    groups = []  # documents per row group, in file order
    for i in range(3):
        docs = [
            " ".join(rnd.choice(WORDS) for _ in range(rnd.choice([rnd.randint(0, 12), rnd.randint(1, 90)])))
            for _ in range(rnd.randint(20, 50))
        ]
        size = rnd.randint(5, 12)
        pq.write_table(pa.table({"text": docs}), tmp_path / f"shard_{i:05d}.parquet", row_group_size=size)
        groups += [docs[k : k + size] for k in range(0, len(docs), size)]
    return tmp_path, groups


def _take(loader, n):
    out = []
    for x, y, st in with_states(loader):
        out.append((x.clone(), y.clone(), st))
        if len(out) == n:
            break
    return out


def _chunks(tok, groups, refill, rank=0, world=1, epochs=4):
    """This rank's documents, BOS first, fed as the loader feeds them: `refill` at a time from
    the start of each of its row groups (group g belongs to rank g % world), epochs repeating."""
    for _ in range(epochs):
        for g, docs in enumerate(groups):
            if g % world != rank:
                continue
            ids = [[tok.bos_token_id] + tok.encode_ordinary(d) for d in docs]
            for k in range(0, len(ids), refill):
                yield ids[k : k + refill]


@pytest.mark.parametrize("world", [1, 2])
def test_loader_matches_the_reference_and_rows_start_at_bos(tok, shards, world):
    d, groups = shards
    rng = random.Random()
    B, T = rng.randint(1, 4), rng.randint(8, 40)
    buffer_docs, refill = rng.randint(1, 30), rng.randint(1, 9)
    rank = rng.randrange(world)
    loader = BestFitLoader(
        tok,
        DocumentSource.from_paths([d]),
        B,
        T,
        buffer_docs=buffer_docs,
        refill_docs=refill,
        rank=rank,
        world_size=world,
    )
    n = 12
    got = _take(loader, n)
    want, cropped = reference_rows(_chunks(tok, groups, refill, rank, world), n * B, T + 1, buffer_docs)
    for j, (x, y, _) in enumerate(got):
        rows = want[j * B : (j + 1) * B]
        assert x.tolist() == [r[:-1] for r in rows] and y.tolist() == [r[1:] for r in rows]
        assert (x[:, 0] == tok.bos_token_id).all()  # every row starts at a document
    assert loader.cropped_tokens == cropped and 0 <= loader.crop_share() < 1


def test_resume_gives_the_same_batches(tok, shards):
    d, _ = shards
    rng = random.Random()
    src = DocumentSource.from_paths([d])
    kw = dict(buffer_docs=rng.randint(5, 40), refill_docs=rng.randint(1, 9))
    B, T = 2, rng.randint(8, 32)
    full = _take(BestFitLoader(tok, src, B, T, **kw), 16)
    for j in sorted(rng.sample(range(15), 3)):
        state = json.loads(json.dumps(full[j][2]))  # as a checkpoint stores it
        assert state["packing"] == "bos_bestfit" and state["buffer"]
        resumed = _take(BestFitLoader(tok, src, B, T, state=state, **kw), 15 - j)
        for (x1, y1, s1), (x2, y2, s2) in zip(full[j + 1 :], resumed):
            assert (x1 == x2).all() and (y1 == y2).all() and s1 == s2


def test_a_stream_cursor_is_refused_in_one_line(tok, shards):
    d, _ = shards
    src = DocumentSource.from_paths([d])
    stream_state = _take(PretrainLoader(tok, src, 1, 8), 2)[-1][2]
    with pytest.raises(RustchatError, match="--rules classic"):
        BestFitLoader(tok, src, 1, 8, state=stream_state)


def test_reshard_moves_past_every_rank_and_trains_no_document_twice(tok, shards):
    """A resume on another number of ranks starts every new rank after the furthest group any
    old rank had begun (what the trainer calls when the world size changes)."""
    d, groups = shards
    src = DocumentSource.from_paths([d])
    kw = dict(buffer_docs=5, refill_docs=3)
    old = [_take(BestFitLoader(tok, src, 1, 16, rank=r, world_size=2, **kw), 4)[-1][2] for r in range(2)]
    new = BestFitLoader.reshard(old, 3)
    furthest = max((s["epoch"], s["file"], s["group"]) for s in old)
    assert len(new) == 3 and all(s == new[0] for s in new)
    assert (new[0]["epoch"], new[0]["file"], new[0]["group"]) == (furthest[0], furthest[1], furthest[2] + 1)
    assert new[0]["buffer"] == [] and new[0]["doc"] == 0
    for r in range(3):
        assert len(_take(BestFitLoader(tok, src, 1, 16, rank=r, world_size=3, state=new[r], **kw), 2)) == 2
