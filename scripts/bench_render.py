"""Conversation rendering speed (Rust batch vs the Python+tiktoken reference) and the padding
that packing saves over plain SFT padding.

    python scripts/bench_render.py [--corpus FILE] [--tokenizer DIR] [--n 20000]

Conversations are synthetic but shaped like SmolTalk: lognormal token lengths (median ~400,
long tail past 2048), 1-6 exchanges, some system prompts, some assistant turns with python
tool parts; the text is paragraphs of the corpus file, or else English docstrings and code
from this Python's standard library. With --corpus a 65,536-id tokenizer is trained on it
(or loaded with --tokenizer); otherwise a smaller one is trained on the stdlib text.
"""

import argparse
import ast
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import rustchat  # noqa: E402
from rustchat.conversation import collate_sft, pack_rows, render_batch  # noqa: E402
from ref_render import RefRenderer, make_encoding  # noqa: E402


def stdlib_texts(limit_chars: int) -> tuple[list[str], list[str]]:
    """(English paragraphs from docstrings, code snippets) of the stdlib's .py files."""
    prose, code, size = [], [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            src = p.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    prose.extend(x.strip() for x in doc.split("\n\n") if len(x.strip()) > 40)
        code.extend(x for x in src.split("\n\n") if 40 < len(x) < 1500)
        size += len(src)
        if size >= limit_chars:
            break
    return prose, code


def corpus_texts(path: str, limit_chars: int) -> tuple[list[str], list[str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(limit_chars)
    paras = [x.strip() for x in text.split("\n\n") if len(x.strip()) > 40]
    if len(paras) < 100:  # one paragraph per line
        paras = [x.strip() for x in text.split("\n") if len(x.strip()) > 40]
    _, code = stdlib_texts(5_000_000)
    return paras, code


def make_conversations(n: int, prose: list[str], code: list[str], chars_per_token: float, rng: random.Random):
    def text(chars: int) -> str:
        out, size = [], 0
        while size < chars:
            p = rng.choice(prose)
            out.append(p)
            size += len(p) + 2
        return "\n\n".join(out)[: max(chars, 1)]

    convs = []
    for _ in range(n):
        tokens = min(rng.lognormvariate(np.log(400), 0.8), 6000)
        chars = int(tokens * chars_per_token)
        turns = min(1 + int(rng.expovariate(0.7)), 6)
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": text(rng.randint(40, 300))})
        per_turn = max(chars // turns, 20)
        for _ in range(turns):
            msgs.append({"role": "user", "content": text(int(per_turn * rng.uniform(0.1, 0.4)))})
            answer = text(int(per_turn * rng.uniform(0.6, 0.9)))
            if rng.random() < 0.15:
                a, b = rng.randint(1, 10**6), rng.randint(1, 999)
                expr = rng.choice([f"{a}*{b}", f"{a}+{b}", rng.choice(code)[:400]])
                parts = [
                    {"type": "text", "text": answer[: len(answer) // 2]},
                    {"type": "python", "text": expr},
                    {"type": "python_output", "text": str(a * b)},
                    {"type": "text", "text": answer[len(answer) // 2 :]},
                ]
                msgs.append({"role": "assistant", "content": parts})
            else:
                msgs.append({"role": "assistant", "content": answer})
        convs.append({"messages": msgs})
    return convs


def best_of(f, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="text file: conversation text, and a 65,536-id tokenizer is trained on it")
    ap.add_argument("--tokenizer", help="load this tokenizer directory instead of training one")
    ap.add_argument(
        "--vocab", type=int, default=None, help="vocab size to train (default 65536 with --corpus, else 8192)"
    )
    ap.add_argument("--n", type=int, default=20000, help="conversations")
    ap.add_argument("--ref-seconds", type=float, default=5.0, help="time budget for the reference renderer")
    ap.add_argument("--threads", type=int, default=None, help="rayon threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    if args.corpus:
        prose, code = corpus_texts(args.corpus, 400_000_000)
    else:
        prose, code = stdlib_texts(30_000_000)
    if args.tokenizer:
        tok = rustchat.Tokenizer.load(args.tokenizer)
    else:
        vocab = args.vocab or (65536 if args.corpus else 8192)
        tok = rustchat.Tokenizer.train(prose + code, vocab_size=vocab, max_chars=300_000_000)
    enc = make_encoding(tok)
    sample = "\n\n".join(prose[:2000])
    cpt = len(sample) / max(len(enc.encode_ordinary(sample)), 1)
    convs = make_conversations(args.n, prose, code, cpt, rng)
    print(
        f"setup {time.perf_counter() - t0:.1f}s: vocab {tok.vocab_size}, {len(prose)} paragraphs, "
        f"{cpt:.2f} chars/token, {len(convs)} conversations, cores {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )

    # --- speed: reference (one conversation at a time, tiktoken) vs Rust batch, same conversations
    ref = RefRenderer(enc)
    n_ref, ref_tokens, t0 = 0, 0, time.perf_counter()
    while n_ref < len(convs) and time.perf_counter() - t0 < args.ref_seconds:
        ref_tokens += len(ref.render(convs[n_ref])[0])
        n_ref += 1
    ref_time = time.perf_counter() - t0
    sub = convs[:n_ref]
    rust_sub = best_of(lambda: render_batch(tok, sub, num_threads=args.threads), 3)
    batch = render_batch(tok, convs, num_threads=args.threads)
    rust_all = best_of(lambda: render_batch(tok, convs, num_threads=args.threads), 3)
    one_thread = best_of(lambda: render_batch(tok, sub, num_threads=1), 3)
    single = best_of(lambda: [tok.render_conversation(c) for c in sub], 1)
    for i in range(0, n_ref, max(n_ref // 200, 1)):  # spot check
        ids, mask = ref.render(convs[i])
        assert batch[i][0].tolist() == ids and batch[i][1].tolist() == mask, f"mismatch on conversation {i}"
    ref_tps = ref_tokens / ref_time
    print("\nrendering with masks (max_tokens=2048), tokens/s:")
    print(f"  python+tiktoken reference, 1 core : {ref_tps / 1e6:7.2f} M  ({n_ref} conversations, {ref_tokens} tokens)")
    print(
        f"  rust render_batch, same convs     : {ref_tokens / rust_sub / 1e6:7.2f} M  ratio {ref_tokens / rust_sub / ref_tps:5.1f}x"
    )
    print(
        f"  rust render_batch, same, 1 thread : {ref_tokens / one_thread / 1e6:7.2f} M  ratio {ref_tokens / one_thread / ref_tps:5.1f}x"
    )
    print(
        f"  rust render_batch, all {len(convs):6d}     : {len(batch.ids) / rust_all / 1e6:7.2f} M  ratio {len(batch.ids) / rust_all / ref_tps:5.1f}x"
    )
    print(
        f"  rust render_conversation, one by one: {ref_tokens / single / 1e6:5.2f} M  ratio {ref_tokens / single / ref_tps:5.1f}x"
    )

    # --- padding: plain SFT collation at batch size B vs packing into rows of T positions
    lens = batch.lengths
    print(
        f"\nlengths (tokens, after max_tokens=2048): median {int(np.median(lens))}, mean {lens.mean():.0f}, "
        f"p90 {int(np.percentile(lens, 90))}, max {lens.max()}, at cap {np.mean(lens >= 2048):.1%}"
    )
    order = np.random.default_rng(args.seed).permutation(len(convs))
    pad_id = tok.encode_special("<|assistant_end|>")
    print("\npadding fraction (share of positions that are padding) and positions computed:")
    print(f"  {'method':44s} {'pad':>7s} {'positions':>10s}")
    for b in (4, 8, 16, 32):
        pad = tot = 0
        for s in range(0, len(order) - b + 1, b):
            rows = [batch[i] for i in order[s : s + b]]
            inputs, _ = collate_sft(rows, pad_id)
            used = sum(len(r[0]) - 1 for r in rows)
            pad += inputs.size - used
            tot += inputs.size
        print(f"  {f'collate_sft, batch {b} (random order)':44s} {pad / tot:7.1%} {tot / 1e6:9.2f}M")
    for t in (2048,):
        for policy in ("best_fit", "next_fit"):
            for pool in (64, 256, len(convs)):
                pad = tot = 0
                t0 = time.perf_counter()
                for s in range(0, len(order), pool):
                    p = pack_rows(render_slice(batch, order[s : s + pool]), t, pad_id=pad_id, policy=policy)
                    pad += p.padding_fraction * p.inputs.size
                    tot += p.inputs.size
                dt = time.perf_counter() - t0
                name = f"pack_rows {policy}, T={t}, pools of {min(pool, len(convs))}"
                print(f"  {name:44s} {pad / tot:7.1%} {tot / 1e6:9.2f}M  ({dt * 1e3:.0f} ms)")


def render_slice(batch, idx):
    return [batch[int(i)] for i in idx]


if __name__ == "__main__":
    main()
