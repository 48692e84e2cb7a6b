"""Compare rustchat's CORE verdicts with nanochat's own core_eval on one model and bundle.

    python scripts/core_nanochat_check.py NANOCHAT_TREE [--bundle DIR] [--base-dir DIR] [--max-per-task N]

NANOCHAT_TREE is an exported nanochat source tree (its nanochat/core_eval.py is imported and
run; it needs jinja2). Without --base-dir, a tiny model is trained on the CPU on the sentences
of the test bundle (tests/test_core_eval.py builds it, prompts longer than the context
included); with --base-dir, that base dir's latest base checkpoint and tokenizer are used.
nanochat's evaluator sees rustchat's model through a thin adapter: logits from `model(ids)`,
`max_seq_len` = the model's context (so it crops as rustchat does), the tokenizer called as
nanochat calls its own. Prints, per task, both accuracies and the examples whose verdicts
differ; exits 1 if any does. Not run in CI.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class NanochatTokenizer:
    """rustchat's tokenizer as nanochat's evaluator calls it."""

    def __init__(self, tok):
        self.tok = tok

    def get_bos_token_id(self):
        return self.tok.bos_token_id

    def __call__(self, texts, prepend=None):
        return self.tok.encode_batch(list(texts), prepend=prepend)


class NanochatModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.max_seq_len = int(model.config.sequence_len)

    def forward(self, ids):
        return self.model(ids)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("nanochat_tree")
    ap.add_argument("--bundle")
    ap.add_argument("--base-dir")
    ap.add_argument("--max-per-task", type=int, default=None)
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests"), args.nanochat_tree]
    from nanochat import core_eval as nano  # noqa: E402

    from rustchat.checkpoint import load_model
    from rustchat.core_bundle import load_bundle, load_examples
    from rustchat.core_eval import subsample, task_verdicts

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="core_check."))
    if args.base_dir:
        model, tok, _ = load_model("base", device="cpu", base_dir=args.base_dir)
    else:
        import test_core_eval as t  # the test's tiny model and bundle

        tok, model, _ = t.tiny.__wrapped__(_Factory(tmp))
    bundle = Path(args.bundle) if args.bundle else None
    if bundle is None:
        import test_core_eval as t

        bundle = t.make_bundle(tmp / "bundle", seed=random.randrange(1 << 30), n=60)
    differ = 0
    for task in load_bundle(bundle):
        data = subsample(load_examples(task), args.max_per_task)
        ours = task_verdicts(model, tok, task, data, 8 * model.config.sequence_len)
        meta = {
            "task_type": task.task_type,
            "num_fewshot": task.num_fewshot,
            "continuation_delimiter": task.continuation_delimiter,
        }
        theirs = [
            bool(nano.evaluate_example(i, NanochatModel(model), NanochatTokenizer(tok), data, "cpu", meta))
            for i in range(len(data))
        ]
        bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        differ += len(bad)
        print(
            f"{task.label:<24} rustchat {sum(ours) / len(ours):.4f}  nanochat {sum(theirs) / len(theirs):.4f}  "
            f"({len(data)} examples, {len(bad)} verdicts differ{': ' + str(bad[:10]) if bad else ''})"
        )
    return 1 if differ else 0


class _Factory:
    """The one method of pytest's tmp_path_factory the test fixture uses."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        p = Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return p


if __name__ == "__main__":
    sys.exit(main())
