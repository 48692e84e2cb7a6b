"""Helpers shared by several test files: random task rows, local dataset files, a fake
nanochat checkpoint. (Fixtures live in conftest.py.)"""

import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
import torch


def words(rng, n):
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def arc_rows(rng, n):
    rows = []
    for i in range(n):
        k = rng.choice((3, 4, 4, 5))
        labels = list("ABCDE"[:k]) if rng.random() < 0.7 else [str(j + 1) for j in range(k)]
        rows.append(
            {
                "id": f"q{i}",
                "question": f"{i} {words(rng, 6)}?",
                "choices": {"text": [words(rng, 3) for _ in range(k)], "label": labels},
                "answerKey": rng.choice(labels),
            }
        )
    return rows


def mmlu_rows(rng, n):
    return [
        {
            "question": f"{i} {words(rng, 5)}",
            "subject": "x",
            "choices": [words(rng, 2) for _ in range(4)],
            "answer": rng.randrange(4),
        }
        for i in range(n)
    ]


def fake_nanochat_dir(tmp_path, padded_rows, prefix, wte_dtype=torch.float32):
    cfg = {"sequence_len": 32, "vocab_size": 300, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64}
    g = torch.Generator().manual_seed(4)
    C, D, L = 64, 16, 2
    sd = {
        "transformer.wte.weight": torch.randn(padded_rows, C, generator=g).to(wte_dtype),
        "lm_head.weight": torch.randn(padded_rows, C, generator=g) * 0.2,
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_q.weight"] = torch.randn(4 * D, C, generator=g) * 0.25
        sd[p + "attn.c_k.weight"] = torch.randn(2 * D, C, generator=g) * 0.25
        sd[p + "attn.c_v.weight"] = torch.randn(2 * D, C, generator=g) * 0.25
        sd[p + "attn.c_proj.weight"] = torch.randn(C, C, generator=g) * 0.25
        sd[p + "mlp.c_fc.weight"] = torch.randn(4 * C, C, generator=g) * 0.25
        sd[p + "mlp.c_proj.weight"] = torch.randn(C, 4 * C, generator=g) * 0.1
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "model_000650.pt")
    (tmp_path / "meta_000650.json").write_text(json.dumps({"step": 650, "model_config": cfg, "val_bpb": 0.9}))
    return sd, cfg


def with_states(loader):
    """(inputs, targets, state after this batch) for each batch of a data loader: the cursor
    protocol's `state()` read right after each batch, i.e. where the next one starts."""
    for x, y in loader:
        yield x, y, loader.state()
