"""One number per measurement: a base model's val bpb is one function on one defined token set,
so training's own evaluation (report.md's base section), `rustchat eval -i base` (its
base-eval section) and the speedrun's table agree, and match a plain float64 reference; and
`rustchat eval --tasks tiny` scores the very problems the speedrun scores."""

import math
import random
import re
from pathlib import Path

import numpy as np
import torch

from rustchat import Tokenizer
from rustchat.checkpoint import load_stage_model
from rustchat.cli import main
from rustchat.config import STAGE_CONFIGS, EvalConfig, SpeedrunConfig
from rustchat.evaluate import default_val_files, load_task, parse_tasks
from rustchat.stages import train_base

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang songs of spring".split()


def _reference_bpb(model, tok, files, max_tokens):
    """float64 bits per byte of the <|bos|>-prefixed documents' first max_tokens + 1 tokens, in
    rows of the model's context, computed here from the logits alone."""
    ids = []
    for f in files:
        paragraphs = Path(f).read_text().split("\n\n")  # a text file's documents, each with its own newline
        for doc in [p + "\n" for p in paragraphs[:-1]] + paragraphs[-1:]:
            ids += [tok.bos_token_id] + list(tok.encode_ordinary(doc))
    ids = ids[: max_tokens + 1]
    T = min(model.config.sequence_len, len(ids) - 1)
    nbytes_of = tok.token_bytes()
    nats = nbytes = 0.0
    for r in range((len(ids) - 1) // T):
        x = torch.tensor(ids[r * T : (r + 1) * T])[None]
        y = ids[r * T + 1 : (r + 1) * T + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0].double(), -1)
        for t, target in enumerate(y):
            if nbytes_of[target] > 0:
                nats -= float(logp[t, target])
                nbytes += int(nbytes_of[target])
    return nats / (math.log(2) * nbytes)


def _section_rows(text, section):
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return {
        c[1].strip(): c[2].strip()
        for line in body.splitlines()
        if line.startswith("| ") and len(c := line.split("|")) >= 4
    }


def test_base_val_bpb_is_one_number(tmp_path, capsys):
    rnd = random.Random()
    docs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 60))) for _ in range(300)]
    Tokenizer.train(docs, vocab_size=320).save(tmp_path / "tokenizer")
    text = tmp_path / "text"
    text.mkdir()
    (text / "a_train.txt").write_text("\n\n".join(docs[:250]))
    (text / "b_val.txt").write_text("\n\n".join(docs[250:]))
    n_tokens = rnd.randint(300, 1500)
    cfg = STAGE_CONFIGS["base"](
        depth=1,
        seq_len=64,
        device="cpu",
        quiet=True,
        eval_every=2,
        max_steps=2,
        device_batch_size=2,
        total_batch_size=2 * 64,
        data_dir=str(text),
        base_dir=str(tmp_path),
        bpb_tokens=n_tokens,
    )
    trained = train_base(cfg)["last_eval"]["val_bpb"]
    capsys.readouterr()
    # as a user runs it after training: no --data-dir, no --bpb-tokens (the run's own are taken)
    assert (
        main(
            [
                "eval",
                "-i",
                "base",
                "--base-dir",
                str(tmp_path),
                "--device",
                "cpu",
                "--batch-size",
                str(rnd.choice([1, 3, 16])),
            ]
        )
        == 0
    )
    printed = float(re.search(r"val bits/byte ([0-9.]+)", capsys.readouterr().out).group(1))
    report = (tmp_path / "report.md").read_text()
    assert (
        _section_rows(report, "base")["val_bpb"]
        == _section_rows(report, "base-eval")["val bpb"]
        == f"{printed:.4f}"
        == f"{trained:.4f}"
    )
    model = load_stage_model("base", 1, base_dir=tmp_path)[0].eval()
    tok = Tokenizer.load(tmp_path / "tokenizer")
    ref = _reference_bpb(model, tok, [text / "b_val.txt"], n_tokens)
    assert abs(trained - ref) < 1e-4 * ref, (trained, ref)


def test_speedrun_and_eval_measure_the_same_things(tmp_path):
    from rustchat.speedrun import stage_configs

    configs = stage_configs(SpeedrunConfig(preset="tiny", device="cpu", base_dir=str(tmp_path), quiet=True), tmp_path)
    # base: the eval scores the tokens training's evaluation scored, from the file it held out
    assert configs["base-eval"].bpb_tokens == configs["base"].bpb_tokens
    data = Path(configs["base"].data_dir)
    data.mkdir(parents=True)
    for name in ("train.jsonl", "val.jsonl"):
        (data / name).write_text('{"text": "x"}\n')
    assert default_val_files(tmp_path, None) == [data / "val.jsonl"]  # what `rustchat base` holds out: the last
    # mid and SFT: `rustchat eval --tasks tiny` with its defaults scores the speedrun's problems
    plain = EvalConfig(tasks="tiny")
    for stage in ("mid", "sft"):
        sr = configs[f"{stage}-eval"]
        assert sr.tasks == plain.tasks and sr.max_problems == plain.max_problems
    mine = [load_task(n, configs["sft-eval"].max_problems) for n in parse_tasks(configs["sft-eval"].tasks)]
    theirs = [load_task(n, plain.max_problems) for n in parse_tasks(plain.tasks)]
    assert [len(t) for t in mine] == [len(t) for t in theirs]
    for a, b in zip(mine, theirs):
        idx = np.random.default_rng().choice(len(a), size=min(20, len(a)), replace=False)
        assert all(a[int(i)] == b[int(i)] for i in idx)
