"""A plain-Python CORE scorer written from the metric's description (the DCLM paper as nanochat
implements it in core_eval.py, the same at 48abd7d and 92d63d4), for checking rustchat.core_eval:
one example at a time, one forward per prompt, losses from a float64 log-softmax, no batching and
no shared code with the package.

Description followed:
- shuffle the task's examples with random.Random(1337), keep the first max_per_task;
- example i draws its few-shot examples with random.Random(1234 + i).sample over the indices
  other than i;
- a few-shot block is the solved problem; blocks and the problem are joined by a blank line;
  multiple choice: "<query><delim><choice>"; schema: "<context option><delim><continuation>";
  language modelling: "<context stripped><delim><continuation>", and the prompt without the
  continuation is stripped as a whole;
- every prompt is tokenised with <|bos|> in front; the scored tokens are those after the common
  prefix (multiple choice), the common suffix (schema), or after the prompt without (LM);
- a row longer than the context T keeps its last T tokens;
- multiple choice / schema: correct when the lowest mean cross-entropy over the scored tokens
  is the gold option's (first one on a tie); LM: correct when every scored token is the argmax.
"""

import random

import torch


def shuffled(examples, max_per_task):
    data = list(examples)
    random.Random(1337).shuffle(data)
    if max_per_task:
        data = data[:max_per_task]
    return data


def shots_for(data, i, k):
    if k == 0:
        return []
    others = [j for j in range(len(data)) if j != i]
    return [data[j] for j in random.Random(1234 + i).sample(others, k)]


def prompts_for(kind, item, delim, shots):
    if kind == "multiple_choice":
        blocks = [ex["query"] + delim + ex["choices"][ex["gold"]] for ex in shots]
        return ["\n\n".join(blocks + [item["query"] + delim + c]) for c in item["choices"]]
    if kind == "schema":
        blocks = [ex["context_options"][ex["gold"]] + delim + ex["continuation"] for ex in shots]
        return ["\n\n".join(blocks + [o + delim + item["continuation"]]) for o in item["context_options"]]
    blocks = [ex["context"].strip() + delim + ex["continuation"] for ex in shots]
    prefix = "\n\n".join(blocks + [item["context"].strip() + delim])
    return [prefix.strip(), prefix + item["continuation"]]


def _prefix_len(seqs):
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def spans(kind, token_rows):
    """[(row, start, end)] before cropping."""
    if kind == "multiple_choice":
        p = _prefix_len(token_rows)
        return [(r, p, len(r)) for r in token_rows]
    if kind == "schema":
        q = _prefix_len([list(reversed(r)) for r in token_rows])
        return [(r, len(r) - q, len(r)) for r in token_rows]
    without, with_ = token_rows
    assert with_[: len(without)] == without, "test data must keep the prompt without as a token prefix"
    return [(with_, len(without), len(with_))]


def crop(row, start, end, context):
    if len(row) <= context:
        return row, start, end
    drop = len(row) - context
    assert start - drop >= 1, "test data keeps continuations shorter than the context"
    return row[drop:], start - drop, end - drop


@torch.no_grad()
def row_scores(model64, row, start, end):
    """(mean cross-entropy over tokens start..end-1, all of them argmax?) from one forward."""
    x = torch.tensor([row], dtype=torch.long)
    logp = torch.log_softmax(model64(x)[0].double(), dim=-1)
    losses, hits = [], []
    for t in range(start, end):
        losses.append(-float(logp[t - 1, row[t]]))
        hits.append(int(torch.argmax(logp[t - 1])) == row[t])
    return sum(losses) / len(losses), all(hits)


def verdicts(model64, tok, kind, examples, shots, delim, context, max_per_task=None):
    """Per-example verdicts (in shuffled order) and how many rows needed cropping."""
    data = shuffled(examples, max_per_task)
    out, cropped = [], 0
    for i, item in enumerate(data):
        texts = prompts_for(kind, item, delim, shots_for(data, i, shots))
        rows = [[tok.bos_token_id] + tok.encode_ordinary(t) for t in texts]
        scored = []
        for row, s, e in spans(kind, rows):
            cropped += len(row) > context
            scored.append(row_scores(model64, *crop(row, s, e, context)))
        if kind == "language_modeling":
            out.append(scored[0][1])
        else:
            means = [m for m, _ in scored]
            best = 0
            for j in range(1, len(means)):
                if means[j] < means[best]:
                    best = j
            out.append(best == item["gold"])
    return out, cropped
