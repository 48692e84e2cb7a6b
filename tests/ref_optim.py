"""A float64 reference of the optimizer's update rules, one matrix at a time, written from the
formulas (no stacking, no sharding, no in-place tricks): the independent check of
rustchat.optim."""

import math

import torch

NS = (3.4445, -4.7750, 2.0315)
POLAR = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _wide(X, fn):
    """Run fn on the wide orientation of X (rows <= cols) and orient the result back."""
    if X.shape[0] > X.shape[1]:
        return fn(X.T).T
    return fn(X)


def polar_express(G, steps=5):
    def it(X):
        X = X / (torch.linalg.matrix_norm(X) * 1.01 + 1e-6)
        for a, b, c in POLAR[:steps]:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        return X

    return _wide(G.double(), it)


def newton_schulz(G, steps=5):
    def it(X):
        X = X / (torch.linalg.matrix_norm(X) + 1e-7)
        a, b, c = NS
        for _ in range(steps):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        return X

    return _wide(G.double(), it)


def adamw(p, g, st, *, lr, betas, eps, wd):
    """p, g float64; st: dict (m, v, t). Returns the new p."""
    b1, b2 = betas
    t = st["t"] = st.get("t", 0) + 1
    st["m"] = b1 * st.get("m", 0) + (1 - b1) * g
    st["v"] = b2 * st.get("v", 0) + (1 - b2) * g * g
    p = p * (1 - lr * wd)
    mhat = st["m"] / (1 - b1**t)
    vhat = st["v"] / (1 - b2**t)
    return p - lr * mhat / (vhat.sqrt() + eps)


def muon_2026(p, g, st, *, lr, momentum, beta2, wd, steps=5):
    """The July-2026 Muon step of one matrix: Nesterov momentum, MuonEq rows, Polar Express,
    Muon+ norm, NorMuon per-neuron second moment, cautious weight decay."""
    m, n = p.shape
    buf = st["buf"] = momentum * st.get("buf", 0) + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * buf
    rows = u.norm(dim=1, keepdim=True).clamp_min(1e-6)
    u = u * (torch.linalg.matrix_norm(u) / math.sqrt(m)) / rows
    o = polar_express(u, steps)
    o = o * math.sqrt(min(m, n)) / torch.linalg.matrix_norm(o).clamp_min(1e-6)
    # per neuron along the longer side: rows of a tall/square matrix, columns of a wide one
    v = (o * o).mean(dim=1, keepdim=True) if m >= n else (o * o).mean(dim=0, keepdim=True)
    st["v"] = beta2 * st.get("v", 0) + (1 - beta2) * v
    scaled = o / st["v"].clamp_min(1e-10).sqrt()
    o = scaled * (torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(scaled).clamp_min(1e-10))
    lr = lr * math.sqrt(max(1.0, m / n))
    agree = (o * p >= 0).double()
    return p - lr * o - lr * wd * p * agree


def muon_classic(p, g, st, *, lr, momentum, steps=5):
    m, n = p.shape
    buf = st["buf"] = momentum * st.get("buf", 0) + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * buf
    return p - lr * math.sqrt(max(1.0, m / n)) * newton_schulz(u, steps)
