"""One training loop for the base, mid and SFT stages.

Each optimizer step takes a fixed set of examples (a global batch), split over ranks and
micro-batches. The loss is normalised per trained token over the WHOLE step: every
micro-batch contributes sum(token losses) / (trained tokens in the step, summed over all
micro-batches and ranks), and gradients are summed across ranks (by the optimizer, which
shards its state: rustchat.optim). This departs on purpose
from nanochat's mean of micro-batch means (48abd7d and 92d63d4; docs/design.md): the update no longer depends on
--device-batch-size or on how masked tokens fall into micro-batches, and a micro-batch with no
trained token adds exactly zero (never NaN).

A stage = a model source (new, or the previous stage's checkpoint), step data that yields each
step's micro-batches and saves/restores its cursor (`rustchat.data`), and an lr schedule.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import (
    RunLedger,
    archive_run,
    capture_rng_state,
    check_checkpoint_dir,
    checkpoint_bytes,
    prune_checkpoints,
    save_checkpoint,
)
from .common import RustchatError, print0
from .config import TrainConfig
from .runtime import autocast_ctx, barrier, get_rank, get_world_size, synchronize
from .schedules import apply_lr_multiplier, set_muon_momentum, set_muon_weight_decay

H100_BF16_PEAK_FLOPS = 989e12


# ----------------------------------------------------------------------------- helpers
def _to_device(arr, device, dtype=None):
    # numpy views of Rust buffers are read-only: copy into a tensor we own
    t = arr if isinstance(arr, torch.Tensor) else torch.tensor(np.asarray(arr))
    if dtype is not None:
        t = t.to(dtype)
    return t.to(device, non_blocking=True)


class _Logger:
    """Weights & Biases when asked for (--run NAME) and installed: the training records (loss,
    lr multiplier, tokens/s, MFU), each optimizer group's lr and the evaluation results, by step.
    wandb itself honours WANDB_MODE: offline writes the run under WANDB_DIR to `wandb sync`
    later, with no network; disabled turns it off."""

    def __init__(self, cfg: TrainConfig, rank: int, optimizers=()):
        self.run = None
        self.optimizers = list(optimizers)
        if not cfg.run or rank != 0 or os.environ.get("WANDB_MODE") == "disabled":
            return
        try:
            import wandb  # optional: only --run needs it
        except ImportError:
            print0("--run: wandb is not installed (pip install wandb); not logging")
            return
        try:
            self.run = wandb.init(project="rustchat", name=cfg.run, config={"stage": cfg.stage, **asdict(cfg)})
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            print0(f"--run: wandb disabled ({type(e).__name__}: {e})")

    def _lrs(self) -> dict:
        """One lr per parameter role (head, embedding, matrix, ...): the Muon groups of one
        role, one per matrix shape, share theirs."""
        out = {}
        for i, opt in enumerate(self.optimizers):
            for j, group in enumerate(opt.param_groups):
                out[f"lr/{group.get('role') or f'opt{i}_group{j}'}"] = float(group["lr"])
        return out

    def log(self, d: dict, kind: str = "train") -> None:
        if self.run is None:
            return
        row = {f"{kind}/{k}": v for k, v in d.items() if k != "step"}
        if kind == "train":
            row.update(self._lrs())
        self.run.log(row, step=int(d["step"]))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def all_reduce_sum(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _oom_error(cfg: TrainConfig) -> RustchatError:
    half = max(1, cfg.device_batch_size // 2)
    return RustchatError(
        f"CUDA out of memory at --device-batch-size {cfg.device_batch_size}; try --device-batch-size {half}"
    )


# ----------------------------------------------------------------------------- the loop
def train_step(model, optimizers, micro_batches, device, autocast_ctx) -> tuple[float, int]:
    """One optimizer step over this rank's micro-batches with per-token normalisation across
    all micro-batches and ranks. Returns (mean loss per trained token, trained tokens)."""

    local = sum(int((mb[1] != -1).sum()) for mb in micro_batches)
    total = all_reduce_sum(local, device)
    loss_sum = 0.0
    for mb in micro_batches:
        x = _to_device(mb[0], device, torch.long)
        y = _to_device(mb[1], device, torch.long)
        doc_ids = _to_device(mb[2], device, torch.long) if len(mb) > 2 else None
        with autocast_ctx():
            loss = model(x, y, loss_reduction="sum", doc_ids=doc_ids)
        # Divided by the step's global count: sums to the per-token mean over the whole step.
        (loss / max(total, 1.0)).backward()
        loss_sum += float(loss.detach())
    # the optimizers reduce-scatter (sum) the gradients across ranks themselves (rustchat.optim)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    loss_sum = all_reduce_sum(loss_sum, device)
    return loss_sum / max(total, 1.0), int(total)


def run_stage(
    cfg: TrainConfig,
    *,
    tok,
    model,
    optimizers,
    data,
    num_steps: int,
    lr_multiplier,
    start_step: int,
    evaluate=None,
    ckpt_dir,
    momentum_fn=None,
    weight_decay_fn=None,
    resumed_meta: dict | None = None,
    core_eval=None,
    step_fn=None,
) -> dict:
    """The shared loop: schedule, step, eval, checkpoint, progress, report numbers.

    `resumed_meta` (the checkpoint a --resume starts from) carries the run so far
    (`checkpoint.RunLedger`): its id, history and wall time continue in the checkpoints written
    here and in `run_history` / `run_seconds` of the result, while `history` / `seconds`
    cover this invocation only. `step_fn(model, optimizers, step_data, device, autocast)` ->
    (loss, trained tokens, numbers to log) replaces `train_step` (RL's policy-gradient step). `core_eval` = (every, fn): fn(model) -> {"core_metric": x, ...}
    runs on every rank every `every` steps and at the last step (nanochat's --core-metric-every,
    48abd7d and 92d63d4)."""
    ledger = RunLedger(resumed_meta)
    if start_step >= num_steps:  # nothing left to train: say so instead of silently re-saving
        print0(
            f"{cfg.stage}: run {ledger.run_id} is already at step {start_step} of {num_steps}; nothing to do "
            "(--max-steps N continues it to step N)"
        )
        return {
            "steps": start_step,
            "history": [],
            "evals": [],
            "last_eval": None,
            "cores": [],
            "seconds": 0.0,
            "tokens": 0,
            "finished": True,
            **ledger.summary([], 0.0),
        }
    check_checkpoint_dir(ckpt_dir, checkpoint_bytes(model))  # fail now, not at the first save
    if resumed_meta is None and getattr(cfg, "force", False) and get_rank() == 0:
        archive_run(ckpt_dir)  # --force: the old run steps aside only now that this one starts

    device = model.get_device()
    rank = get_rank()
    logger = _Logger(cfg, rank, optimizers)
    flops_per_token = model.estimate_flops(getattr(cfg, "seq_len", None))
    is_cuda = device.type == "cuda"
    ac = lambda: autocast_ctx(device)  # noqa: E731
    history = []
    evals = []
    bar = tqdm(
        total=num_steps,
        initial=start_step,
        desc=cfg.stage,
        disable=cfg.quiet or rank != 0,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    t_start = time.time()
    tokens_seen = 0
    last_eval = None
    cores = []

    def save(step):
        states = [data.state()]
        if get_world_size() > 1:
            states = [None] * get_world_size()
            dist.all_gather_object(states, data.state())
        meta = {
            "model_config": model.config.to_dict(),
            "stage": cfg.stage,
            "step": step,
            "num_steps": num_steps,
            "data_states": states,  # one cursor per rank
            "rng": capture_rng_state(),
            "config": asdict(cfg),
            **ledger.meta(history, time.time() - t_start),
        }
        save_checkpoint(ckpt_dir, step, model, optimizers, meta, rank=rank)
        barrier()
        if cfg.keep_last and rank == 0:  # after the barrier: every rank's files of this step are in place
            prune_checkpoints(ckpt_dir, cfg.keep_last)

    step = start_step
    try:
        stop_at = min(num_steps, cfg.stop_at_step) if cfg.stop_at_step else num_steps
        while step < stop_at:
            mult = lr_multiplier(step)
            apply_lr_multiplier(optimizers, mult)
            if momentum_fn is not None:
                set_muon_momentum(optimizers, momentum_fn(step))
            if weight_decay_fn is not None:
                set_muon_weight_decay(optimizers, weight_decay_fn(step))
            micro = data.next_step()
            t0 = time.time()
            model.train()
            if step_fn is None:
                loss, ntok = train_step(model, optimizers, micro, device, ac)
                logged = {}
            else:
                loss, ntok, logged = step_fn(model, optimizers, micro, device, ac)
            if not math.isfinite(loss):
                raise RustchatError(f"{cfg.stage}: loss became {loss} at step {step}; lower the learning rates")
            synchronize(device)
            dt = max(time.time() - t0, 1e-9)
            n_in = all_reduce_sum(sum(int(np.prod(mb[0].shape)) for mb in micro), device)
            tokens_seen += n_in
            tps = n_in / dt
            step += 1
            rec = {"step": step, "loss": loss, "lr_mult": mult, "tok_per_s": tps, "trained_tokens": ntok, **logged}
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
            if "reward" in logged:
                post["reward"] = f"{logged['reward']:.3f}"
            if is_cuda:
                mfu = flops_per_token * tps / (H100_BF16_PEAK_FLOPS * all_reduce_sum(1, device))
                rec["mfu"] = mfu
                post["mfu"] = f"{100 * mfu:.1f}%"
            history.append(rec)
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            logger.log(rec)
            if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == num_steps):
                model.eval()
                with torch.no_grad():
                    last_eval = {"step": step, **evaluate(model)}
                model.train()
                evals.append(last_eval)
                logger.log(last_eval, "eval")
                if rank == 0 and not cfg.quiet:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k != "step"))
            if core_eval is not None and core_eval[0] and (step % core_eval[0] == 0 or step == num_steps):
                model.eval()
                cores.append({"step": step, **core_eval[1](model)})
                model.train()
                logger.log(cores[-1], "core")
                if rank == 0 and not cfg.quiet:
                    bar.write(f"step {step}: CORE {cores[-1]['core_metric']:.4f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < num_steps:
                save(step)
    except torch.cuda.OutOfMemoryError:
        raise _oom_error(cfg) from None
    finally:
        bar.close()
    save(step)
    logger.finish()
    elapsed = time.time() - t_start
    if step < num_steps:
        print0(f"{cfg.stage}: stopped at step {step} of {num_steps}; continue with: {continue_command(cfg)}")
    return {
        "steps": step,
        "history": history,
        "evals": evals,
        "last_eval": last_eval,
        "cores": cores,
        "seconds": elapsed,
        "tokens": tokens_seen,
        "finished": step >= num_steps,
        **ledger.summary(history, elapsed),
    }


def continue_command(cfg: TrainConfig) -> str:
    """The command that continues this run: --resume restores every other setting."""
    args = ["rustchat", cfg.stage, "--resume", "--depth", str(cfg.depth)]
    if cfg.base_dir:
        args += ["--base-dir", str(cfg.base_dir)]
    return " ".join(shlex.quote(a) for a in args)


def data_state_for_rank(meta: dict | None, rank: int, world: int = 1, reshard=None):
    """This rank's saved data cursor (None to start fresh).

    After a change of world size: cursors that every rank shares (SFT's global position) carry
    over as they are; per-rank cursors need the loader's `reshard(states, world)`, which maps
    the old ranks' cursors onto the new ranks."""
    states = (meta or {}).get("data_states")
    if not states:
        return None
    if len(states) == world:
        return states[rank]
    if all(s == states[0] for s in states):
        return states[0]
    if reshard is None:
        raise RustchatError(
            f"the checkpoint was written by {len(states)} ranks and this stage's data cannot move "
            f"to {world}; resume with {len(states)} processes"
        )
    return reshard(states, world)[rank]
