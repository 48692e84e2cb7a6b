"""Write a nanochat import fixture with nanochat's own code (not run in CI).

    python scripts/make_nanochat_fixtures.py NANOCHAT_TREE OUT_DIR

NANOCHAT_TREE is an exported nanochat source tree (e.g. `git archive 92d63d4 | tar -x -C DIR`);
its `nanochat.gpt` builds a tiny model (3 layers, 48 dims, GQA, vocab 300, context 512: a short
window of 128) with every weight random (nanochat's init zeroes projections and the smear,
which would hide mistakes). OUT_DIR receives what nanochat's training writes,
model_000100.pt (token and value embeddings in bf16, as nanochat keeps them on a GPU) and
meta_000100.json (its `model_config`, as nanochat's base_train writes it), plus
expected.pt: random ids [2, 144] (longer than the short window) and the fp32 CPU logits of
nanochat's own forward on them. Which nanochat it was is read from its GPTConfig: one with
`window_pattern` is the July-2026 model, one without the January-2026 one. The fixtures in
tests/fixtures/ were written from the trees of commits 92d63d4 (nanochat_92d63d4/) and 48abd7d
(nanochat_48abd7d/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

STEP = 100
VOCAB = 300  # = tests/test_nanochat_cli.py's pickled tokenizer: 256 bytes + 35 merges + 9 specials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree", help="exported nanochat source tree")
    ap.add_argument("out", help="fixture directory to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    from nanochat.gpt import GPT, GPTConfig  # the tree's own model

    torch.manual_seed(args.seed)
    kw = dict(sequence_len=512, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, n_embd=48)
    new = "window_pattern" in {f.name for f in dataclasses.fields(GPTConfig)}
    if new:
        kw["window_pattern"] = "SSSL"
    config = GPTConfig(**kw)
    if new:  # the July-2026 model is built on the meta device and initialised in place
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
    else:
        model = GPT(config)
    model.init_weights()
    embeddings = ("transformer.wte.weight",) + tuple(
        n for n, _ in model.named_parameters() if n.startswith("value_embeds.")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.float()
            std = 1.0 if name in embeddings else 1.5 * p.size(-1) ** -0.5
            if name.endswith("_lambdas"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape))
            elif name in ("smear_lambda", "backout_lambda"):
                p.copy_(0.5 + 0.2 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * std)
                if name in embeddings:  # stored in bf16 by a GPU run: use exactly those values
                    p.copy_(p.to(torch.bfloat16).float())
    model.eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, VOCAB, (2, 144), generator=g)
    with torch.no_grad():
        logits = model(ids).float()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(torch.bfloat16) if k in embeddings else v).contiguous() for k, v in model.state_dict().items()}
    sd = {"_orig_mod." + k: v for k, v in sd.items()}  # as torch.compile'd training saves it
    torch.save(sd, out / f"model_{STEP:06d}.pt")
    meta = {"step": STEP, "model_config": dataclasses.asdict(config), "user_config": {"fixture": True}}
    (out / f"meta_{STEP:06d}.json").write_text(json.dumps(meta, indent=2))
    torch.save({"ids": ids, "logits": logits}, out / "expected.pt")
    print(
        f"{'July' if new else 'January'}-2026 nanochat fixture -> {out} "
        f"({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e3:.0f} kB)"
    )


if __name__ == "__main__":
    main()
