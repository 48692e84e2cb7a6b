"""The CORE metric of a base model (DCLM's ICL suite, scored as nanochat's core_eval.py scores it,
the same code at 48abd7d and 92d63d4; docs/design.md, "CORE").

Per example: few-shot examples are drawn with `random.Random(1234 + index)` from the other
examples, the prompts are rendered (one per choice; two for language modelling), each encoded
with `<|bos|>` in front, and the scored span is found in token space: the part after the
choices' common prefix (multiple choice), the common suffix (schema: the options vary the
context), or what the continuation adds (language modelling). A row longer than the model's
context loses tokens on the left. The verdict: the choice with the lowest mean loss over its
span is the gold one (the first such choice on a tie); for language modelling every span
token is the model's argmax. A task's examples are shuffled with `random.Random(1337)` before
`max_per_task` keeps the first ones. Centred accuracy (acc - b) / (1 - b) with the bundle's
random baseline b; CORE is their mean.

Batching: examples are cut into fixed chunks of CHUNK, dealt to ranks round-robin; inside a
chunk, examples (all of an example's rows together) are sorted by length and packed into
forwards under a token budget. The forwards therefore do not depend on the number of ranks, so
1 and N processes give the same verdicts.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .common import MAX_EXAMPLES, MAX_ROWS, MAX_SEQ_LEN, RustchatError, check_count
from .core_bundle import CoreTask, load_examples
from .runtime import autocast_ctx, get_rank, get_world_size, is_dist
from .scoring import centered

SHUFFLE_SEED = 1337  # the task's order before --max-per-task (nanochat's, 48abd7d and 92d63d4)
FEWSHOT_SEED = 1234  # few-shot draw of example i: random.Random(FEWSHOT_SEED + i) (nanochat's, both commits)
CHUNK = 64  # examples per unit of work dealt to a rank
MAX_LOGIT_ELEMS = 1 << 28  # rows x positions x vocab floats materialised per forward at most


# ----------------------------------------------------------------------------- prompts
def _shot_mc(ex: dict, delim: str) -> str:
    return f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n"


def _shot_schema(ex: dict, delim: str) -> str:
    return f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n"


def _shot_lm(ex: dict, delim: str) -> str:
    return f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n"


def render_prompts(task_type: str, item: dict, delim: str, shots: list[dict]) -> list[str]:
    """The texts to score: one per choice (multiple choice), one per context option (schema), or
    [prompt without, prompt with the continuation] (language modelling). Each few-shot example
    is a solved problem followed by a blank line; contexts of language modelling are stripped,
    and so is the whole prompt without the continuation (its trailing delimiter would otherwise
    merge into the continuation's first token)."""
    if task_type == "multiple_choice":
        head = "".join(_shot_mc(ex, delim) for ex in shots)
        return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(_shot_schema(ex, delim) for ex in shots)
        return [f"{head}{option}{delim}{item['continuation']}" for option in item["context_options"]]
    if task_type == "language_modeling":
        prompt = "".join(_shot_lm(ex, delim) for ex in shots) + f"{item['context'].strip()}{delim}"
        return [prompt.strip(), prompt + item["continuation"]]
    raise RustchatError(f"unknown CORE task type {task_type!r}")


def fewshot_examples(data: list[dict], idx: int, k: int) -> list[dict]:
    """k examples other than `idx`, drawn with the example's own seed."""
    if k == 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    return [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], k)]


def subsample(examples: list[dict], max_per_task: int | None) -> list[dict]:
    """The examples in their seeded shuffled order, the first `max_per_task` of them."""
    out = list(examples)
    random.Random(SHUFFLE_SEED).shuffle(out)
    return out[:max_per_task] if max_per_task else out


# ----------------------------------------------------------------------------- tokens
def common_length(rows: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) all rows share."""
    n = min(len(r) for r in rows)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(r[j] != rows[0][j] for r in rows):
            return i
    return n


@dataclass
class EncodedExample:
    """An example's token rows and the span [start, end) of each row that is scored."""

    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None  # None: language modelling

    @property
    def width(self) -> int:
        return max(len(r) for r in self.rows)


def crop_left(row: list[int], start: int, end: int, max_len: int) -> tuple[list[int], int, int]:
    """Keep the last max_len tokens of a row, shifting its span. The span's first token keeps
    at least one token before it (its prediction needs one): a continuation longer than the
    context is scored on its last max_len - 1 tokens."""
    if len(row) <= max_len:
        return row, start, end
    cut = len(row) - max_len
    return row[cut:], max(start - cut, 1), end - cut


def encode_example(tok, task: CoreTask, data: list[dict], idx: int, max_len: int) -> EncodedExample:
    item = data[idx]
    prompts = render_prompts(
        task.task_type, item, task.continuation_delimiter, fewshot_examples(data, idx, task.num_fewshot)
    )
    rows = tok.encode_batch(prompts, prepend=tok.bos_token_id)
    if task.task_type == "multiple_choice":  # the choices follow one shared context
        start = common_length(rows)
        starts, ends = [start] * len(rows), [len(r) for r in rows]
    elif task.task_type == "schema":  # one continuation follows different contexts
        k = common_length(rows, from_end=True)
        ends = [len(r) for r in rows]
        starts = [e - k for e in ends]
    else:
        without, with_ = rows
        # the prompt without the continuation normally encodes to a prefix of the one with it;
        # where a merge crosses the boundary, the span starts where the two first differ
        start = len(without) if with_[: len(without)] == without else common_length(rows)
        if start >= len(with_):
            raise RustchatError(
                f"{task.data_path}: task {task.label!r}: an example's continuation "
                f"{item['continuation']!r} adds no token to its context"
            )
        rows, starts, ends = [with_], [start], [len(with_)]
    cropped = [crop_left(r, s, e, max_len) for r, s, e in zip(rows, starts, ends)]
    return EncodedExample(
        [c[0] for c in cropped],
        [c[1] for c in cropped],
        [c[2] for c in cropped],
        item.get("gold") if task.task_type != "language_modeling" else None,
    )


# ----------------------------------------------------------------------------- scoring
def _verdict(ex: EncodedExample, losses: list[torch.Tensor], hits: list[bool]) -> bool:
    if ex.gold is None:
        return hits[0]
    means = [float(l.mean()) for l in losses]  # an empty span's mean is NaN, as in nanochat (48abd7d, 92d63d4)
    return means.index(min(means)) == ex.gold  # min keeps the first of equal values


def _pack(examples: list[EncodedExample], token_budget: int, vocab: int) -> list[list[int]]:
    """Indices of `examples` per forward: longest first, as many as fit the budget (padded
    rows x width tokens, and the logits cap); an example never spans two forwards."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].width)
    batches, cur, rows, width = [], [], 0, 0
    for i in order:
        ex = examples[i]
        w, r = max(width, ex.width), rows + len(ex.rows)
        if cur and (r * w > token_budget or r * w * vocab > MAX_LOGIT_ELEMS):
            batches.append(cur)
            cur, r, w = [], len(ex.rows), ex.width
        cur.append(i)
        rows, width = r, w
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def score_examples(model, examples: list[EncodedExample], pad_id: int, token_budget: int) -> list[bool]:
    """The verdict of each example, from batched forwards."""
    device = model.get_device()
    vocab = model.config.vocab_size
    out = [False] * len(examples)
    for batch in _pack(examples, token_budget, vocab):
        rows = [(bi, r) for bi in batch for r in range(len(examples[bi].rows))]
        width = max(examples[bi].width for bi in batch)
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for k, (bi, r) in enumerate(rows):  # right padding: causal attention never sees it
            row = examples[bi].rows[r]
            x[k, : len(row)] = torch.tensor(row, dtype=torch.long)
        # only the scored positions' logits: position p predicts token p + 1
        sel_rows, sel_pos = [], []
        for k, (bi, r) in enumerate(rows):
            s, e = examples[bi].starts[r], examples[bi].ends[r]
            sel_rows += [k] * (e - s)
            sel_pos += range(s - 1, e - 1)
        x = x.to(device)
        with autocast_ctx(device):
            logits = model(x)
        ri = torch.tensor(sel_rows, dtype=torch.long, device=device)
        pi = torch.tensor(sel_pos, dtype=torch.long, device=device)
        picked = logits[ri, pi].float()
        targets = x[ri, pi + 1]
        losses = F.cross_entropy(picked, targets, reduction="none").cpu()
        hits = (picked.argmax(dim=-1) == targets).cpu()
        at = 0
        for bi in batch:
            ex = examples[bi]
            row_losses, row_hits = [], []
            for r in range(len(ex.rows)):
                n = ex.ends[r] - ex.starts[r]
                row_losses.append(losses[at : at + n])
                row_hits.append(bool(hits[at : at + n].all()))
                at += n
            out[bi] = _verdict(ex, row_losses, row_hits)
    return out


def _check_shots(task: CoreTask, data: list[dict]) -> None:
    if task.num_fewshot >= len(data):
        raise RustchatError(
            f"task {task.label!r} ({task.data_path}) draws {task.num_fewshot} few-shot examples "
            f"from the others but has {len(data)} examples (raise --max-per-task)"
        )


def task_verdicts(model, tok, task: CoreTask, data: list[dict], token_budget: int) -> list[bool]:
    """Every example's verdict, this rank scoring its chunks; the others' arrive by all-reduce."""
    _check_shots(task, data)
    rank, world = get_rank(), get_world_size()
    max_len = int(model.config.sequence_len)
    device = model.get_device()
    got = torch.zeros(len(data), dtype=torch.float64, device=device)
    for c in range(rank, math.ceil(len(data) / CHUNK), world):
        idx = range(c * CHUNK, min((c + 1) * CHUNK, len(data)))
        encoded = [encode_example(tok, task, data, i, max_len) for i in idx]
        for i, ok in zip(idx, score_examples(model, encoded, tok.bos_token_id, token_budget)):
            got[i] = float(ok)
    if is_dist() and world > 1:
        dist.all_reduce(got)
    return [bool(v) for v in got.tolist()]


# ----------------------------------------------------------------------------- the suite
@dataclass
class TaskScore:
    label: str
    task_type: str
    shots: int
    problems: int
    accuracy: float
    centered: float
    seconds: float


@dataclass
class CoreResult:
    tasks: list[TaskScore] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def core(self) -> float:
        return core_metric([t.centered for t in self.tasks])

    @property
    def examples(self) -> int:
        return sum(t.problems for t in self.tasks)

    @property
    def examples_per_s(self) -> float:
        return self.examples / max(self.seconds, 1e-9)


def core_metric(centered_accuracies: list[float]) -> float:
    """CORE: the mean centred accuracy over the tasks."""
    if not centered_accuracies:
        raise RustchatError("CORE needs at least one task")
    return sum(centered_accuracies) / len(centered_accuracies)


def evaluate_core(
    model, tok, tasks: list[CoreTask], *, max_per_task: int | None = None, token_budget: int | None = None, log=None
) -> CoreResult:
    """Score every task of the bundle; `log(line)` hears one line per task. `token_budget`:
    padded tokens per forward (default 8 rows of the model's context). `max_per_task` is at
    most MAX_EXAMPLES, `token_budget` MAX_ROWS rows of MAX_SEQ_LEN tokens (OutOfRangeError, a
    ValueError)."""
    if max_per_task is not None:
        check_count("max_per_task", max_per_task, 1, MAX_EXAMPLES)
    if token_budget is not None:
        check_count("token_budget", token_budget, 1, MAX_ROWS * MAX_SEQ_LEN)
    budget = token_budget or 8 * int(model.config.sequence_len)
    was_training = model.training
    model.eval()
    result = CoreResult()
    t_all = time.time()
    # every task's data is read and checked before the first forward: a bad file fails fast
    datas = [subsample(load_examples(task), max_per_task) for task in tasks]
    for task, data in zip(tasks, datas):
        _check_shots(task, data)
    try:
        for task, data in zip(tasks, datas):
            t0 = time.time()
            verdicts = task_verdicts(model, tok, task, data, budget)
            acc = sum(verdicts) / len(verdicts)
            score = TaskScore(
                task.label,
                task.task_type,
                task.num_fewshot,
                len(data),
                acc,
                centered(acc, task.baseline),
                time.time() - t0,
            )
            result.tasks.append(score)
            if log is not None:
                log(
                    f"{task.label} ({task.num_fewshot}-shot, {task.task_type}): accuracy {acc:.4f} | "
                    f"centered {score.centered:.4f} | {len(data)} examples, "
                    f"{len(data) / max(score.seconds, 1e-9):.1f} examples/s"
                )
    finally:
        model.train(was_training)
    result.seconds = time.time() - t_all
    return result


def format_core_table(result: CoreResult) -> str:
    lines = ["| Task | Type | Shots | Problems | Accuracy | Centered |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for t in result.tasks:
        lines.append(f"| {t.label} | {t.task_type} | {t.shots} | {t.problems} | {t.accuracy:.4f} | {t.centered:+.4f} |")
    lines.append(f"| CORE | | | {result.examples} | | {result.core:+.4f} |")
    return "\n".join(lines)


def core_csv(result: CoreResult) -> str:
    """nanochat's results file (base_eval at 48abd7d and 92d63d4): label, accuracy, centred accuracy;
    then the CORE row."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    lines += [f"{t.label:<35}, {t.accuracy:<10.6f}, {t.centered:<10.6f}" for t in result.tasks]
    lines.append(f"{'CORE':<35}, {'':<10}, {result.core:<10.6f}")
    return "\n".join(lines) + "\n"


__all__ = [
    "render_prompts",
    "fewshot_examples",
    "subsample",
    "encode_example",
    "crop_left",
    "score_examples",
    "task_verdicts",
    "evaluate_core",
    "core_metric",
    "format_core_table",
    "core_csv",
    "CoreResult",
    "TaskScore",
]
