"""One training loop for the base, mid and SFT stages.

Each optimizer step takes a fixed set of examples (a global batch), split over ranks and
micro-batches. The loss is normalised per trained token over the WHOLE step: every
micro-batch contributes sum(token losses) / (trained tokens in the step, summed over all
micro-batches and ranks), and gradients are summed across ranks. This is the fix SPEC asks
for over the reference's mean of micro-batch means: the update no longer depends on
--device-batch-size or on how masked tokens fall into micro-batches, and a micro-batch with no
trained token adds exactly zero (never NaN).

A stage = a model source (new, or the previous stage's checkpoint), a `StepData` that yields
each step's micro-batches and can save/restore its cursor, and an lr schedule.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .common import RustchatError, print0

H100_BF16_PEAK_FLOPS = 989e12


@dataclass
class StageConfig:
    stage: str  # base | mid | sft
    depth: int = 10
    device: str = "auto"
    device_batch_size: int = 4
    # base/mid: tokens per optimizer step; sft: examples per step
    total_batch_size: int = 524_288
    seq_len: int = 2048
    max_steps: int | None = None
    num_epochs: int = 1
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int | None = None
    run: str | None = None
    resume: bool = False
    stop_at_step: int | None = None  # stop early with a checkpoint, schedule unchanged (then --resume)
    seed: int = 42
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    init_lr_frac: float = 0.02  # sft
    tokens_per_param: float = 20.0  # base horizon
    data_dir: str | None = None  # base: local parquet/text instead of downloading
    num_shards: int = 8  # base: FineWeb-Edu shards to download when no data_dir
    tasks: str = "default"  # mid/sft task mixture preset
    task_dir: str | None = None  # local copies of hub datasets
    pack: bool = False  # sft: pack conversations into rows instead of padding
    base_dir: str | None = None
    quiet: bool = False


# ----------------------------------------------------------------------------- step data
class StepData:
    """Yields, per optimizer step, this rank's micro-batches [(inputs, targets), ...]."""

    def next_step(self) -> list:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def tokens_per_step(self) -> int | None:
        return None


class StreamStepData(StepData):
    """base / mid: every token trained; each step = grad_accum micro-batches of B x T. The
    iterators yield (inputs, targets, cursor of the next batch)."""

    def __init__(self, make_iter, grad_accum: int, start_state: dict | None):
        self.grad_accum = grad_accum
        self.it = iter(make_iter(start_state))
        self._state = start_state or {}

    def next_step(self):
        out = []
        for _ in range(self.grad_accum):
            x, y, cur = next(self.it)
            self._state = cur.to_dict() if hasattr(cur, "to_dict") else dict(cur._asdict())
            out.append((x, y))
        return out

    def state(self) -> dict:
        """Where the next step's data starts."""
        return self._state


class SFTStepData(StepData):
    """SFT: a fixed global batch of `examples_per_step` conversations per step, rank r taking
    every world-th one, rendered by the Rust core and collated (or packed) per micro-batch."""

    def __init__(self, tok, conversations, examples_per_step: int, device_batch_size: int, seq_len: int,
                 rank: int, world: int, seed: int, start_state: dict | None, pack: bool = False):
        self.tok, self.convs = tok, conversations
        self.E, self.B, self.T = examples_per_step, device_batch_size, seq_len
        self.rank, self.world = rank, world
        self.pack = pack
        self.pad_id = tok.encode_special("<|assistant_end|>")
        self.seed = seed
        st = start_state or {}
        self.pos = int(st.get("pos", 0))
        self.epoch = int(st.get("epoch", 0))
        self._order = None
        self._order_epoch = None

    def _perm(self):
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.convs))
            self._order_epoch = self.epoch
        return self._order

    def next_step(self):
        from .conversation import collate_sft, pack_rows, render_batch

        idx = []
        while len(idx) < self.E:
            order = self._perm()
            take = min(self.E - len(idx), len(order) - self.pos)
            idx.extend(order[self.pos : self.pos + take].tolist())
            self.pos += take
            if self.pos >= len(order):
                self.pos, self.epoch = 0, self.epoch + 1
        mine = idx[self.rank :: self.world]
        rows = render_batch(self.tok, [self.convs[i] for i in mine], max_tokens=self.T + 1)
        out = []
        for s in range(0, len(rows), self.B):
            part = [rows[j] for j in range(s, min(s + self.B, len(rows)))]
            if self.pack:
                pb = pack_rows(part, self.T, pad_id=self.pad_id)
                out.append((pb.inputs, pb.targets, pb.doc_ids))
            else:
                x, y = collate_sft(part, self.pad_id, max_len=self.T + 1)
                out.append((x, y))
        return out

    def state(self) -> dict:
        return {"pos": self.pos, "epoch": self.epoch}


# ----------------------------------------------------------------------------- helpers
def _to_device(arr, device, dtype=None):
    import torch

    # numpy views of Rust buffers are read-only: copy into a tensor we own
    t = arr if isinstance(arr, torch.Tensor) else torch.tensor(np.asarray(arr))
    if dtype is not None:
        t = t.to(dtype)
    return t.to(device, non_blocking=True)


class _Logger:
    """wandb when asked for (--run) and available online; otherwise nothing."""

    def __init__(self, cfg: StageConfig, rank: int):
        self.run = None
        if cfg.run and rank == 0 and os.environ.get("WANDB_MODE") not in ("disabled", "offline"):
            try:
                import wandb

                self.run = wandb.init(project="rustchat", name=cfg.run, config=asdict(cfg))
            except Exception as e:  # noqa: BLE001 - logging must never stop training
                print0(f"wandb disabled ({e})")

    def log(self, d: dict) -> None:
        if self.run is not None:
            self.run.log(d)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _all_reduce_sum(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _oom_error(cfg: StageConfig) -> RustchatError:
    half = max(1, cfg.device_batch_size // 2)
    return RustchatError(f"CUDA out of memory at --device-batch-size {cfg.device_batch_size}; try --device-batch-size {half}")


# ----------------------------------------------------------------------------- the loop
def train_step(model, optimizers, micro_batches, device, autocast_ctx) -> tuple[float, int]:
    """One optimizer step over this rank's micro-batches with per-token normalisation across
    all micro-batches and ranks. Returns (mean loss per trained token, trained tokens)."""
    import torch

    from .optim import all_reduce_grads

    local = sum(int((mb[1] != -1).sum()) for mb in micro_batches)
    total = _all_reduce_sum(local, device)
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
    all_reduce_grads(model, "sum")
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    loss_sum = _all_reduce_sum(loss_sum, device)
    return loss_sum / max(total, 1.0), int(total)


def run_stage(cfg: StageConfig, *, tok, model, optimizers, data: StepData, num_steps: int, lr_multiplier,
              start_step: int, evaluate=None, ckpt_dir, meta_extra: dict | None = None, momentum_fn=None,
              tokens_per_step_hint: int | None = None) -> dict:
    """The shared loop: schedule, step, eval, checkpoint, progress, report numbers."""
    import torch
    from tqdm import tqdm

    from .checkpoint import capture_rng_state, save_checkpoint
    from .common import autocast_ctx, get_rank, synchronize
    from .schedules import apply_lr_multiplier, set_muon_momentum

    device = model.get_device()
    rank = get_rank()
    logger = _Logger(cfg, rank)
    flops_per_token = model.estimate_flops(cfg.seq_len)
    is_cuda = device.type == "cuda"
    ac = lambda: autocast_ctx(device)  # noqa: E731
    history = []
    evals = []
    bar = tqdm(total=num_steps, initial=start_step, desc=cfg.stage, disable=cfg.quiet or rank != 0,
               dynamic_ncols=True, mininterval=1.0)
    t_start = time.time()
    tokens_seen = 0
    last_eval = None

    def save(step):
        from .common import barrier, get_world_size

        states = [data.state()]
        if get_world_size() > 1:
            import torch.distributed as dist

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
            "history": history[-2000:],
            **(meta_extra or {}),
        }
        save_checkpoint(ckpt_dir, step, model, optimizers, meta, rank=rank)
        barrier()

    step = start_step
    try:
        stop_at = min(num_steps, cfg.stop_at_step) if cfg.stop_at_step else num_steps
        while step < stop_at:
            mult = lr_multiplier(step)
            apply_lr_multiplier(optimizers, mult)
            if momentum_fn is not None:
                set_muon_momentum(optimizers, momentum_fn(step))
            micro = data.next_step()
            t0 = time.time()
            model.train()
            loss, ntok = train_step(model, optimizers, micro, device, ac)
            if not math.isfinite(loss):
                raise RustchatError(f"{cfg.stage}: loss became {loss} at step {step}; lower the learning rates")
            synchronize(device)
            dt = max(time.time() - t0, 1e-9)
            n_in = _all_reduce_sum(sum(int(np.prod(mb[0].shape)) for mb in micro), device)
            tokens_seen += n_in
            tps = n_in / dt
            step += 1
            rec = {"step": step, "loss": loss, "lr_mult": mult, "tok_per_s": tps, "trained_tokens": ntok}
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
            if is_cuda:
                mfu = flops_per_token * tps / (H100_BF16_PEAK_FLOPS * _all_reduce_sum(1, device))
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
                logger.log(last_eval)
                if rank == 0 and not cfg.quiet:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k != "step"))
            if cfg.save_every and step % cfg.save_every == 0 and step < num_steps:
                save(step)
    except torch.cuda.OutOfMemoryError:
        raise _oom_error(cfg) from None
    finally:
        bar.close()
    save(step)
    logger.finish()
    elapsed = time.time() - t_start
    return {"steps": step, "history": history, "evals": evals, "last_eval": last_eval, "seconds": elapsed,
            "tokens": tokens_seen}


def write_json(path, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def data_state_for_rank(meta: dict | None, rank: int):
    """This rank's saved data cursor (None to start fresh)."""
    states = (meta or {}).get("data_states")
    if not states:
        return None
    if rank >= len(states):
        raise RustchatError(f"the checkpoint was written by {len(states)} ranks; resume with the same number of processes")
    return states[rank]
