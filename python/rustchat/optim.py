"""The optimizer (docs/design.md, "Optimizers"): one MuonAdamW that updates the transformer's
matrices with Muon and every other parameter with AdamW, in one of two recipes.

- "2026" (nanochat's July-2026 recipe, commit 92d63d4; the default): Muon orthogonalises with Polar Express,
  equilibrates rows before (MuonEq), snaps the Frobenius norm after (Muon+), rescales per
  neuron by a second moment (NorMuon, beta2) and decays weights only where the update and the
  weight agree in sign (cautious weight decay). Six AdamW groups with their own betas and
  weight decays: head, token embedding, value embeddings, resid lambdas, x0 lambdas, smear.
- "classic" (January 2026, commit 48abd7d): Muon with quintic Newton-Schulz, AdamW on head and embedding.

All update math is fp32 whatever the parameters' dtype (bf16 parameters are read as fp32 and
written back), except the orthogonalisation, which runs in bf16 on CUDA as nanochat runs it
(48abd7d and 92d63d4; on the CPU 92d63d4 keeps fp32, as rustchat does, and 48abd7d bf16).

Distributed (ZeRO-2): the optimizer owns gradient communication; nothing all-reduces the
gradients before `step()`. A step (1) launches every reduce-scatter at once, asynchronously,
(2) for each group in turn waits for its gradient shard, updates the slice this rank owns and
launches the all-gather of the result, so later groups' communication overlaps earlier groups'
math, (3) waits for the gathers. Muon groups (same-shape matrices) are split by whole matrices
(rank r owns matrices [r*c, (r+1)*c), c = ceil(K/world)); large AdamW tensors by rows; tensors
under SMALL_NUMEL elements, or whose rows do not split evenly, are all-reduced and replicated.
Each rank keeps optimizer state only for what it owns, about 1/world of the whole. Gradients
are SUMMED across ranks: the trainer already divides each rank's loss by the global count.

Checkpoints: `state_dict()` holds this rank's shard plus where it sits in the full tensors;
`load_state_dict` takes every rank's shards of a run (any world size) and keeps its own slice,
so a run can resume on a different number of processes. It also reads the two state dicts
(torch AdamW, Muon) that classic checkpoints written before this optimizer hold.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from .common import RustchatError

RECIPES = ("2026", "classic")
SMALL_NUMEL = 1024  # AdamW tensors below this many elements are all-reduced, not sharded
STATE_FORMAT = "rustchat.muon_adamw.v1"

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (classic Muon)
# Polar Express (Amsel et al. 2025, arXiv 2505.16932), one (a, b, c) per iteration, computed for
# 5 iterations with safety factor 2e-2 and cushion 2: X <- a X + (b A + c A^2) X, A = X X^T.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _ortho_dtype(t: torch.Tensor, dtype):
    # bf16 on CUDA (fast, and the iteration tolerates it); fp32 on CPU where bf16 matmuls are slow
    return dtype if dtype is not None else (torch.bfloat16 if t.is_cuda else torch.float32)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise G ([..., m, n]): U V^T of its SVD, singular values pushed
    into roughly [0.7, 1.2] (the quintic trades exactness for speed). Returns `dtype`."""
    a, b, c = NS_COEFFS
    X = G.to(_ortho_dtype(G, dtype))
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def polar_express(X: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Orthogonalise X ([..., m, n]) with the Polar Express iteration, in X's dtype. The 1.01
    keeps the spectral norm safely under 1 when the Frobenius norm is a loose bound."""
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    if X.size(-2) > X.size(-1):  # tall: the Gram matrix on the right is the smaller one
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


# ----------------------------------------------------------------------------- the update rules
def adamw_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place: decoupled weight decay, then the bias-corrected update. The
    moments are fp32; p may be any float dtype (math in fp32, written back once)."""
    beta1, beta2 = betas
    p32, g = p.float(), grad.float()
    p32.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(g.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    p32.add_(exp_avg / denom, alpha=-lr / (1 - beta1**step))
    if p32 is not p:
        p.copy_(p32)


def muon_direction_2026(
    grads: torch.Tensor,
    momentum_buffer: torch.Tensor,
    second_moment: torch.Tensor,
    momentum: float,
    beta2: float,
    ns_steps: int,
    ortho_dtype=None,
) -> torch.Tensor:
    """The 2026 Muon update direction of a stack of same-shape matrices [K, m, n] (fp32 in and
    out; the buffers are updated in place): Nesterov momentum -> MuonEq -> Polar Express ->
    Muon+ -> NorMuon."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp(momentum_buffer, momentum)
    X = g.to(_ortho_dtype(g, ortho_dtype))
    # MuonEq: every row to the mean row norm, so the spectrum entering the iteration is better conditioned
    target = X.float().norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (target / row_norm).to(X.dtype)
    g = polar_express(X, ns_steps).float()
    # Muon+: the Frobenius norm of an exactly semi-orthogonal matrix, sqrt(min(m, n))
    g = g * (min(g.size(-2), g.size(-1)) ** 0.5 / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # NorMuon: per-neuron second moment (along the longer side), total norm kept
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    n_red = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n_red).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n_red) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))


def muon_direction_classic(
    grads: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float, nesterov: bool, ns_steps: int, ortho_dtype=None
) -> torch.Tensor:
    """The classic Muon update direction [K, m, n]: momentum (Nesterov) -> Newton-Schulz."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    u = grads.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    return zeropower_via_newtonschulz5(u, ns_steps, ortho_dtype).float()


def muon_lr_scale(shape) -> float:
    """Tall matrices take larger steps: max(1, rows/cols)^0.5."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


# ----------------------------------------------------------------------------- the optimizer
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    # every rank must reduce the same tensors: a missing gradient counts as zero
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _adamw_sharded(p: torch.Tensor, world: int) -> bool:
    return world > 1 and p.numel() >= SMALL_NUMEL and p.shape[0] % world == 0


def _own_rows(p: torch.Tensor, rank: int, world: int) -> slice:
    """The rows of AdamW tensor p that `rank` owns (all of them when p is replicated)."""
    if not _adamw_sharded(p, world):
        return slice(None)
    rows = p.shape[0] // world
    return slice(rank * rows, (rank + 1) * rows)


def _own_adamw_state(p: torch.Tensor, full: dict, rank: int, world: int) -> dict:
    """This rank's slice of an AdamW parameter's full state, fp32 on p's device."""
    keep = _own_rows(p, rank, world)
    return {
        "step": int(full["step"]),
        **{k: full[k][keep].to(p.device, torch.float32).clone() for k in ("exp_avg", "exp_avg_sq")},
    }


class MuonAdamW(torch.optim.Optimizer):
    """Muon for 2-D matrices, AdamW for the rest, with state sharded across ranks.

    Each param group is a dict with `params` and `kind`:
    - kind "adamw": lr, betas, eps, weight_decay;
    - kind "muon" (all params of one shape): lr, momentum, ns_steps, weight_decay and `recipe`
      ("2026": + beta2; "classic": + nesterov; its weight decay must be 0).
    A group's optional `role` names what it holds (head, embedding, matrix, ...).
    `ortho_dtype`: dtype of the orthogonalisation (None: bf16 on CUDA, fp32 elsewhere)."""

    def __init__(self, param_groups, *, ortho_dtype: torch.dtype | None = None):
        super().__init__(param_groups, defaults={})
        self.ortho_dtype = ortho_dtype
        self.role_params: dict[str, list] = {}  # params by role in model order (old checkpoints)
        self._world = None  # the world size the state was laid out for
        for group in self.param_groups:
            kind = group.get("kind")
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a Muon group needs 2-D parameters of one shape, got {sorted(shapes)}")
                if group.get("recipe") not in RECIPES:
                    raise ValueError(f"Muon group recipe must be one of {RECIPES}, got {group.get('recipe')!r}")
                if group["recipe"] == "classic" and group.get("weight_decay", 0.0):
                    raise ValueError("classic Muon has no weight decay")
            elif kind != "adamw":
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")

    # --- the step: reduce-scatter, update the owned slice, all-gather
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = _rank_world()
        if self._world not in (None, world):
            raise RustchatError(f"optimizer state laid out for {self._world} ranks, stepping on {world}")
        self._world = world
        launched = [self._launch_reduce(g, world) for g in self.param_groups]  # phase 1: all comms in flight
        gathers = []
        for group, red in zip(self.param_groups, launched):  # phase 2: update as each shard arrives
            if group["kind"] == "adamw":
                self._update_adamw(group, red, rank, world, gathers)
            else:
                self._update_muon(group, red, rank, world, gathers)
        for work, finish in gathers:  # phase 3
            if work is not None:
                work.wait()
            if finish is not None:
                finish()
        return loss

    def _launch_reduce(self, group, world):
        if group["kind"] == "adamw":
            out = []
            for p in group["params"]:
                g = _grad_of(p)
                if world == 1:
                    out.append((None, g))
                elif not _adamw_sharded(p, world):
                    g = g.clone() if p.grad is None else g
                    out.append((dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True), g))
                else:
                    shard = torch.empty_like(g[: g.shape[0] // world])
                    out.append(
                        (dist.reduce_scatter_tensor(shard, g.contiguous(), op=dist.ReduceOp.SUM, async_op=True), shard)
                    )
            return out
        params = group["params"]
        if world == 1:
            return None, torch.stack([_grad_of(p) for p in params]), None
        chunk = -(-len(params) // world)
        stacked = torch.zeros(chunk * world, *params[0].shape, dtype=params[0].dtype, device=params[0].device)
        torch.stack([_grad_of(p) for p in params], out=stacked[: len(params)])
        mine = torch.empty_like(stacked[:chunk])
        return dist.reduce_scatter_tensor(mine, stacked, op=dist.ReduceOp.SUM, async_op=True), mine, stacked

    def _update_adamw(self, group, reduced, rank, world, gathers):
        for p, (work, g) in zip(group["params"], reduced):
            if work is not None:
                work.wait()
            p_slice = p[_own_rows(p, rank, world)] if _adamw_sharded(p, world) else p
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p_slice, dtype=torch.float32)
            state["step"] += 1
            adamw_update(
                p_slice,
                g,
                state["exp_avg"],
                state["exp_avg_sq"],
                state["step"],
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
            if p_slice is not p:
                gathers.append((dist.all_gather_into_tensor(p, p_slice.clone(), async_op=True), None))

    def _muon_state(self, group, n_owned):
        p0 = group["params"][0]
        m, n = p0.shape
        state = self.state[p0]
        if not state:
            state["momentum_buffer"] = torch.zeros(n_owned, m, n, dtype=torch.float32, device=p0.device)
            if group["recipe"] == "2026":
                shape = (n_owned, m, 1) if m >= n else (n_owned, 1, n)
                state["second_momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=p0.device)
        return state

    def _update_muon(self, group, reduced, rank, world, gathers):
        work, grads, stacked = reduced
        if work is not None:
            work.wait()
        params = group["params"]
        chunk = -(-len(params) // world)
        start = rank * chunk
        owned = params[start : start + chunk]
        state = self._muon_state(group, len(owned))
        if owned:
            g = grads[: len(owned)].float()
            if group["recipe"] == "2026":
                u = muon_direction_2026(
                    g,
                    state["momentum_buffer"],
                    state["second_momentum_buffer"],
                    group["momentum"],
                    group["beta2"],
                    group["ns_steps"],
                    self.ortho_dtype,
                )
            else:
                u = muon_direction_classic(
                    g,
                    state["momentum_buffer"],
                    group["momentum"],
                    group.get("nesterov", True),
                    group["ns_steps"],
                    self.ortho_dtype,
                )
            lr = group["lr"] * muon_lr_scale(params[0].shape)
            P = torch.stack(owned).float()
            wd = group["weight_decay"]  # cautious: decay only where update and weight agree in sign
            P.sub_(lr * u + lr * wd * P * ((u * P) >= 0) if wd else lr * u)
            P = P.to(params[0].dtype)
        if world == 1:
            torch._foreach_copy_(owned, list(P.unbind(0)))
            return
        send = torch.zeros_like(stacked[:chunk])
        if owned:
            send[: len(owned)].copy_(P)

        def finish():
            torch._foreach_copy_(params, list(stacked[: len(params)].unbind(0)))

        gathers.append((dist.all_gather_into_tensor(stacked, send, async_op=True), finish))

    # --- memory
    def state_bytes(self, world: int | None = None, rank: int | None = None) -> int:
        """Bytes of optimizer state this rank holds (or will hold, before the first step) when
        the run has `world` ranks: what ZeRO-2 sharding saves."""
        r, w = _rank_world()
        world = w if world is None else world
        rank = r if rank is None else rank
        total = 0
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    n = p.numel() // world if _adamw_sharded(p, world) else p.numel()
                    total += 2 * 4 * n
            else:
                params = group["params"]
                chunk = -(-len(params) // world)
                owned = len(params[rank * chunk : (rank + 1) * chunk])
                m, n = params[0].shape
                total += 4 * owned * (m * n + (max(m, n) if group["recipe"] == "2026" else 0))
        return total

    # --- checkpoints
    def state_dict(self) -> dict:
        """This rank's shard of the state and where it sits in the full tensors (JSON-like
        values and tensors only, so torch.load(weights_only=True) reads it)."""
        rank, world = _rank_world()
        world = self._world or world
        groups, state = [], {}
        for gi, group in enumerate(self.param_groups):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "num_params": len(group["params"])})
            if group["kind"] == "adamw":
                for pi, p in enumerate(group["params"]):
                    st = self.state.get(p)
                    if st:
                        own = _own_rows(p, rank, world)
                        span = [own.start, own.stop] if _adamw_sharded(p, world) else None
                        state[f"{gi}.{pi}"] = {
                            "step": st["step"],
                            "exp_avg": st["exp_avg"],
                            "exp_avg_sq": st["exp_avg_sq"],
                            "rows": span,
                        }
            else:
                st = self.state.get(group["params"][0])
                if st:
                    chunk = -(-len(group["params"]) // world)
                    state[str(gi)] = {**st, "first": min(rank * chunk, len(group["params"]))}
        return {"format": STATE_FORMAT, "world_size": world, "rank": rank, "param_groups": groups, "state": state}

    @staticmethod
    def merge_shards(shards: list[dict]) -> dict:
        """Every rank's state_dict of one step -> the state of a 1-rank run."""
        shards = sorted(shards, key=lambda s: s["rank"])
        world = shards[0]["world_size"]
        if [s["rank"] for s in shards] != list(range(world)) or any(s["world_size"] != world for s in shards):
            raise RustchatError(
                f"optimizer state: need the shards of all {world} ranks, got ranks {[s['rank'] for s in shards]}"
            )
        merged = {}
        for key in shards[0]["state"]:
            parts = [s["state"][key] for s in shards]
            if "rows" in parts[0]:  # AdamW: a row range of the full tensor, or the full tensor
                if parts[0]["rows"] is None:
                    merged[key] = {**parts[0]}
                else:
                    merged[key] = {
                        "step": parts[0]["step"],
                        "rows": None,
                        **{k: torch.cat([q[k] for q in parts]) for k in ("exp_avg", "exp_avg_sq")},
                    }
            else:  # Muon: consecutive runs of whole matrices
                parts = sorted(parts, key=lambda q: q["first"])
                merged[key] = {k: torch.cat([q[k] for q in parts]) for k in parts[0] if k != "first"}
                merged[key]["first"] = 0
        return {
            "format": STATE_FORMAT,
            "world_size": 1,
            "rank": 0,
            "param_groups": shards[0]["param_groups"],
            "state": merged,
        }

    def load_state_dict(self, state_dict) -> None:
        """Load the state of a run: one rank's state_dict of a 1-rank run, the list of every
        rank's state_dicts (any world size), or a classic checkpoint's [AdamW, Muon] pair."""
        shards = state_dict if isinstance(state_dict, (list, tuple)) else [state_dict]
        if len(shards) == 2 and all("format" not in s for s in shards):
            return self._load_classic_pair(shards)
        if any(s.get("format") != STATE_FORMAT for s in shards):
            raise RustchatError("optimizer state: not a state written by this optimizer")
        full = self.merge_shards(shards) if len(shards) > 1 or shards[0]["world_size"] > 1 else shards[0]
        saved = full["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            (s["kind"], s.get("recipe"), s["num_params"]) != (g["kind"], g.get("recipe"), len(g["params"]))
            for s, g in zip(saved, self.param_groups)
        ):
            raise RustchatError(
                "optimizer state: its parameter groups do not match this model's "
                "(another optimizer recipe or model shape?)"
            )
        rank, world = _rank_world()
        self.state.clear()
        for gi, (s, group) in enumerate(zip(saved, self.param_groups)):
            group.update({k: v for k, v in s.items() if k not in ("num_params", "params")})
            if group["kind"] == "adamw":
                for pi, p in enumerate(group["params"]):
                    st = full["state"].get(f"{gi}.{pi}")
                    if st is None:
                        continue
                    self.state[p] = _own_adamw_state(p, st, rank, world)
            else:
                st = full["state"].get(str(gi))
                if st is None:
                    continue
                chunk = -(-len(group["params"]) // world)
                keep = slice(rank * chunk, (rank + 1) * chunk)
                p0 = group["params"][0]
                self.state[p0] = {
                    k: v[keep].to(p0.device, torch.float32).clone() for k, v in st.items() if k != "first"
                }
        self._world = world

    def _load_classic_pair(self, pair) -> None:
        """A classic checkpoint of before this optimizer: torch AdamW over [head, embedding]
        and Muon over the block matrices in model order, both replicated on every rank."""
        adamw_sd, muon_sd = pair
        roles = self.role_params
        if not roles:
            raise RustchatError("optimizer state: a classic [AdamW, Muon] pair needs the model's parameter roles")
        old_adamw = roles.get("head", []) + roles.get("embedding", [])
        old_muon = roles.get("matrix", [])
        if len(adamw_sd["state"]) > len(old_adamw) or len(muon_sd["state"]) > len(old_muon):
            raise RustchatError("optimizer state: the classic checkpoint's parameters do not match this model")
        full_adamw = {id(p): st for i, p in enumerate(old_adamw) if (st := adamw_sd["state"].get(i))}
        full_muon = {
            id(p): st["momentum_buffer"]
            for i, p in enumerate(old_muon)
            if (st := muon_sd["state"].get(i)) is not None and "momentum_buffer" in st
        }
        rank, world = _rank_world()
        self.state.clear()
        old_groups = {
            "head": adamw_sd["param_groups"][0],
            "embedding": adamw_sd["param_groups"][1],
            "matrix": muon_sd["param_groups"][0],
        }
        for group in self.param_groups:
            old = old_groups.get(group.get("role"))
            if old is not None:
                group.update({k: old[k] for k in ("lr", "initial_lr", "momentum") if k in old and k in group})
            if group["kind"] == "adamw":
                for p in group["params"]:
                    st = full_adamw.get(id(p))
                    if st is None:
                        continue
                    self.state[p] = _own_adamw_state(p, st, rank, world)
            elif all(id(p) in full_muon for p in group["params"]):
                chunk = -(-len(group["params"]) // world)
                owned = group["params"][rank * chunk : (rank + 1) * chunk]
                p0 = group["params"][0]
                bufs = [full_muon[id(p)].to(p0.device, torch.float32) for p in owned]
                self.state[p0] = {
                    "momentum_buffer": torch.stack(bufs) if bufs else torch.zeros(0, *p0.shape, device=p0.device)
                }
        self._world = world


# ----------------------------------------------------------------------------- the recipes
# AdamW groups per role: (lr key, lr multiplier, scaled by model width, betas, weight decay key or value)
def build_optimizers(
    model,
    *,
    recipe: str = "2026",
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    scalar_lr: float = 0.5,
    weight_decay: float = 0.0,
    lr_scale: float = 1.0,
    ortho_dtype: torch.dtype | None = None,
) -> list[torch.optim.Optimizer]:
    """[MuonAdamW] for `model` (its `param_groups()` roles) with the recipe's groups.

    AdamW lrs of the head and embeddings scale with model width as (n_embd/768)^-0.5 (tuned at
    768). `weight_decay` is Muon's (2026 recipe: cautious; classic: AdamW's, as it was).
    `lr_scale` multiplies every lr (e.g. SFT's init_lr_frac). Each param group records
    `initial_lr` for the schedules. The 2026 recipe works for any rustchat model: the groups
    for parts a model lacks (value embeddings, lambdas, smear) are left out."""
    if recipe not in RECIPES:
        raise RustchatError(f"unknown optimizer recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    roles = model.param_groups()
    width = (model.config.n_embd / 768) ** -0.5
    if recipe == "2026":
        adamw = [  # role, lr, betas, weight decay
            ("head", unembedding_lr * width, (0.8, 0.96), 0.01),
            ("embedding", embedding_lr * width, (0.8, 0.995), 0.001),
            ("value_embeds", embedding_lr * width * 0.5, (0.8, 0.995), 0.01),
            ("resid", scalar_lr * 0.01, (0.8, 0.95), 0.05),
            ("x0", scalar_lr, (0.96, 0.95), 0.0),  # higher beta1 for x0
            ("smear", 0.2, (0.8, 0.95), 0.0),
        ]
        muon = dict(
            kind="muon",
            role="matrix",
            recipe="2026",
            lr=matrix_lr,
            momentum=0.95,
            ns_steps=5,
            beta2=0.9,
            weight_decay=weight_decay,
        )
    else:
        adamw = [
            ("head", unembedding_lr * width, (0.8, 0.95), weight_decay),
            ("embedding", embedding_lr * width, (0.8, 0.95), weight_decay),
            # a 2026 model's other parameters under the classic optimizer: the 2026 rates
            ("value_embeds", embedding_lr * width * 0.5, (0.8, 0.95), weight_decay),
            ("resid", scalar_lr * 0.01, (0.8, 0.95), weight_decay),
            ("x0", scalar_lr, (0.96, 0.95), weight_decay),
            ("smear", 0.2, (0.8, 0.95), weight_decay),
        ]
        muon = dict(
            kind="muon",
            role="matrix",
            recipe="classic",
            lr=matrix_lr,
            momentum=0.95,
            ns_steps=5,
            nesterov=True,
            weight_decay=0.0,
        )
    known = {role for role, *_ in adamw} | {"matrix"}
    if set(r for r, ps in roles.items() if ps) - known:
        raise RustchatError(f"the {recipe} optimizer recipe has no group for {sorted(set(roles) - known)}")
    groups = [
        dict(kind="adamw", role=role, params=roles[role], lr=lr * lr_scale, betas=betas, eps=1e-10, weight_decay=wd)
        for role, lr, betas, wd in adamw
        if roles.get(role)
    ]
    matrices = roles["matrix"]
    for shape in sorted({tuple(p.shape) for p in matrices}):  # one stack per shape
        groups.append({**muon, "params": [p for p in matrices if tuple(p.shape) == shape], "lr": muon["lr"] * lr_scale})
    opt = MuonAdamW(groups, ortho_dtype=ortho_dtype)
    opt.role_params = {k: list(v) for k, v in roles.items()}
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return [opt]


def saved_recipe(optim_states) -> str | None:
    """The recipe a checkpoint's optimizer states were written by (a per-rank list, as
    load_checkpoint returns it, or one rank's list); None when there are none."""
    if not optim_states:
        return None
    states = optim_states[0] if isinstance(optim_states[0], list) else optim_states
    if len(states) == 2 and all("format" not in s for s in states):
        return "classic"  # the [AdamW, Muon] pair of before MuonAdamW
    for group in states[0].get("param_groups", []):
        if group.get("kind") == "muon":
            return group.get("recipe")
    return None


def optimizer_state_bytes(optimizers, world: int | None = None, rank: int | None = None) -> int:
    """Bytes of optimizer state on this rank (see MuonAdamW.state_bytes)."""
    return sum(opt.state_bytes(world, rank) for opt in optimizers if isinstance(opt, MuonAdamW))
