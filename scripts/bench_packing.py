"""How much BOS-aligned best-fit packing crops, and how fast it runs.

    python scripts/bench_packing.py [--batches 64] [--bpe-vocab 8192]

On the tiny preset's corpus (docstrings and code of this Python's standard library, documents
of at most 8,000 chars): rows of 512 with the preset's byte-level tokenizer, and rows of 2048
(nanochat's context) with a BPE tokenizer trained on the same text. Best-fit rows are never
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
    return {"crop": loader.crop_share(), "rows_per_s": (batches - 1) * batch / dt,
            "tokens": loader.placed_tokens + loader.cropped_tokens}


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
            print(f"{name:26s} T={T:5d}: cropped {100 * r['crop']:.1f}% of {r['tokens']:,} document tokens, "
                  f"padding 0%, {r['rows_per_s']:,.0f} rows/s (tokenizing thread included)")


if __name__ == "__main__":
    main()
