"""Plain-Python reference BPE trainer, written from docs/design.md, independent of the Rust core.

Split with the `regex` package (its own engine), count chunks, then repeatedly merge the most
frequent adjacent pair (ties: the smaller pair of ids), recounting from scratch each time.
Like rustchat, a pair whose bytes already exist as a token is skipped. Slow by design: clarity
is the point.
"""

from collections import Counter

import regex


def split_chunks(text: str, pattern: str) -> list[str]:
    return regex.findall(pattern, text)


def train_reference(texts, n_merges: int, pattern: str, doc_cap: int | None = None) -> list[bytes]:
    counts = Counter()
    for t in texts:
        if doc_cap is not None:
            t = t[:doc_cap]
        counts.update(split_chunks(t, pattern))
    words = {tuple(c.encode("utf-8")): n for c, n in counts.items()}
    tokens = [bytes([b]) for b in range(256)]
    existing = set(tokens)
    merges = []
    banned = set()
    while len(merges) < n_merges:
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        best = None
        for p, n in pairs.items():
            if n <= 0 or p in banned:
                continue
            if best is None or n > best[1] or (n == best[1] and p < best[0]):
                best = (p, n)
        if best is None:
            break
        (a, b), _ = best
        new = tokens[a] + tokens[b]
        if new in existing:
            banned.add((a, b))
            continue
        x = len(tokens)
        tokens.append(new)
        existing.add(new)
        merges.append(new)
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(x)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges
