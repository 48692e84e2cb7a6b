"""The tokenizer stage: `rustchat tok train` (BPE on text files, streamed) and `rustchat tok eval`
(compression in bytes per token by kind of text, ours vs GPT-4's cl100k, GPT-4o's o200k and
GPT-2 when available; higher bytes/token = better compression).

The built-in samples are short passages written for this table plus real source code from
the Python standard library; `train` / `val` rows come from files the caller names.
"""

from __future__ import annotations

import inspect
import json
import textwrap
import time
from pathlib import Path

from tqdm import tqdm

from .common import RustchatError, check_writable, get_base_dir
from .config import TokEvalConfig, TokTrainConfig
from .data.textsource import iter_documents, list_files
from .tokenizer import Tokenizer, load_tokenizer

NEWS = """\
City officials announced on Tuesday that the riverside bridge, closed for repairs since last
spring, will reopen to traffic next month. The mayor said the project came in two million
dollars under budget after engineers found the original steel supports in better shape than
expected. Commuters who have faced detours of up to forty minutes welcomed the news, though
local businesses near the bridge warned that months of reduced foot traffic had already
forced several shops to close. The council will vote on a relief fund on March 14."""

MATH = r"""\
Let $f:\mathbb{R}\to\mathbb{R}$ be differentiable with $f'(x) = 2x f(x)$ and $f(0)=1$.
Separating variables gives $\int \frac{df}{f} = \int 2x\,dx$, hence $\ln|f| = x^2 + C$ and
$f(x) = e^{x^2}$. For the series $\sum_{n=1}^{\infty} \frac{1}{n^2} = \frac{\pi^2}{6}$, the
partial sums satisfy $S_N \geq \frac{\pi^2}{6} - \frac{1}{N}$. Solve $3x^2 - 12x + 9 = 0$:
$x = \frac{12 \pm \sqrt{144 - 108}}{6} = \frac{12 \pm 6}{6}$, so $x \in \{1, 3\}$."""

SCIENCE = """\
Photosynthesis in C4 plants concentrates carbon dioxide around the enzyme RuBisCO by first
fixing it into a four-carbon acid in mesophyll cells, then releasing it in bundle-sheath
cells. This spatial separation suppresses photorespiration, which is why maize and sugarcane
outperform C3 crops in hot, dry climates. Measurements of the 13C/12C isotope ratio
(delta-13C near -12 per mil for C4 versus -27 per mil for C3) let ecologists estimate the
share of C4 grasses in ancient diets from tooth enamel."""

CHINESE = """\
春天来了，公园里的花都开了。很多人周末带着孩子去散步、放风筝。气象台预报说，下周气温会继续
回升，最高可以达到二十五度。专家提醒大家注意防晒，多喝水，避免长时间在阳光下活动。"""


def samples() -> dict[str, str]:
    code = inspect.getsource(textwrap) + inspect.getsource(json.decoder)
    return {"news": NEWS, "chinese": CHINESE, "code": code, "math": MATH, "science": SCIENCE}


def _reference_encoders():
    """name -> encode function for the comparison tokenizers available offline (GPT-4's
    cl100k and GPT-4o's o200k ship inside the `bpe-openai` package; GPT-2 is used when
    tiktoken can load it, which needs its download cache or the network)."""
    out = {}
    try:  # optional peers: the table leaves out what is not installed
        import bpe_openai  # optional peers
        import tiktoken  # optional peer
    except ImportError:
        return out
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base"), ("gpt4o", "o200k_base")):
        try:
            e = bpe_openai.get_encoding(name)
            enc = tiktoken.Encoding(label, pat_str=e._pat_str, mergeable_ranks=e._mergeable_ranks, special_tokens={})
            out[label] = enc.encode_ordinary
        except Exception:  # noqa: BLE001 - a comparison column that cannot load is left out
            continue
    return out


def evaluate(tok, extra: dict[str, str] | None = None) -> list[dict]:
    """Rows of {kind, bytes, ours, gpt2, gpt4, ...}: bytes per token for each tokenizer."""
    texts = {**samples(), **(extra or {})}
    refs = _reference_encoders()
    rows = []
    for kind, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        row = {"kind": kind, "bytes": n_bytes, "ours": n_bytes / max(1, len(tok.encode_ordinary(text)))}
        for label, enc in refs.items():
            row[label] = n_bytes / max(1, len(enc(text)))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [c for c in ("ours", "gpt2", "gpt4", "gpt4o") if rows and c in rows[0]]
    lines = [f"{'kind':10s} {'bytes':>9s} " + " ".join(f"{c + ' B/tok':>12s}" for c in cols)]
    for r in rows:
        line = f"{r['kind']:10s} {r['bytes']:9d} " + " ".join(f"{r[c]:12.2f}" for c in cols)
        if "gpt4" in r:
            line += f"   ours vs gpt4 {100 * (r['ours'] / r['gpt4'] - 1):+6.1f}%"
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


# ----------------------------------------------------------------------------- the commands
def train_tokenizer(cfg: TokTrainConfig) -> Tokenizer:
    """Train on the documents of cfg.input, save to cfg.out (default <base dir>/tokenizer)."""
    files = list_files(cfg.input)
    out = check_writable(Path(cfg.out) if cfg.out else get_base_dir(create=False) / "tokenizer", "--out")
    total = sum(f.stat().st_size for f in files)
    if cfg.max_chars:
        total = min(total, cfg.max_chars)
    read = [0]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="counting chunks", disable=cfg.quiet, mininterval=0.5)
    last = [0]

    def progress(_chars_seen):
        bar.update(read[0] - last[0])
        last[0] = read[0]

    t0 = time.time()
    tok = Tokenizer.train(
        iter_documents(cfg.input, progress=read),
        cfg.vocab_size,
        doc_cap=cfg.doc_cap or None,
        max_chars=cfg.max_chars,
        progress=progress,
        verbose=not cfg.quiet,
    )
    bar.close()
    tok.save(out)
    print(f"trained vocab {tok.vocab_size} on {read[0] / 1e6:.1f} M chars in {time.time() - t0:.1f} s -> {out}")
    return tok


def evaluate_tokenizer(cfg: TokEvalConfig) -> list[dict]:
    """Print and return the bytes-per-token table of the trained (or given) tokenizer."""
    tok = load_tokenizer(directory=cfg.tokenizer)
    extra = {}
    for spec in cfg.text or []:
        kind, sep, path = spec.partition("=")
        if not sep:
            raise RustchatError(f"--text expects KIND=PATH, got {spec!r}")
        p = Path(path)
        if not p.is_file():
            raise RustchatError(f"--text {kind}: no such file {p}")
        with open(p, encoding="utf-8", errors="replace") as f:
            extra[kind] = f.read(cfg.max_bytes)
    print(f"tokenizer: {tok} ({cfg.tokenizer or 'the base dir'})")
    rows = evaluate(tok, extra)
    print(format_table(rows))
    return rows
