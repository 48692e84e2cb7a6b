"""Throughput and latency of `rustchat serve` for 1, 8 and 64 concurrent streaming clients.

Starts `rustchat serve` in its own process on 127.0.0.1 (the tiny preset's shape, depth 2 and
context 256, with random weights and a tokenizer trained here on this Python's standard
library; or a trained checkpoint with --base-dir), then for each concurrency level N runs N
clients that each send --requests streamed /v1/chat/completions in a row. Prints requests/s,
generated tokens/s, p50/p99 request latency, p50 time to first token (of the median of
--rounds rounds) and the slowest /health answer seen in any round, then the tokens/s of 8 and
64 clients as a ratio to 1 client (continuous batching shares each forward pass between the
running requests), and the slowest /health answer against its target (HEALTH_TARGET_MS: the
server stays responsive under load; tests check only that it answers, never how fast).

    python scripts/bench_serve.py [--base-dir DIR] [--max-tokens 32] [--requests 8] [--rounds 3] [--threads N]
                                  [--levels 1,8,64,200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import torch

from rustchat import Tokenizer
from rustchat.checkpoint import save_checkpoint, stage_dir
from rustchat.model import GPT, GPTConfig


HEALTH_TARGET_MS = 1000.0  # /health answers within 1 s even with 200 streaming clients


def tiny_base_dir(root: Path) -> Path:
    """A base dir with a 4096-token tokenizer and a random depth-2 sft checkpoint."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)[:3_000_000]
    tok = Tokenizer.train([text[i : i + 10_000] for i in range(0, len(text), 10_000)], vocab_size=4096)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tok.vocab_size, sequence_len=256))
    save_checkpoint(stage_dir("sft", 2, root), 0, model, None, {})
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def one_request(http, base: str, model: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, generated tokens) of one streamed request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me about request {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return time.perf_counter() - t0, first or 0.0, tokens


async def run_level(base: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    results, health = [], []
    stop = asyncio.Event()

    async def client(http, c):
        for r in range(requests):
            results.append(await one_request(http, base, model, c * requests + r, max_tokens))

    async def probe(http):
        while not stop.is_set():
            t0 = time.perf_counter()
            (await http.get(base + "/health")).raise_for_status()
            health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)

    async with (
        httpx.AsyncClient(trust_env=False, timeout=600, limits=limits) as http,
        httpx.AsyncClient(trust_env=False, timeout=600) as health_http,
    ):
        prober = asyncio.ensure_future(probe(health_http))
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        await prober
    lat = [r[0] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "req_per_s": len(results) / wall,
        "tok_per_s": sum(r[2] for r in results) / wall,
        "p50_s": percentile(lat, 0.5),
        "p99_s": percentile(lat, 0.99),
        "ttft_p50_s": percentile([r[1] for r in results], 0.5),
        "health_max_ms": 1000 * max(health, default=0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", help="serve this base dir's sft checkpoint instead of a random tiny model")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    ap.add_argument("--requests", type=int, default=8, help="requests per client, one after another")
    ap.add_argument("--levels", default="1,8,64", help="client counts")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all levels (the median round is shown)")
    ap.add_argument("--threads", type=int, help="torch threads of the server (OMP_NUM_THREADS; default: torch's)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="rustchat_bench_serve_") as tmp:
        root = Path(args.base_dir) if args.base_dir else tiny_base_dir(Path(tmp))
        port = free_port()
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        log = open(Path(tmp) / "serve.log", "w+")  # not a pipe: a full pipe would block the server's logging
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rustchat.cli",
                "serve",
                "--base-dir",
                str(root),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--max-batch",
                str(max(levels)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    sys.exit(f"rustchat serve exited: {(Path(tmp) / 'serve.log').read_text()[-2000:]}")
                try:
                    info = httpx.get(base + "/health", timeout=2, trust_env=False).json()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        sys.exit("rustchat serve did not answer within 120 s")
                    time.sleep(0.5)
            # the id the server serves (a trained checkpoint's names its stage, depth and step)
            model = httpx.get(base + "/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"]
            asyncio.run(run_level(base, model, 1, 2, args.max_tokens))  # warm-up
            print(
                f"# bench_serve: {info['model']} on {info['device']}, {args.max_tokens} tokens per reply, "
                f"{args.requests} requests per client; {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} CPUs, server threads {args.threads or 'default'}, torch {torch.__version__}"
            )
            print("| clients | requests | wall s | req/s | tokens/s | p50 s | p99 s | TTFT p50 s | /health max ms |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            # levels take turns, round after round, so a burst of load elsewhere on the machine
            # hits every level alike; each level's row is its median-throughput round
            runs = {n: [] for n in levels}
            for _ in range(args.rounds):
                for n in levels:
                    runs[n].append(asyncio.run(run_level(base, model, n, args.requests, args.max_tokens)))
            rows = {}
            for n in levels:
                r = rows[n] = sorted(runs[n], key=lambda x: x["tok_per_s"])[len(runs[n]) // 2]
                print(
                    f"| {n} | {r['requests']} | {r['wall_s']:.2f} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
                    f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['ttft_p50_s']:.3f} | "
                    f"{max(x['health_max_ms'] for x in runs[n]):.0f} |",
                    flush=True,
                )
            worst = max(x["health_max_ms"] for n in levels for x in runs[n])
            print(
                f"/health slowest answer: {worst:.0f} ms (target < {HEALTH_TARGET_MS:.0f} ms: "
                f"{'met' if worst < HEALTH_TARGET_MS else 'MISSED'})"
            )
            if 1 in rows:
                for n in levels:
                    if n != 1:
                        ratio = rows[n]["tok_per_s"] / rows[1]["tok_per_s"]
                        print(f"aggregate tokens/s, {n} clients vs 1: {ratio:.2f}x")
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()


if __name__ == "__main__":
    main()
