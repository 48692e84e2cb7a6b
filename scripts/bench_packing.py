"""How much BOS-aligned best-fit packing crops, and how fast it runs.

    python scripts/bench_packing.py [--batches 64] [--bpe-vocab 8192]

On the tiny preset's corpus (docstrings and code of this Python's standard library, documents
of at most 8,000 chars): rows of 512 with the preset's byte-level tokenizer, and rows of 2048
(nanochat's context, 48abd7d and 92d63d4) with a BPE tokenizer trained on the same text. Best-fit rows are never
padded; the cost is the share of document tokens dropped by crops. Prints one line per setting.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from rustchat.data.bestfit import BUFFER_DOCS, REFILL_DOCS, BestFitLoader  # noqa: E402
from rustchat.data.pretrain import DocumentSource  # noqa: E402
from rustchat.data.textsource import iter_documents  # noqa: E402
from rustchat.tasks.stdlib_text import write_corpus  # noqa: E402
from rustchat.tokenizer import Tokenizer  # noqa: E402


def measure(tok, src, batch: int, seq_len: int, batches: int) -> dict:
    loader = BestFitLoader(tok, src, batch, seq_len, buffer_docs=BUFFER_DOCS, refill_docs=REFILL_DOCS)
    it = iter(loader)
    next(it)  # the first batch waits for the buffer's first 1,000 documents
    t0 = time.perf_counter()
    for _ in range(batches - 1):
        next(it)
    dt = time.perf_counter() - t0
    it.close()  # stops the tokenizing thread before the interpreter exits
    return {
        "crop": loader.crop_share(),
        "rows_per_s": (batches - 1) * batch / dt,
        "tokens": loader.placed_tokens + loader.cropped_tokens,
    }


def python_bestfit(docs, rows: int, cap: int, buffer_docs: int, refill: int) -> list:
    """nanochat's algorithm in plain Python (92d63d4's loader's inner loop), for the speed comparison."""
    buf, out, nxt = [], [], 0
    for _ in range(rows):
        row = []
        while len(row) < cap:
            while len(buf) < buffer_docs:
                buf.extend(docs[nxt : nxt + refill])
                nxt += refill
            rem = cap - len(row)
            best, best_len = -1, 0
            for i, d in enumerate(buf):
                if best_len < len(d) <= rem:
                    best, best_len = i, len(d)
            if best >= 0:
                row += buf.pop(best)
            else:
                row += buf.pop(min(range(len(buf)), key=lambda i: len(buf[i])))[:rem]
        out.append(row)
    return out


def packer_speed(tok, texts: list[str], rows: int, seq_len: int) -> tuple[float, float]:
    """Rows/s of the Rust packer and of plain Python on the same pre-tokenized documents."""
    import numpy as np

    from rustchat._core import BestFitPacker

    ids, offs = tok.encode_batch_numpy(texts, prepend=tok.bos_token_id)
    docs = [ids[offs[i] : offs[i + 1]].tolist() for i in range(len(texts))]
    t0 = time.perf_counter()
    want = python_bestfit(docs, rows, seq_len + 1, BUFFER_DOCS, REFILL_DOCS)
    t_py = time.perf_counter() - t0
    p, nxt, t0 = BestFitPacker(seq_len + 1, BUFFER_DOCS), 0, time.perf_counter()
    while not p.fill(rows):
        k = min(REFILL_DOCS, len(texts) - nxt)
        p.push(
            ids[offs[nxt] : offs[nxt + k]].astype("<u4").tobytes(),
            (offs[nxt : nxt + k + 1] - offs[nxt]).tobytes(),
            np.arange(nxt, nxt + k, dtype="<u8").tobytes(),
        )
        nxt += k
    got = np.frombuffer(p.take(rows), dtype="<u4").reshape(rows, seq_len + 1)
    t_rs = time.perf_counter() - t0
    assert got.tolist() == want, "the Rust packer and the plain algorithm disagree"
    return rows / t_rs, rows / t_py


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=64, help="batches of 32 rows per setting")
    ap.add_argument("--bpe-vocab", type=int, default=8192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        train = write_corpus(Path(d) / "tiny_data")["train"]
        src = DocumentSource.from_paths([train])
        docs = list(iter_documents([train]))
        print(f"corpus: {len(docs):,} documents, {sum(map(len, docs)):,} chars")
        byte_tok = Tokenizer.train(docs, 265)
        bpe_tok = Tokenizer.train(docs, args.bpe_vocab, max_chars=20_000_000)
        for name, tok, T in (("byte-level (tiny preset)", byte_tok, 512), (f"BPE {args.bpe_vocab}", bpe_tok, 2048)):
            r = measure(tok, src, 32, T, args.batches)
            print(
                f"{name:26s} T={T:5d}: cropped {100 * r['crop']:.1f}% of {r['tokens']:,} document tokens, "
                f"padding 0%, {r['rows_per_s']:,.0f} rows/s (tokenizing thread included)"
            )
        rust, py = packer_speed(bpe_tok, docs[:20_000], 1024, 2048)
        print(
            f"packing alone, T=2048, 1,024 rows: Rust {rust:,.0f} rows/s, plain Python {py:,.0f} rows/s "
            f"({rust / py:.0f}x), same rows"
        )


if __name__ == "__main__":
    main()
