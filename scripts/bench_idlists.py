"""Ids to Python lists: the cost of building tiktoken's return type from the Rust core's ids.

    python scripts/bench_idlists.py CORPUS.txt [--ids 1000000] [--repeat 15]

Trains a 65,536 vocabulary on the first 20 MB of CORPUS (or loads --tokenizer DIR), takes a
prefix of the corpus that encodes to about --ids ids, and times, in turns (best call counts):
`encode_ordinary` (a list of int), `encode_to_numpy` (the same ids without Python ints: the
difference is the list building), and `encode_batch` over the prefix's paragraphs (lists,
then numpy) on one thread. Every list is checked against the numpy ids. Run it once per
build to compare builds; each result is freed after the clock stops.
"""

from __future__ import annotations

import argparse
import time

from rustchat import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("--ids", type=int, default=1_000_000, help="about this many ids per call")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--tokenizer", help="a saved tokenizer directory instead of training one")
    args = ap.parse_args()

    with open(args.corpus, encoding="utf-8", errors="replace") as f:
        corpus = f.read(20_000_000)
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        tok = Tokenizer.train(corpus.split("\n\n"), 65536)
    n = len(corpus) * args.ids // max(1, len(tok.encode_to_numpy(corpus)))
    text = corpus[:n]
    docs = text.split("\n\n")
    ref = tok.encode_to_numpy(text)
    assert tok.encode_ordinary(text) == ref.tolist()
    flat, offs = tok.encode_batch_numpy(docs, num_threads=1)
    assert tok.encode_batch(docs, num_threads=1) == [flat[a:b].tolist() for a, b in zip(offs[:-1], offs[1:])]

    calls = {
        "encode_ordinary (list)": lambda: tok.encode_ordinary(text),
        "encode_to_numpy": lambda: tok.encode_to_numpy(text),
        "encode_batch, 1 thread (lists)": lambda: tok.encode_batch(docs, num_threads=1),
        "encode_batch_numpy, 1 thread": lambda: tok.encode_batch_numpy(docs, num_threads=1),
    }
    best = {k: float("inf") for k in calls}
    for _ in range(args.repeat):
        for name, f in calls.items():
            t0 = time.perf_counter()
            result = f()
            best[name] = min(best[name], time.perf_counter() - t0)
            del result
    print(f"{len(ref):,} ids, {len(text.encode()) / 1e6:.1f} MB, {len(docs):,} paragraphs; best of {args.repeat}")
    for name, t in best.items():
        print(f"  {name:32s} {t * 1e3:8.1f} ms")
    for lists, arrays in (
        ("encode_ordinary (list)", "encode_to_numpy"),
        ("encode_batch, 1 thread (lists)", "encode_batch_numpy, 1 thread"),
    ):
        extra = best[lists] - best[arrays]
        print(
            f"  lists over numpy, {lists.split(' (')[0].split(',')[0]:15s} {extra * 1e3:6.1f} ms ({extra / len(ref) * 1e9:.1f} ns per id)"
        )


if __name__ == "__main__":
    main()
