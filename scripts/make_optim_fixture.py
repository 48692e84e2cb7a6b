"""Write the optimizer fixtures with nanochat's own code (not run in CI).

    python scripts/make_optim_fixture.py NANOCHAT_TREE [OUT_DIR]

NANOCHAT_TREE is an exported nanochat 92d63d4 tree (`git archive 92d63d4 | tar -x -C DIR`).
OUT_DIR (default tests/fixtures/optim_92d63d4) receives

- unit.pt: nanochat's MuonAdamW applied to given parameters and gradients, no model: two Muon
  groups (a stack of 3 wide matrices, a stack of 2 tall ones) and three AdamW groups (a large
  tensor, a small one, a vector) with the recipe's betas, eps and weight decays; the
  parameters before and after each of 3 steps, and every group's hyperparameters.
- model_000000.pt + meta_000000.json: a tiny July-2026 nanochat model (92d63d4's) (4 layers, 64 dims,
  vocab 300, context 256) as nanochat initialises it, in nanochat's checkpoint layout;
- train.pt: 8 batches (arithmetic progressions mod the vocab: learnable) and the loss before each of 8 steps of nanochat's own
  `setup_optimizer` + `MuonAdamW.step()` on them (fp32 on the CPU), with the learning rates,
  momentum and weight decay used.

torch.compile is switched off (TORCHDYNAMO_DISABLE=1): nanochat's fused steps then run eagerly,
the same math.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch is imported

import torch  # noqa: E402

VOCAB = 300
STEPS = 8
HYPER = dict(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28, scalar_lr=0.5)
MOMENTUM = 0.95


def unit_fixture(MuonAdamW, out: Path) -> None:
    g = torch.Generator().manual_seed(11)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    shapes = {"wide": [(16, 48)] * 3, "tall": [(40, 12)] * 2, "big": [(64, 32)], "small": [(6, 8)], "vec": [(5,)]}
    params = {k: [torch.nn.Parameter(rand(*s, scale=0.3)) for s in v] for k, v in shapes.items()}
    groups = [
        dict(kind="adamw", params=params["big"], lr=0.01, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=params["small"], lr=0.02, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.05),
        dict(kind="adamw", params=params["vec"], lr=0.5, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=params["wide"], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.28),
        dict(kind="muon", params=params["tall"], lr=0.03, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.1),
    ]
    order = ["big", "small", "vec", "wide", "tall"]
    initial = [p.detach().clone() for k in order for p in params[k]]
    opt = MuonAdamW(groups)
    grads, after = [], []
    for _ in range(3):
        gs = [rand(*p.shape) for k in order for p in params[k]]
        for p, gr in zip([p for k in order for p in params[k]], gs):
            p.grad = gr.clone()
        opt.step()
        grads.append(gs)
        after.append([p.detach().clone() for k in order for p in params[k]])
    hyper = [{k: v for k, v in grp.items() if k != "params"} | {"num_params": len(grp["params"])} for grp in groups]
    torch.save({"groups": hyper, "initial": initial, "grads": grads, "after": after}, out / "unit.pt")


def train_fixture(GPT, GPTConfig, out: Path) -> None:
    torch.manual_seed(0)
    config = GPTConfig(
        sequence_len=256, vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL"
    )
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, out / "model_000000.pt")
    meta = {"step": 0, "model_config": dataclasses.asdict(config), "user_config": {"fixture": "optimizer"}}
    (out / "meta_000000.json").write_text(json.dumps(meta, indent=2))

    g = torch.Generator().manual_seed(1)
    # learnable rows (arithmetic progressions mod VOCAB, a few strides), so the loss falls
    starts = torch.randint(0, VOCAB, (STEPS, 2, 1), generator=g)
    strides = torch.randint(1, 4, (STEPS, 2, 1), generator=g)
    batches = list((starts + strides * torch.arange(257)) % VOCAB)
    opt = model.setup_optimizer(**HYPER)
    losses = []
    model.train()
    for b in batches:
        for group in opt.param_groups:
            if group["kind"] == "muon":
                group["momentum"] = MOMENTUM
        loss = model(b[:, :-1].contiguous(), b[:, 1:].contiguous())
        loss.backward()
        losses.append(float(loss))
        opt.step()
        model.zero_grad(set_to_none=True)
    torch.save(
        {
            "batches": torch.stack(batches),
            "losses": torch.tensor(losses, dtype=torch.float64),
            "hyper": HYPER,
            "momentum": MOMENTUM,
        },
        out / "train.pt",
    )
    print("nanochat losses:", " ".join(f"{x:.5f}" for x in losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree", help="exported nanochat 92d63d4 source tree")
    ap.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/optim_92d63d4"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve()))
    from nanochat.gpt import GPT, GPTConfig  # the tree's own model and optimizer
    from nanochat.optim import MuonAdamW

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unit_fixture(MuonAdamW, out)
    train_fixture(GPT, GPTConfig, out)
    print(f"optimizer fixtures -> {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
