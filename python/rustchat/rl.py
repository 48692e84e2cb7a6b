"""Reinforcement learning on tasks with checkable answers: simplified GRPO (docs/design.md,
"Reinforcement learning").

Each step takes `examples_per_step` questions (split over ranks). For every question,
`num_samples` replies are sampled on-policy from the current model with the calculator tool
active, all replies of the step decoding together in the server's continuous-batching
scheduler. The task's own `evaluate` gives each reply a reward (1 right, 0 wrong); a reply's
advantage is its reward minus the mean reward of its question's group (no division by the
standard deviation). The loss is -sum(advantage * log p(token)) over the tokens the model
sampled itself (tool outputs, forced into the reply, are not trained), divided by the number
of such tokens in the whole step over all ranks. No KL term and no ratio clipping: the
replies come from the very weights being trained.

Every sample draws from its own generator, seeded by (run seed, position of the question in
the training stream, sample index): the replies do not depend on which rank samples them, on
the other rows of the batch, or on a resume in between.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .batching import BatchScheduler, GenRequest
from .common import MAX_NEW_TOKENS, MAX_QUESTIONS, MAX_QUEUE, MAX_ROWS, MAX_SAMPLES, RustchatError, check_count
from .conversation import render_for_completion
from .engine import Engine
from .evaluate import completion_text
from .trainer import all_reduce_sum


# ----------------------------------------------------------------------------- the math
def group_advantages(rewards: Sequence[float]) -> list[float]:
    """One question's rewards -> advantages: reward minus the group's mean (no sigma)."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def training_row(prompt: Sequence[int], reply: Sequence[int], forced: Sequence[bool]) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one sampled reply: the model reads prompt + reply; a target is the
    next token where the model sampled it itself, -1 (ignored) over the prompt and over
    tokens the engine forced into the reply (calculator outputs)."""
    if len(reply) != len(forced):
        raise RustchatError(f"a reply of {len(reply)} tokens has {len(forced)} forced flags")
    tokens = [*prompt, *reply]
    targets = [-1] * (len(prompt) - 1) + [-1 if f else int(t) for t, f in zip(reply, forced)]
    return tokens[:-1], targets


def policy_gradient_loss(nll: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """sum over rows and trained tokens of -advantage * log p = advantage * nll (nll is 0 at
    ignored targets); the caller divides by the step's trained-token count."""
    return (nll.float() * advantages.to(nll.device, torch.float32)[:, None]).sum()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sample_seed(*parts) -> int:
    """A 63-bit seed from the parts (run seed, stream position, sample index ...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------- sampling
@dataclass
class Group:
    """One question's sampled replies (stop token included when the reply has one)."""

    task: object
    conversation: dict
    prompt: list[int]
    replies: list[list[int]] = field(default_factory=list)
    forced: list[list[bool]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


class Sampler:
    """Samples groups of replies with one BatchScheduler over the run: every reply of a call
    decodes in one continuous batch of up to `max_batch` rows (at most MAX_ROWS; the rest wait
    in its queue, at most MAX_QUEUE)."""

    def __init__(self, engine: Engine, *, max_batch: int, max_new_tokens: int, temperature: float, top_k: int | None):
        check_count("max_batch", max_batch, 1, MAX_ROWS)
        check_count("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
        self.engine, self.max_batch = engine, max_batch
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.scheduler: BatchScheduler | None = None

    def sample(self, groups: list[Group], seeds: list[list[int]]) -> int:
        """Fill each group's replies and forced flags (one reply per seed); returns the tokens
        sampled in all."""
        eng = self.engine
        context = int(eng.model.config.sequence_len)
        if self.scheduler is None:
            # on this thread: nothing else runs while the replies decode (batching's docstring)
            self.scheduler = BatchScheduler(eng, max_batch=self.max_batch, max_queue=MAX_QUEUE, background=False)
        ended: list[tuple] = []
        jobs = []
        for g, group_seeds in zip(groups, seeds):
            if len(g.prompt) >= context:
                raise RustchatError(
                    f"a prompt of {len(g.prompt)} tokens leaves no room for a reply in the model's context of {context}"
                )
            limit = eng.reply_limit(len(g.prompt), self.max_new_tokens)
            g.replies, g.forced = [[] for _ in group_seeds], [[] for _ in group_seeds]
            for j, s in enumerate(group_seeds):
                jobs.append(
                    GenRequest(
                        g.prompt,
                        _collector(g, j, ended),
                        max_tokens=limit,
                        temperature=self.temperature,
                        top_k=self.top_k,
                        seed=s,
                    )
                )
        for req in jobs:
            self.scheduler.submit(req)
        self.scheduler.drain()
        for event in ended:
            if event[0] == "error":
                raise RustchatError(f"rollout sampling failed: {event[1]}")
        if len(ended) != len(jobs):  # every request ends with one event; anything else is a bug here
            raise RustchatError(f"rollout sampling: {len(ended)} of {len(jobs)} replies ended")
        return sum(len(r) for g in groups for r in g.replies)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None


def _collector(group: Group, j: int, ended: list):
    def emit(event: tuple) -> None:
        if event[0] == "token":
            group.replies[j].append(int(event[1]))
            group.forced[j].append(bool(event[2]))
        else:  # ("end", reason) or ("error", message)
            ended.append(event)

    return emit


def score_groups(tok, groups: list[Group]) -> None:
    """Each reply's reward from its task's own `evaluate`."""
    for g in groups:
        g.rewards = [float(g.task.reward(g.conversation, completion_text(tok, r))) for r in g.replies]


# ----------------------------------------------------------------------------- one step's data
@dataclass
class RolloutBatch:
    """A step's training data on this rank: micro-batches (inputs, targets, advantages) of the
    replies that carry a signal, the sampled-token count of ALL replies (the normaliser), and
    what the rollouts took."""

    micro: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    sampled_tokens: int
    stats: dict

    def __iter__(self):  # the trainer counts input tokens over the micro-batches
        return iter(self.micro)


def build_batch(groups: list[Group], pad: int, device_batch_size: int) -> tuple[list, int]:
    """(micro-batches, sampled tokens) from scored groups. A reply whose advantage is 0 (its
    group all right or all wrong) adds nothing to the gradient: it is not run, but its
    tokens count in the normaliser as the loss defines it."""
    check_count("device_batch_size", device_batch_size, 1, MAX_ROWS)
    rows, sampled = [], 0
    for g in groups:
        for reply, forced, adv in zip(g.replies, g.forced, group_advantages(g.rewards)):
            x, y = training_row(g.prompt, reply, forced)
            sampled += sum(t >= 0 for t in y)
            if adv != 0.0 and any(t >= 0 for t in y):
                rows.append((x, y, adv))
    micro = []
    for s in range(0, len(rows), device_batch_size):
        chunk = rows[s : s + device_batch_size]
        width = max(len(x) for x, _, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        y = torch.full((len(chunk), width), -1, dtype=torch.long)
        for r, (xi, yi, _) in enumerate(chunk):
            x[r, : len(xi)] = torch.tensor(xi)
            y[r, : len(yi)] = torch.tensor(yi)
        micro.append((x, y, torch.tensor([a for _, _, a in chunk], dtype=torch.float32)))
    return micro, sampled


def group_stats(groups: list[Group]) -> dict:
    """Sums over this rank's groups: rewards, replies, groups all right / all wrong."""
    return {
        "reward_sum": sum(sum(g.rewards) for g in groups),
        "replies": sum(len(g.rewards) for g in groups),
        "groups": len(groups),
        "all_right": sum(all(r >= 1.0 for r in g.rewards) for g in groups),
        "all_wrong": sum(all(r <= 0.0 for r in g.rewards) for g in groups),
    }


class RolloutSteps:
    """The step data of `run_stage` for RL: `next_step()` samples and scores this rank's share
    of the next `examples_per_step` questions of the training stream and returns a
    RolloutBatch; `state()` is the stream cursor (the position of the next question)."""

    def __init__(
        self,
        tok,
        sampler: Sampler,
        stream,
        *,
        examples_per_step: int,
        num_samples: int,
        device_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
    ):
        check_count("examples_per_step", examples_per_step, 1, MAX_QUESTIONS)
        check_count("num_samples", num_samples, 1, MAX_SAMPLES)
        check_count("device_batch_size", device_batch_size, 1, MAX_ROWS)
        if examples_per_step % world_size:
            raise RustchatError(f"--examples-per-step {examples_per_step} is not a multiple of the {world_size} ranks")
        self.tok, self.sampler, self.stream = tok, sampler, stream
        self.examples_per_step, self.num_samples = examples_per_step, num_samples
        self.device_batch_size, self.seed, self.rank, self.world = device_batch_size, seed, rank, world_size
        self.position = int((state or {}).get("position", 0))
        self.pad = tok.encode_special("<|assistant_end|>")

    def state(self) -> dict:
        return {"position": self.position}

    def next_step(self) -> RolloutBatch:
        t0 = time.time()
        groups, seeds = [], []
        for pos in range(self.position + self.rank, self.position + self.examples_per_step, self.world):
            task, conv = self.stream(pos)
            prompt = render_for_completion(self.tok, conv).tolist()
            groups.append(Group(task, conv, prompt))
            seeds.append([sample_seed("rl", self.seed, pos, j) for j in range(self.num_samples)])
        self.position += self.examples_per_step
        model = self.sampler.engine.model
        was_training = model.training
        model.eval()
        try:
            sampled = self.sampler.sample(groups, seeds)
        finally:
            model.train(was_training)
        t1 = time.time()
        score_groups(self.tok, groups)
        micro, n = build_batch(groups, self.pad, self.device_batch_size)
        stats = group_stats(groups)
        stats.update(rollout_seconds=time.time() - t0, sample_seconds=t1 - t0, sampled=sampled)
        return RolloutBatch(micro, n, stats)


# ----------------------------------------------------------------------------- one step's update
def rl_train_step(model, optimizers, batch: RolloutBatch, device, autocast_ctx) -> tuple[float, int, dict]:
    """One optimizer step of the policy gradient over this rank's micro-batches, normalised
    by the sampled tokens of the whole step (all ranks); gradients summed over ranks.
    Returns (loss per sampled token, sampled tokens, the step's logged numbers)."""
    t0 = time.time()
    total = all_reduce_sum(batch.sampled_tokens, device)
    informative = all_reduce_sum(len(batch.micro), device)
    loss_sum = 0.0
    for x, y, adv in batch.micro:
        x, y = x.to(device), y.to(device)
        with autocast_ctx():
            nll = model(x, y, loss_reduction="none")
        loss = policy_gradient_loss(nll, adv)
        (loss / max(total, 1.0)).backward()
        loss_sum += float(loss.detach())
    if informative:  # a step where every group is all right or all wrong has no gradient at all
        # the optimizer sums the ranks' gradients itself (reduce-scatter, missing ones as zeros)
        for opt in optimizers:
            opt.step()
    model.zero_grad(set_to_none=True)
    loss_sum = all_reduce_sum(loss_sum, device)
    train_seconds = time.time() - t0
    s = {k: all_reduce_sum(v, device) for k, v in batch.stats.items() if k not in ("rollout_seconds", "sample_seconds")}
    rollout = batch.stats["rollout_seconds"]  # this rank's: every rank waits for the slowest at the reduce
    stats = {
        "reward": s["reward_sum"] / max(s["replies"], 1.0),
        "all_right": s["all_right"] / max(s["groups"], 1.0),
        "all_wrong": s["all_wrong"] / max(s["groups"], 1.0),
        "rollout_share": rollout / max(rollout + train_seconds, 1e-9),
        "sample_tok_per_s": s["sampled"] / max(batch.stats["sample_seconds"], 1e-9),
        "sampled_tokens": s["sampled"],
        "rollout_s": rollout,
        "sample_s": batch.stats["sample_seconds"],
        "train_s": train_seconds,
    }
    return loss_sum / max(total, 1.0), int(total), stats


# ----------------------------------------------------------------------------- pass@k
def pass_at_k_evaluator(
    tok,
    sampler: Sampler,
    problems: list[tuple[object, dict]],
    *,
    num_samples: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
):
    """evaluate(model) -> {"pass@1": ..., "pass@k": ...} on held-out problems (task, conversation),
    `num_samples` replies each at the rollout temperature; the problems are split over ranks.
    The same seeds at every evaluation, so steps compare on the same random draws."""
    check_count("num_samples", num_samples, 1, MAX_SAMPLES)
    check_count("len(problems)", len(problems), 0, MAX_QUESTIONS)
    ks = sorted({1, *(2**i for i in range(1, 12) if 2**i < num_samples), num_samples})
    mine = list(range(rank, len(problems), world_size))

    def evaluate(model) -> dict:
        groups = [
            Group(problems[i][0], problems[i][1], render_for_completion(tok, problems[i][1]).tolist()) for i in mine
        ]
        seeds = [[sample_seed("eval", seed, i, j) for j in range(num_samples)] for i in mine]
        if groups:
            sampler.sample(groups, seeds)
            score_groups(tok, groups)
        dev = model.get_device()
        out = {}
        for k in ks:
            hit = sum(pass_at_k(num_samples, sum(r > 0 for r in g.rewards), k) for g in groups)
            out[f"pass@{k}"] = all_reduce_sum(hit, dev) / max(len(problems), 1)
        return out

    return evaluate
