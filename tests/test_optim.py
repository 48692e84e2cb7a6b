"""The optimizer against a float64 reference of its formulas (tests/ref_optim.py) and against
nanochat 92d63d4's own MuonAdamW (tests/fixtures/optim_92d63d4, scripts/make_optim_fixture.py);
its recipes' groups; old classic checkpoints; the schedules."""

import math
from pathlib import Path

import pytest
import torch

import ref_optim
from rustchat.model import GPT, GPTConfig
from rustchat.optim import (
    MuonAdamW,
    build_optimizers,
    optimizer_state_bytes,
    polar_express,
    saved_recipe,
    zeropower_via_newtonschulz5,
)
from rustchat.schedules import (
    apply_lr_multiplier,
    base_lr_multiplier,
    mid_lr_multiplier,
    muon_momentum,
    muon_momentum_2026,
    muon_weight_decay,
    set_muon_momentum,
    set_muon_weight_decay,
    sft_lr_multiplier,
)

FIXTURES = Path(__file__).parent / "fixtures" / "optim_92d63d4"


def tiny_cfg():
    return GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero projections so every matrix matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_orthogonalises(shape, dtype):
    G = torch.randn(shape, dtype=torch.float64)
    O = zeropower_via_newtonschulz5(G, 5, dtype)
    assert O.dtype == dtype and O.shape == G.shape
    O = O.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    M = U.T @ O @ Vh.T  # diagonal iff O keeps G's singular vectors
    diag = torch.diagonal(M)
    off = M - torch.diag(diag)
    # the quintic pushes every singular value into ~[0.68, 1.14] rather than exactly 1;
    # bf16 rounding (8-bit mantissa) leaves a few percent of off-diagonal mass
    assert diag.min() > 0.6 and diag.max() < 1.25, (diag.min(), diag.max())
    assert off.norm() / diag.norm() < (0.05 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (64, 64)])
def test_polar_express_matches_reference_and_orthogonalises(shape):
    G = torch.randn(shape, dtype=torch.float64)
    O = polar_express(G.float()).double()
    torch.testing.assert_close(O, ref_optim.polar_express(G), rtol=1e-4, atol=1e-5)
    if shape[0] != shape[1]:  # a random square matrix may have a singular value near 0, left short of 1
        s = torch.linalg.svdvals(O)
        assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())  # close to orthogonal in 5 steps


def test_build_optimizers_2026_groups():
    torch.manual_seed(0)
    model = GPT(tiny_cfg())
    (opt,) = build_optimizers(model, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28)
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    s = (64 / 768) ** -0.5
    head, emb, *muon = opt.param_groups
    assert head["kind"] == emb["kind"] == "adamw"
    assert head["params"] == [model.lm_head.weight] and emb["params"] == [model.transformer.wte.weight]
    assert math.isclose(head["lr"], 0.008 * s) and head["betas"] == (0.8, 0.96) and head["weight_decay"] == 0.01
    assert math.isclose(emb["lr"], 0.3 * s) and emb["betas"] == (0.8, 0.995) and emb["weight_decay"] == 0.001
    assert head["eps"] == emb["eps"] == 1e-10
    # one Muon group per matrix shape, every block matrix in exactly one
    assert sorted(id(p) for g in muon for p in g["params"]) == sorted(id(p) for p in model.transformer.h.parameters())
    for g in muon:
        assert g["kind"] == "muon" and len({p.shape for p in g["params"]}) == 1
        assert g["lr"] == 0.02 and g["momentum"] == 0.95 and g["beta2"] == 0.9 and g["weight_decay"] == 0.28
        assert g["ns_steps"] == 5 and g["recipe"] == "2026"
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
    (scaled,) = model.setup_optimizers(lr_scale=0.02)  # lr_scale multiplies every lr; initial_lr records it
    assert math.isclose(scaled.param_groups[1]["initial_lr"], 0.2 * s * 0.02)
    assert math.isclose(scaled.param_groups[-1]["initial_lr"], 0.02 * 0.02)


def _random_groups(recipe, seed):
    """Parameters of several roles and shapes, outside any model."""
    g = torch.Generator().manual_seed(seed)

    def par(*shape):
        return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64).float() * 0.3)

    adam = [
        dict(kind="adamw", params=[par(40, 24)], lr=0.01, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=[par(5)], lr=0.3, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.05),
    ]
    extra = dict(beta2=0.9, weight_decay=0.2) if recipe == "2026" else dict(nesterov=True, weight_decay=0.0)
    muon = [
        dict(
            kind="muon",
            recipe=recipe,
            params=[par(16, 40) for _ in range(3)],
            lr=0.02,
            momentum=0.9,
            ns_steps=5,
            **extra,
        ),
        dict(
            kind="muon",
            recipe=recipe,
            params=[par(36, 12) for _ in range(2)],
            lr=0.03,
            momentum=0.95,
            ns_steps=5,
            **extra,
        ),
    ]
    return adam + muon, g


def _assert_matches_reference(p, want, group, what, rtol=2e-5, atol=2e-6):
    """p (fp32) equals the float64 reference, but for cautious weight decay's sign test: where
    update x weight is within rounding of 0 the two may decide differently, which moves that
    element by lr' * wd * |p|. A few (<= 0.1%) such elements are allowed, by that much."""
    got = p.detach().double()
    bad = ~torch.isclose(got, want, rtol=rtol, atol=atol)
    if not bad.any():
        return
    wd = group.get("weight_decay", 0.0) if group["kind"] == "muon" else 0.0
    assert wd and int(bad.sum()) <= max(3, p.numel() // 1000), (what, int(bad.sum()), float((got - want).abs().max()))
    lr = group["lr"] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5
    slack = 1.5 * lr * wd * want.abs() + 10 * atol
    assert bool(((got - want).abs()[bad] <= slack[bad]).all()), (what, float((got - want).abs().max()))


@pytest.mark.parametrize("recipe", ["2026", "classic"])
def test_steps_match_float64_reference(recipe):
    groups, g = _random_groups(recipe, seed=int(torch.randint(0, 10**6, ())))
    opt = MuonAdamW(groups)
    ref = {id(p): p.detach().double().clone() for grp in groups for p in grp["params"]}
    state = {k: {} for k in ref}
    for step in range(4):
        for grp in opt.param_groups:
            for p in grp["params"]:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).float()
        for grp in opt.param_groups:
            for p in grp["params"]:
                gr, st, q = p.grad.double(), state[id(p)], ref[id(p)]
                if grp["kind"] == "adamw":
                    ref[id(p)] = ref_optim.adamw(
                        q, gr, st, lr=grp["lr"], betas=grp["betas"], eps=grp["eps"], wd=grp["weight_decay"]
                    )
                elif recipe == "2026":
                    ref[id(p)] = ref_optim.muon_2026(
                        q, gr, st, lr=grp["lr"], momentum=grp["momentum"], beta2=grp["beta2"], wd=grp["weight_decay"]
                    )
                else:
                    ref[id(p)] = ref_optim.muon_classic(q, gr, st, lr=grp["lr"], momentum=grp["momentum"])
        opt.step()
        for grp in opt.param_groups:
            for p in grp["params"]:
                _assert_matches_reference(p, ref[id(p)], grp, f"{grp['kind']} {tuple(p.shape)} step {step}")


def test_bf16_parameters_update_in_fp32():
    """A bf16 parameter keeps fp32 moments and is updated in fp32 math, rounded to bf16 once
    per step: the float64 reference rounded the same way lands on the same bf16 values."""
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(64, 32, generator=g).to(torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(4, 32, 32, generator=g)[0].to(torch.bfloat16))
    opt = MuonAdamW(
        [
            dict(kind="adamw", params=[p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
            dict(
                kind="muon", recipe="2026", params=[q], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2
            ),
        ],
        ortho_dtype=torch.float32,
    )
    ref_p, ref_q, st_p, st_q = p.detach().double(), q.detach().double(), {}, {}
    for _ in range(3):
        p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        q.grad = torch.randn(q.shape, generator=g).to(torch.bfloat16)
        opt.step()
        ref_p = ref_optim.adamw(ref_p, p.grad.double(), st_p, lr=0.01, betas=(0.8, 0.95), eps=1e-10, wd=0.1)
        ref_q = ref_optim.muon_2026(ref_q, q.grad.double(), st_q, lr=0.02, momentum=0.95, beta2=0.9, wd=0.2)
        ref_p, ref_q = ref_p.to(torch.bfloat16).double(), ref_q.to(torch.bfloat16).double()
        assert p.dtype == q.dtype == torch.bfloat16
        for got, want in ((p, ref_p), (q, ref_q)):
            ulp = want.abs().clamp_min(1e-3) * 2**-7  # one bf16 step: a rounding tie may go either way
            assert bool(((got.detach().double() - want).abs() <= ulp).all())
    assert all(t.dtype == torch.float32 for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def test_nanochat_muon_adamw_unit_fixture():
    """nanochat 92d63d4's own MuonAdamW on given parameters and gradients (3 steps, 5 groups)."""
    fx = torch.load(FIXTURES / "unit.pt", weights_only=True)
    params = [torch.nn.Parameter(t.clone()) for t in fx["initial"]]
    groups, i = [], 0
    for h in fx["groups"]:
        n = h.pop("num_params")
        groups.append({**h, "params": params[i : i + n], **({"recipe": "2026"} if h["kind"] == "muon" else {})})
        i += n
    opt = MuonAdamW(groups)
    for step, (grads, after) in enumerate(zip(fx["grads"], fx["after"])):
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for k, (p, want) in enumerate(zip(params, after)):
            torch.testing.assert_close(
                p.detach(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {k} step {step}: {m}"
            )


def test_classic_recipe_groups_and_two_steps_match_written_out_steps():
    torch.manual_seed(0)
    model = _perturbed(GPT(tiny_cfg()))
    (opt,) = build_optimizers(model, recipe="classic", weight_decay=0.0)
    groups = model.param_groups()
    s = (64 / 768) ** -0.5
    head, emb, *muon = opt.param_groups
    assert head["betas"] == emb["betas"] == (0.8, 0.95) and math.isclose(head["lr"], 0.004 * s)
    assert all(g["recipe"] == "classic" and g["weight_decay"] == 0.0 for g in muon)
    lr_of = {id(model.lm_head.weight): 0.004 * s, id(model.transformer.wte.weight): 0.2 * s}
    ref = {id(p): p.detach().double().clone() for p in model.parameters()}
    state = {id(p): {} for p in model.parameters()}
    for step in range(2):
        grads = {id(p): torch.randn_like(p) for p in model.parameters()}
        for p in model.parameters():
            p.grad = grads[id(p)].clone()
        opt.step()
        for p in groups["head"] + groups["embedding"]:
            ref[id(p)] = ref_optim.adamw(
                ref[id(p)], grads[id(p)].double(), state[id(p)], lr=lr_of[id(p)], betas=(0.8, 0.95), eps=1e-10, wd=0.0
            )
        for p in groups["matrix"]:
            ref[id(p)] = ref_optim.muon_classic(ref[id(p)], grads[id(p)].double(), state[id(p)], lr=0.02, momentum=0.95)
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach().double(), ref[id(p)], rtol=1e-5, atol=2e-6, msg=lambda m: f"{name} step {step}: {m}"
            )


def test_classic_checkpoint_of_the_old_optimizers_resumes():
    """Classic checkpoints written before MuonAdamW hold [torch AdamW, Muon] state dicts: they
    load, lrs and moments included, and the next step continues them."""
    torch.manual_seed(1)
    model = _perturbed(GPT(tiny_cfg()), seed=1)
    groups = model.param_groups()
    old_adamw, old_muon = groups["head"] + groups["embedding"], groups["matrix"]
    g = torch.Generator().manual_seed(2)
    rnd = {id(p): (torch.randn(p.shape, generator=g), torch.rand(p.shape, generator=g)) for p in model.parameters()}
    adamw_sd = {
        "state": {
            i: {"step": torch.tensor(7.0), "exp_avg": rnd[id(p)][0] * 1e-2, "exp_avg_sq": rnd[id(p)][1] * 1e-4}
            for i, p in enumerate(old_adamw)
        },
        "param_groups": [
            {"params": [0], "lr": 0.001, "initial_lr": 0.002, "betas": (0.8, 0.95)},
            {"params": [1], "lr": 0.05, "initial_lr": 0.06, "betas": (0.8, 0.95)},
        ],
    }
    muon_sd = {
        "state": {i: {"momentum_buffer": rnd[id(p)][0] * 1e-2} for i, p in enumerate(old_muon)},
        "param_groups": [{"params": list(range(len(old_muon))), "lr": 0.01, "initial_lr": 0.03, "momentum": 0.9}],
    }
    (opt,) = model.setup_optimizers(recipe="classic")
    assert saved_recipe([adamw_sd, muon_sd]) == "classic"
    from rustchat.checkpoint import load_optimizer_states

    load_optimizer_states([opt], [adamw_sd, muon_sd])
    head, emb, *muon = opt.param_groups
    assert (head["lr"], head["initial_lr"], emb["initial_lr"]) == (0.001, 0.002, 0.06)
    assert all(m["initial_lr"] == 0.03 and m["momentum"] == 0.9 for m in muon)
    ref = {id(p): p.detach().double().clone() for p in model.parameters()}
    grads = {id(p): torch.randn(p.shape, generator=g) for p in model.parameters()}
    for p in model.parameters():
        p.grad = grads[id(p)].clone()
    opt.step()
    for i, p in enumerate(old_adamw):
        st = {"t": 7, "m": adamw_sd["state"][i]["exp_avg"].double(), "v": adamw_sd["state"][i]["exp_avg_sq"].double()}
        lr = adamw_sd["param_groups"][i]["lr"]
        want = ref_optim.adamw(ref[id(p)], grads[id(p)].double(), st, lr=lr, betas=(0.8, 0.95), eps=1e-10, wd=0.0)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=2e-6)
    for i, p in enumerate(old_muon):
        st = {"buf": muon_sd["state"][i]["momentum_buffer"].double()}
        want = ref_optim.muon_classic(ref[id(p)], grads[id(p)].double(), st, lr=0.01, momentum=0.9)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=2e-6)


def test_state_dict_round_trip_and_state_bytes():
    torch.manual_seed(4)
    model = _perturbed(GPT(tiny_cfg()), seed=4)
    (opt,) = model.setup_optimizers(weight_decay=0.1)
    predicted = optimizer_state_bytes([opt])
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    actual = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    assert predicted == actual
    # 2026 Muon: one fp32 momentum per weight plus one second moment per neuron; AdamW: two moments
    n_adam = sum(p.numel() for p in model.param_groups()["head"] + model.param_groups()["embedding"])
    n_muon = sum(p.numel() + max(p.shape) for p in model.param_groups()["matrix"])
    assert actual == 4 * (2 * n_adam + n_muon)
    sd = opt.state_dict()
    model2 = GPT(tiny_cfg())
    model2.load_state_dict(model.state_dict())
    (opt2,) = model2.setup_optimizers(weight_decay=0.1)
    opt2.load_state_dict(sd)
    g = torch.Generator().manual_seed(5)
    for m, o in ((model, opt), (model2, opt2)):
        g.manual_seed(5)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    (classic,) = model2.setup_optimizers(recipe="classic")
    with pytest.raises(Exception, match="do not match"):
        classic.load_state_dict(sd)


def test_schedules():
    n = 1000
    assert base_lr_multiplier(0, n) == 1.0
    assert base_lr_multiplier(800, n) == 1.0  # last flat step
    assert math.isclose(base_lr_multiplier(900, n), 0.5)
    assert math.isclose(base_lr_multiplier(999, n), 0.005)
    assert base_lr_multiplier(1000, n) == 0.0
    assert math.isclose(base_lr_multiplier(900, n, final_lr_frac=0.1), 0.55)
    assert math.isclose(base_lr_multiplier(0, n, warmup_ratio=0.01), 0.1)
    assert base_lr_multiplier(9, n, warmup_ratio=0.01) == 1.0
    assert base_lr_multiplier(500, n, warmdown_ratio=0.0) == 1.0
    assert mid_lr_multiplier(0.0) == 1.0 and mid_lr_multiplier(0.79) == 1.0
    assert math.isclose(mid_lr_multiplier(0.9), 0.5) and mid_lr_multiplier(1.0) == 0.0
    assert math.isclose(sft_lr_multiplier(0, 700), 0.02) and math.isclose(sft_lr_multiplier(350, 700), 0.01)
    assert sft_lr_multiplier(700, 700) == 0.0
    assert muon_momentum(0) == 0.85 and math.isclose(muon_momentum(150), 0.90) and muon_momentum(300) == 0.95
    # 2026: 0.85 -> 0.97 over 400 steps, flat, then -> 0.90 over the warmdown (last 65% of 2000 = from 700)
    assert muon_momentum_2026(0, 2000) == 0.85 and math.isclose(muon_momentum_2026(200, 2000), 0.91)
    assert muon_momentum_2026(600, 2000) == 0.97 and math.isclose(muon_momentum_2026(1350, 2000), 0.935)
    assert muon_weight_decay(0, 100, 0.2) == 0.2 and math.isclose(muon_weight_decay(50, 100, 0.2), 0.1)
    assert abs(muon_weight_decay(100, 100, 0.2)) < 1e-12

    model = GPT(tiny_cfg())
    for recipe in ("2026", "classic"):
        opts = model.setup_optimizers(recipe=recipe, weight_decay=0.0)
        apply_lr_multiplier(opts, 0.5)
        set_muon_momentum(opts, 0.9)
        set_muon_weight_decay(opts, 0.07)
        for g in opts[0].param_groups:
            assert math.isclose(g["lr"], 0.5 * g["initial_lr"])
            if g["kind"] == "muon":
                assert g["momentum"] == 0.9 and g["weight_decay"] == (0.07 if recipe == "2026" else 0.0)
            else:
                assert "momentum" not in g


def test_bad_recipe_and_groups_are_refused():
    with pytest.raises(Exception, match="unknown optimizer recipe"):
        build_optimizers(GPT(tiny_cfg()), recipe="sgd")
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", recipe="2026", params=[torch.nn.Parameter(torch.zeros(3))], lr=0.1)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[torch.nn.Parameter(torch.zeros(3))], lr=0.1)])


def test_eight_steps_follow_nanochats_own_losses():
    """A tiny July-2026 nanochat model (92d63d4), as nanochat initialises it, trained 8 steps by nanochat's
    own setup_optimizer + MuonAdamW (fixture): rustchat's model and optimizer on the same
    weights and batches follow its losses within 5e-3."""
    from rustchat.nanochat_import import import_nanochat_model

    model, _ = import_nanochat_model(FIXTURES, 0)
    assert model.config.arch == "2026"
    fx = torch.load(FIXTURES / "train.pt", weights_only=True)
    h = fx["hyper"]
    (opt,) = build_optimizers(
        model,
        unembedding_lr=h["unembedding_lr"],
        embedding_lr=h["embedding_lr"],
        matrix_lr=h["matrix_lr"],
        scalar_lr=h["scalar_lr"],
        weight_decay=h["weight_decay"],
    )
    assert len([g for g in opt.param_groups if g["kind"] == "adamw"]) == 6  # head, wte, value embeds, resid, x0, smear
    set_muon_momentum([opt], fx["momentum"])
    model.train()
    losses = []
    for b in fx["batches"]:
        loss = model(b[:, :-1].contiguous(), b[:, 1:].contiguous())
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        model.zero_grad(set_to_none=True)
    want = fx["losses"].tolist()
    assert want[-1] < want[0] - 1.0  # the run learns: the comparison is not of constants
    assert max(abs(a - b) for a, b in zip(losses, want)) < 5e-3, (losses, want)


def test_eight_steps_2026_model_match_float64_reference():
    """8 steps of the fixture's 2026 model (weights perturbed freshly each run) with
    rustchat's optimizer in fp32, and the float64 reference of the update rules fed the same
    gradients: the parameters agree at every step, every group included."""
    from rustchat.nanochat_import import import_nanochat_model

    model, _ = import_nanochat_model(FIXTURES, 0)
    _perturbed(model, seed=int(torch.randint(0, 10**6, ())))
    fx = torch.load(FIXTURES / "train.pt", weights_only=True)
    h = fx["hyper"]
    (opt,) = build_optimizers(
        model,
        unembedding_lr=h["unembedding_lr"],
        embedding_lr=h["embedding_lr"],
        matrix_lr=h["matrix_lr"],
        scalar_lr=h["scalar_lr"],
        weight_decay=h["weight_decay"],
    )
    set_muon_momentum([opt], fx["momentum"])
    ref = {id(p): p.detach().double().clone() for p in model.parameters()}
    state = {id(p): {} for p in model.parameters()}
    for step, b in enumerate(fx["batches"]):
        model(b[:, :-1].contiguous(), b[:, 1:].contiguous()).backward()
        for g in opt.param_groups:
            for p in g["params"]:
                kw = dict(lr=g["lr"], wd=g["weight_decay"])
                if g["kind"] == "adamw":
                    ref[id(p)] = ref_optim.adamw(
                        ref[id(p)], p.grad.double(), state[id(p)], betas=g["betas"], eps=g["eps"], **kw
                    )
                else:
                    ref[id(p)] = ref_optim.muon_2026(
                        ref[id(p)], p.grad.double(), state[id(p)], momentum=g["momentum"], beta2=g["beta2"], **kw
                    )
        opt.step()
        model.zero_grad(set_to_none=True)
        for g in opt.param_groups:
            for p in g["params"]:
                _assert_matches_reference(p, ref[id(p)], g, f"{tuple(p.shape)} step {step}", rtol=1e-4, atol=1e-5)
