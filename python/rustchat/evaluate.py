"""`rustchat eval`: chat models on the eval tasks (docs/design.md, "Chat evaluation"), base models by
bits per byte ("Base evaluation") and (--core) the CORE suite (core_eval.py).

Categorical tasks (ARC, MMLU): each prompt is rendered for completion, a padded batch goes
through one forward, and the answer is the letter whose token has the highest logit at the
position after `<|assistant_start|>`. Generative tasks (GSM8K, HumanEval, SpellingBee,
Arithmetic, SimpleSpelling, Identity): replies are sampled with the engine (calculator tool on) and checked by the task's
`evaluate`; a problem counts as solved when any of its `num_samples` replies passes.
ChatCORE is the mean centered accuracy over the tasks run. Results go to stdout and to
report.md: the "eval" section for an SFT model, "mid-eval" for a mid one ("base-eval" for a base one).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .batching import BatchScheduler, GenRequest
from .bpb import bits_per_byte, val_token_stream
from .checkpoint import load_model
from .common import (
    DEFAULT_BPB_TOKENS,
    FINEWEB_SHARDS,
    MAX_NEW_TOKENS,
    MAX_QUEUE,
    MAX_ROWS,
    MAX_SAMPLES,
    OFFLINE_ROUTE,
    RustchatError,
    check_count,
    check_writable,
    get_base_dir,
    print0,
)
from .config import EvalConfig
from .conversation import render_for_completion
from .core_bundle import resolve_bundle
from .core_eval import core_csv, evaluate_core, format_core_table
from .data.textsource import list_files
from .engine import Engine
from .replies import CompletionParser
from .report import write_section
from .runtime import autocast_ctx, get_rank, get_world_size, init_distributed
from .sandbox import require_containment
from .scoring import BASELINES, categorical_pick, chatcore
from .tasks import get_task, task_from
from .tasks.base import assistant_text

PRESETS = {
    # offline: every task of the tiny training mixture, on generated held-out problems
    "tiny": ("arithmetic", "spellingbee", "simplespelling", "identity"),
    "default": ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spellingbee"),
}
CODE_TASKS = ("humaneval",)  # tasks that run model-written code (in sandbox.py), by _key
SYNTHETIC = ("arithmetic", "spellingbee", "simplespelling", "identity")  # generated: sized, not downloaded
SYNTHETIC_SIZE = 200  # problems of a generated task when --max-problems is not given (the speedrun's too)
# Cap on logits materialised per categorical forward (rows x positions x vocab floats).
_MAX_LOGIT_ELEMS = 1 << 28


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def parse_tasks(spec: str) -> list[str]:
    """'tiny' / 'default' / a comma list (presets allowed inside) -> task names, deduplicated."""
    names: list[str] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        for name in PRESETS.get(part.lower(), (part,)):
            if _key(name) not in {_key(n) for n in names}:
                names.append(name)
    if not names:
        raise RustchatError(f"--tasks {spec!r} names no task; use tiny, default or a comma list like arc-easy,gsm8k")
    return names


# eval task -> (its name in a --task-dir file, what else names the file): arc-ARC-Easy-test.jsonl, ...
TASK_FILES = {
    "arceasy": ("arc", {"subset": "ARC-Easy"}),
    "arcchallenge": ("arc", {"subset": "ARC-Challenge"}),
    "mmlu": ("mmlu", {"subset": "all"}),
    "gsm8k": ("gsm8k", {}),
    "humaneval": ("humaneval", {}),
}


def load_task(name: str, max_problems: int | None = None, task_dir: str | None = None):
    """The test split of a task, its first `max_problems` problems; a hub task from its local
    copy in task_dir when there is one (named as for mid/SFT: <task>[-<subset>]-test.jsonl)."""

    if max_problems is not None and max_problems < 1:
        raise RustchatError(f"--max-problems must be >= 1, got {max_problems}")
    if _key(name) in {_key(n) for n in SYNTHETIC}:
        return get_task(name, split="test", size=max_problems or SYNTHETIC_SIZE)
    kw = {} if max_problems is None else {"stop": max_problems}
    file_name, naming = TASK_FILES.get(_key(name), (None, {}))
    return task_from(name, kw, task_dir, file_name=file_name, file_kwargs={**naming, "split": "test"})


def _letter_ids(tok, letters) -> list[int]:
    ids = []
    for letter in letters:
        enc = tok.encode_ordinary(letter)
        if len(enc) != 1:
            raise RustchatError(f"the answer letter {letter!r} is not a single token in this tokenizer")
        ids.append(enc[0])
    return ids


def categorical_accuracy(model, tok, task, batch_size: int = 8, *, progress=None) -> tuple[int, int]:
    """(correct, total): argmax over the letter tokens' logits at the answer position,
    `batch_size` (at most MAX_ROWS) problems per forward."""
    check_count("batch_size", batch_size, 1, MAX_ROWS)
    device = model.get_device()
    pad = tok.encode_special("<|assistant_end|>")
    vocab = model.config.vocab_size
    correct = total = 0
    n = len(task)
    i = 0
    while i < n:
        convs = [task[j] for j in range(i, min(i + batch_size, n))]
        prompts = [render_for_completion(tok, c) for c in convs]
        # shrink the batch when its logits would not fit comfortably
        while len(prompts) > 1 and len(prompts) * max(map(len, prompts)) * vocab > _MAX_LOGIT_ELEMS:
            convs, prompts = convs[:-1], prompts[:-1]
        i += len(convs)
        width = max(map(len, prompts))
        x = torch.full((len(prompts), width), pad, dtype=torch.long)
        for r, p in enumerate(prompts):  # right padding: causal attention never sees it
            x[r, : len(p)] = torch.from_numpy(np.asarray(p, dtype=np.int64))
        with torch.inference_mode(), autocast_ctx(device):
            logits = model(x.to(device))
        last = torch.as_tensor([len(p) - 1 for p in prompts], device=logits.device)
        answer_logits = logits[torch.arange(len(prompts), device=logits.device), last]  # [B, V]
        for r, conv in enumerate(convs):
            letters = list(conv.get("letters") or getattr(task, "letters", ()))
            pick = categorical_pick(answer_logits[r], _letter_ids(tok, letters))
            correct += int(letters[pick] == assistant_text(conv).strip())
            total += 1
        if progress is not None:
            progress(len(convs), correct, total)
    return correct, total


def completion_text(tok, tokens) -> str:
    """A reply's text as the tasks read it: all parts joined (as `assistant_text` does)."""

    parser = CompletionParser(tok)
    parser.feed_all(tokens)
    parser.flush()
    return "".join(p["text"] for p in parser.parts)


def generative_accuracy(
    engine,
    task,
    *,
    num_samples: int = 1,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
    progress=None,
) -> tuple[int, int]:
    """(solved, total): sample `num_samples` replies per problem (in chunks of `batch_size`
    rows) and check them with `task.evaluate`; a problem is solved when any reply passes.

    Greedy single replies (the default) do not depend on the batch, so they are decoded
    `batch_size` problems at a time by continuous batching. Counts out of range (at most
    MAX_SAMPLES, MAX_ROWS and MAX_NEW_TOKENS) are an OutOfRangeError (a ValueError)."""
    check_count("num_samples", num_samples, 1, MAX_SAMPLES)
    check_count("batch_size", batch_size, 1, MAX_ROWS)
    check_count("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    tok = engine.tok
    if is_greedy(num_samples, temperature, top_k):
        step = None if progress is None else lambda _task, k, good, seen: progress(k, good, seen)
        return greedy_accuracies(engine, [task], batch_size, max_new_tokens, step)[0]
    solved = 0
    for i in range(len(task)):
        conv = task[i]
        prompt = render_for_completion(tok, conv)
        ok = False
        done = 0
        while done < num_samples and not ok:
            n = min(batch_size, num_samples - done)
            # per problem (and chunk) seed: reruns are reproducible, problems differ
            outs = engine.generate_batch(prompt, n, max_new_tokens, temperature, top_k, seed + 1000 * i + done)
            ok = any(task.evaluate(conv, completion_text(tok, o)) for o in outs)
            done += n
        solved += int(ok)
        if progress is not None:
            progress(1, solved, i + 1)
    return solved, len(task)


def is_greedy(num_samples: int, temperature: float, top_k: int | None) -> bool:
    """One reply per problem, picked by argmax: the same whatever the batch."""
    return num_samples == 1 and (temperature == 0.0 or top_k == 1)


def greedy_accuracies(
    engine, tasks, batch_size: int = 8, max_new_tokens: int = 512, progress=None
) -> list[tuple[int, int]]:
    """(solved, total) per task, from greedy replies decoded by continuous batching (the
    server's scheduler): up to `batch_size` rows decode together whatever their task or prompt
    length, and a finished row's slot goes to the next problem at once, so a task of long
    replies and one of short replies share the steps. A greedy reply does not depend on its
    batch (the scheduler's tests), so this scores exactly as decoding one problem at a time.
    `progress(task_index, k, solved, seen)` follows each task. At most MAX_QUEUE problems wait
    in the scheduler's queue at a time; the next is queued as one ends."""
    check_count("batch_size", batch_size, 1, MAX_ROWS)
    check_count("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    tok = engine.tok
    context = int(engine.model.config.sequence_len)
    jobs = []  # (task index, conversation, prompt, reply limit)
    for ti, task in enumerate(tasks):
        for i in range(len(task)):
            conv = task[i]
            prompt = render_for_completion(tok, conv).tolist()
            jobs.append((ti, conv, prompt, engine.reply_limit(len(prompt), max_new_tokens)))
    solved, seen = [0] * len(tasks), [0] * len(tasks)

    def score(j: int, out: list[int]) -> None:
        ti, conv = jobs[j][0], jobs[j][1]
        solved[ti] += int(bool(tasks[ti].evaluate(conv, completion_text(tok, out))))
        seen[ti] += 1
        if progress is not None:
            progress(ti, 1, solved[ti], seen[ti])

    # a prompt that fills the context has no room in the scheduler's cache: decode it alone
    fits = [j for j, (_, _, p, limit) in enumerate(jobs) if len(p) + limit <= context]
    for j in sorted(set(range(len(jobs))) - set(fits)):
        score(j, engine.complete_prompts([jobs[j][2]], max_new_tokens, 0.0, None)[0])
    replies: dict[int, list[int]] = {j: [] for j in fits}
    ended: deque[tuple[int, tuple]] = deque()

    def emitter(j: int):
        def emit(event: tuple) -> None:
            if event[0] == "token":
                if event[1] not in engine.stop_tokens:
                    replies[j].append(event[1])
            else:  # ("end", reason) or ("error", message)
                ended.append((j, event))

        return emit

    if fits:
        window = min(len(fits), MAX_QUEUE)  # requests submitted and not yet ended
        # on this thread, scoring between its rounds (batching's docstring: a second thread
        # running operators slows both)
        scheduler = BatchScheduler(engine, max_batch=batch_size, max_queue=window, background=False)
        waiting = iter(fits)

        def submit(j: int) -> None:
            scheduler.submit(GenRequest(jobs[j][2], emitter(j), max_tokens=jobs[j][3], temperature=0.0, seed=None))

        try:
            for j in itertools.islice(waiting, window):
                submit(j)
            left = len(fits)
            while left:
                if not ended:
                    if not scheduler.run_once() and not ended:
                        raise RustchatError(f"evaluation: {left} replies never ended")  # a bug, not a hang
                    continue
                j, event = ended.popleft()
                left -= 1
                if event[0] == "error":
                    raise RustchatError(f"{tasks[jobs[j][0]].name}: {event[1]}")
                score(j, replies.pop(j))
                nxt = next(waiting, None)
                if nxt is not None:
                    submit(nxt)
        finally:
            scheduler.close()
    return [(solved[ti], len(task)) for ti, task in enumerate(tasks)]


def chatcore_of(results: dict[str, float], types: dict[str, str]) -> float:
    """ChatCORE over the tasks run; tasks without a listed baseline get 0.25 when
    categorical (4 choices) and 0 when generative."""

    extra = {t: (0.25 if types.get(t) == "categorical" else 0.0) for t in results if t not in BASELINES}
    return chatcore(results, extra)


def format_table(rows: list[tuple[str, str, int, float, float]], chatcore: float | None) -> str:
    lines = ["| Task | Type | Problems | Accuracy | Centered |", "| --- | --- | ---: | ---: | ---: |"]
    for name, kind, n, acc, cen in rows:
        lines.append(f"| {name} | {kind} | {n} | {100 * acc:.2f}% | {cen:+.4f} |")
    if chatcore is not None:
        lines.append(f"| ChatCORE | | | | {chatcore:+.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- base models
def default_val_files(base: Path, data_dir: str | None) -> list[Path]:
    """Validation text for bits per byte: the last file of --data-dir (as `rustchat base`
    holds it out), else the tiny recipe's val file, else the FineWeb-Edu validation shard."""

    if data_dir:
        files = list_files([data_dir])
        return files[-1:]
    for p in (
        base / "tiny_data" / "val.txt",
        base / "tiny_data" / "val.jsonl",
        base / "base_data" / f"shard_{FINEWEB_SHARDS - 1:05d}.parquet",
    ):
        if p.is_file():
            return [p]
    raise RustchatError(
        f"no validation text under {base}: pass --data-dir with text/JSONL/parquet files, or {OFFLINE_ROUTE}"
    )


# ----------------------------------------------------------------------------- entry point
def core_csv_path(base: Path, depth: int, step) -> Path:
    """nanochat's per-model results file (base_eval at 48abd7d and 92d63d4), in base_eval/ beside
    report.md."""
    return base / "base_eval" / f"base_model_d{depth}_{int(step or 0):06d}.csv"


def eval_base(cfg: EvalConfig) -> dict:
    """Bits per byte of a base checkpoint on held-out text, and with --core the CORE suite
    (its examples split over the ranks when run under torchrun)."""
    _, device = init_distributed(cfg.device, seed=None)
    model, tok, meta = load_model("base", depth=cfg.depth, step=cfg.step, device=device, base_dir=cfg.base_dir)
    base = Path(cfg.base_dir) if cfg.base_dir else get_base_dir(create=False)
    if get_rank() == 0:
        check_writable(base, "report dir")  # report.md (and CORE's csv) are written at the end
    label = f"base d{model.config.n_layer} step {meta.get('step')}"
    rows, out, table = {"model": label}, {}, None
    # unless told otherwise, score what the base run's own evaluation scored (its held-out file,
    # its token count), so report.md's base section and this print one number for one checkpoint
    run = meta.get("config") if isinstance(meta.get("config"), dict) else {}  # imported checkpoints have none
    data_dir = cfg.data_dir or (run.get("data_dir") if run.get("data_dir") and Path(run["data_dir"]).exists() else None)
    bpb_tokens = cfg.bpb_tokens or run.get("bpb_tokens") or DEFAULT_BPB_TOKENS
    try:
        files = default_val_files(base, data_dir)
    except RustchatError:
        if not cfg.core:
            raise
        files = None  # CORE alone: bits per byte needs validation text
    if files:
        t0 = time.time()
        bpb, n = bits_per_byte(model, tok, val_token_stream(tok, files, bpb_tokens))
        if not cfg.quiet:
            print0(
                f"{label}: val bits/byte {bpb:.4f} over {n:,} tokens of {', '.join(map(str, files))} "
                f"({time.time() - t0:.1f} s)"
            )
        rows.update({"val files": ", ".join(map(str, files)), "tokens": f"{n:,}", "val bpb": f"{bpb:.4f}"})
        out["val_bpb"] = bpb
    if cfg.core:
        tasks = resolve_bundle(cfg.bundle, base, quiet=cfg.quiet)
        print0(
            f"CORE: {len(tasks)} tasks, {get_world_size()} process(es), "
            f"{'all examples' if not cfg.max_per_task else f'{cfg.max_per_task} examples per task at most'}"
        )
        res = evaluate_core(
            model,
            tok,
            tasks,
            max_per_task=cfg.max_per_task,
            token_budget=cfg.batch_size * model.config.sequence_len,
            log=None if cfg.quiet else print0,
        )
        table = format_core_table(res)
        csv_path = core_csv_path(base, model.config.n_layer, meta.get("step"))
        if get_rank() == 0:
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            csv_path.write_text(core_csv(res))
        print0(
            f"\n{label}\n{table}\n{res.examples} examples in {res.seconds:.1f} s: "
            f"{res.examples_per_s:.1f} examples/s\nresults: {csv_path}"
        )
        rows.update(
            {
                "CORE": f"{res.core:.4f}",
                "CORE examples": f"{res.examples:,}"
                + (f" (at most {cfg.max_per_task} per task)" if cfg.max_per_task else ""),
                "CORE examples/s": f"{res.examples_per_s:.1f}",
                "CORE results": str(csv_path),
            }
        )
        out["CORE"] = res.core
        out["core_tasks"] = {t.label: t.accuracy for t in res.tasks}
    if get_rank() == 0:
        write_section("base-eval", rows, base_dir=base, table=table)
    return out


def code_sandbox(cfg: EvalConfig) -> str | None:
    """None when no task of `cfg` runs model-written code; else the sandbox's protection line,
    after refusing (RustchatError naming --allow-unsandboxed) where bubblewrap cannot contain it."""
    if cfg.source == "base" or not any(_key(n) in CODE_TASKS for n in parse_tasks(cfg.tasks)):
        return None
    return require_containment(cfg.allow_unsandboxed)


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate a checkpoint; returns {task display name: accuracy, ..., "ChatCORE": x}
    for chat models, {"val_bpb": x} for base models (with --core also "CORE" and
    "core_tasks": {label: accuracy})."""
    if cfg.source == "base":
        return eval_base(cfg)
    names = parse_tasks(cfg.tasks)
    sandbox_line = code_sandbox(cfg)  # before any work: refused where the code cannot be contained
    base = Path(cfg.base_dir) if cfg.base_dir else get_base_dir(create=False)
    if get_rank() == 0:
        check_writable(base, "report dir")  # report.md is written at the end
    tasks = [load_task(n, cfg.max_problems, cfg.task_dir) for n in names]  # fail early
    model, tok, meta = load_model(cfg.source, depth=cfg.depth, step=cfg.step, device=cfg.device, base_dir=cfg.base_dir)
    engine = Engine(model, tok)
    label = f"{cfg.source} d{model.config.n_layer} step {meta.get('step')}"
    print(f"evaluating {label} on {model.get_device()}: {', '.join(t.name for t in tasks)}")
    if sandbox_line:  # say how contained it is
        print(f"HumanEval sandbox: {sandbox_line}")
    results, types, counts, rows = {}, {}, {}, []
    t_all = time.time()

    def record(task, good: int, n: int, seconds: float | None) -> None:
        acc = good / n if n else 0.0
        results[task.name], types[task.name], counts[task.name] = acc, task.eval_type, n
        if not cfg.quiet:
            took = "" if seconds is None else f" ({seconds:.1f} s)"
            print(f"{task.name}: {good}/{n} = {100 * acc:.2f}%{took}")

    greedy = is_greedy(cfg.num_samples, cfg.temperature, cfg.top_k)
    together = [t for t in tasks if greedy and t.eval_type != "categorical"]
    done = {}  # id(task) -> (solved, total) of the tasks decoded together
    if together:  # greedy generative tasks share one continuous batch
        bars = [
            tqdm(total=len(t), desc=t.name, disable=cfg.quiet or None, leave=False, mininterval=1.0, position=i)
            for i, t in enumerate(together)
        ]

        def progress_all(ti, k, good, seen):
            bars[ti].update(k)
            bars[ti].set_postfix_str(f"{good}/{seen}")

        t0 = time.time()
        scores = greedy_accuracies(engine, together, cfg.batch_size, cfg.max_new_tokens, progress_all)
        for bar in bars:
            bar.close()
        if not cfg.quiet:
            print(f"{', '.join(t.name for t in together)}: decoded together in {time.time() - t0:.1f} s")
        done = dict(zip((id(t) for t in together), scores))
    for task in tasks:
        if id(task) in done:
            record(task, *done[id(task)], None)
            continue
        bar = tqdm(total=len(task), desc=task.name, disable=cfg.quiet or None, leave=False, mininterval=1.0)

        def progress(k, good, seen, bar=bar):
            bar.update(k)
            bar.set_postfix_str(f"{good}/{seen}")

        t0 = time.time()
        if task.eval_type == "categorical":
            good, n = categorical_accuracy(model, tok, task, cfg.batch_size, progress=progress)
        else:
            good, n = generative_accuracy(
                engine,
                task,
                num_samples=cfg.num_samples,
                batch_size=cfg.batch_size,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                seed=cfg.seed,
                progress=progress,
            )
        bar.close()
        record(task, good, n, time.time() - t0)
    core = chatcore_of(results, types) if results else None
    for name, acc in results.items():
        b = BASELINES.get(name, 0.25 if types[name] == "categorical" else 0.0)
        rows.append((name, types[name], counts[name], acc, (acc - b) / (1 - b)))
    table = format_table(rows, core)
    print(f"\n{label}\n{table}\n({time.time() - t_all:.1f} s)")
    report_rows = {
        "model": label,
        "sampling": f"temperature {cfg.temperature}, top-k {cfg.top_k}, "
        f"samples {cfg.num_samples}, max new tokens {cfg.max_new_tokens}",
    }
    if sandbox_line:
        report_rows["HumanEval sandbox"] = sandbox_line
    if core is not None:
        report_rows["ChatCORE"] = f"{core:.4f}"
    # one section per stage, so the mid and SFT tables of one run both stay in the report
    write_section("eval" if cfg.source == "sft" else f"{cfg.source}-eval", report_rows, base_dir=base, table=table)
    out = dict(results)
    if core is not None:
        out["ChatCORE"] = core
    return out
