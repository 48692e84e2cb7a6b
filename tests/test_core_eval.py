"""The CORE metric: per-example verdicts of rustchat.core_eval against a plain-Python scorer
(tests/ref_core.py) on a tiny trained model and a bundle in the real layout (three task types,
few-shot, prompts longer than the context), CORE by hand, `rustchat eval -i base --core`
end to end (table, CSV, report, 1 process == 2 gloo processes), malformed bundles, and the
bundle download (checksum, zip check, lock, offline message)."""

import copy
import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

import ref_core
from rustchat import Tokenizer
from rustchat import core_bundle
from rustchat.checkpoint import save_checkpoint, stage_dir
from rustchat.cli import main
from rustchat.common import RustchatError
from rustchat.core_bundle import ensure_bundle, load_bundle, load_examples
from rustchat.core_eval import CoreResult, TaskScore, core_csv, core_metric, encode_example, subsample, task_verdicts
from rustchat.model import GPT, GPTConfig

SUBJECTS = ["the cat", "a dog", "my bird", "his fish", "our cow", "that fox"]
VERBS = ["sat on", "ran to", "looked at", "jumped over"]
OBJECTS = ["mat", "hill", "moon", "fence", "river", "barn", "road"]
CONTEXT = 64  # the tiny model's context: the long task's prompts exceed it


def obj_of(s: int, v: int) -> str:
    """The object the training text always pairs with subject s and verb v."""
    return OBJECTS[(2 * s + v) % len(OBJECTS)]


def sentence(s: int, v: int) -> str:
    return f"{SUBJECTS[s]} {VERBS[v]} the {obj_of(s, v)}."


def _pairs(rng):
    return rng.randrange(len(SUBJECTS)), rng.randrange(len(VERBS))


def mc_rows(rng, n, long=False):
    rows = []
    for _ in range(n):
        s, v = _pairs(rng)
        lead = " ".join(sentence(*_pairs(rng)) for _ in range(4)) + " " if long else ""
        choices = rng.sample(OBJECTS, 4)
        if rng.random() < 0.7 and obj_of(s, v) not in choices:
            choices[rng.randrange(4)] = obj_of(s, v)
        rows.append({"query": f"{lead}{SUBJECTS[s]} {VERBS[v]} the", "choices": choices, "gold": rng.randrange(4)})
    return rows


def schema_rows(rng, n):
    rows = []
    for _ in range(n):
        s, v = _pairs(rng)
        subjects = rng.sample(range(len(SUBJECTS)), 3)
        rows.append(
            {
                "context_options": [f"{SUBJECTS[k]} {VERBS[v]}" for k in subjects],
                "continuation": f"the {obj_of(s, v)}.",
                "gold": rng.randrange(3),
            }
        )
    return rows


def lm_rows(rng, n):
    rows = []
    for _ in range(n):
        s, v = _pairs(rng)
        right = rng.random() < 0.6
        obj = obj_of(s, v) if right else rng.choice(OBJECTS)
        # trailing spaces in contexts are part of the real data; the renderer strips them
        rows.append({"context": f"{SUBJECTS[s]} {VERBS[v]} the" + " " * rng.randrange(3), "continuation": f"{obj}."})
    return rows


# label -> (type, shots, delimiter, rows maker, random baseline %)
TASKS = {
    "mc_objects": ("multiple_choice", 3, " ", mc_rows, 25.0),
    "schema_subjects": ("schema", 2, " ", schema_rows, 33.3),
    "lm_objects": ("language_modeling", 2, " ", lm_rows, 0.0),
    "mc_long_prompts": ("multiple_choice", 5, " ", lambda rng, n: mc_rows(rng, n, long=True), 25.0),
    "mc_colon": ("multiple_choice", 1, ": ", mc_rows, 25.0),
}


def make_bundle(root: Path, seed: int, n: int = 30) -> Path:
    """A bundle directory in the eval bundle's layout, with random data of the TASKS."""
    rng = random.Random(seed)
    (root / "eval_data" / "sub").mkdir(parents=True)
    icl, meta = [], [["Eval Task", "Task Category", "Random baseline"]]
    for label, (kind, shots, delim, maker, base) in TASKS.items():
        uri = f"sub/{label}.jsonl"
        with open(root / "eval_data" / uri, "w", encoding="utf-8") as f:
            for row in maker(rng, n):
                f.write(json.dumps(row) + "\n")
        icl.append(
            f"- label: {label}\n  dataset_uri: {uri}\n  num_fewshot: [{shots}]\n"
            f"  icl_task_type: {kind}\n  continuation_delimiter: {json.dumps(delim)}\n"
        )
        meta.append([label, "test", base])
    (root / "core.yaml").write_text("icl_tasks:\n" + "".join(icl))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        csv.writer(f).writerows(meta)
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model's matrices are tiny: one thread beats two, by far on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, a depth-2 model trained on the sentences the tasks ask about, base dir)."""
    base = tmp_path_factory.mktemp("core_base")
    rng = random.Random(7)
    text = [" ".join(sentence(*_pairs(rng)) for _ in range(12)) for _ in range(300)]
    tok = Tokenizer.train(text, vocab_size=300)
    tok.save(base / "tokenizer")
    torch.manual_seed(random.randrange(1 << 30))
    model = GPT(GPTConfig.from_depth(2, vocab_size=tok.vocab_size, sequence_len=CONTEXT, aspect_ratio=32, head_dim=16))
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.normal_(0, 0.05)
    stream = [t for doc in text for t in tok.encode(doc, prepend=tok.bos_token_id)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        starts = [rng.randrange(len(stream) - CONTEXT - 1) for _ in range(8)]
        x = torch.tensor([stream[s : s + CONTEXT] for s in starts])
        y = torch.tensor([stream[s + 1 : s + CONTEXT + 1] for s in starts])
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    save_checkpoint(stage_dir("base", 2, base), 40, model, None, {"stage": "base"})
    return tok, model, base


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    """(a random bundle of 20 examples per task, the reference's verdicts and crop counts per label)."""
    tok, model, _ = tiny
    root = make_bundle(tmp_path_factory.mktemp("core_bundle") / "b", seed=random.randrange(1 << 30), n=20)
    model64 = copy.deepcopy(model).double()
    ref = {
        t.label: ref_core.verdicts(
            model64, tok, t.task_type, load_examples(t), t.num_fewshot, t.continuation_delimiter, CONTEXT
        )
        for t in load_bundle(root)
    }
    return root, ref


def test_verdicts_match_the_plain_python_scorer(tiny, bundle):
    tok, model, _ = tiny
    root, ref = bundle
    for task in load_bundle(root):
        ours = task_verdicts(model, tok, task, subsample(load_examples(task), None), 8 * CONTEXT)
        verdicts, cropped = ref[task.label]
        assert ours == verdicts, task.label
        # the check can fail: both verdicts occur
        assert 0 < sum(ours) < len(ours), (task.label, ours)
        # the long task's rows exceed the context, the others' do not
        assert (cropped > 0) == (task.label == "mc_long_prompts"), (task.label, cropped)


def test_max_per_task_takes_the_seeded_shuffle_and_batching_does_not_matter(tiny, bundle):
    tok, model, _ = tiny
    model64 = copy.deepcopy(model).double()
    for task in load_bundle(bundle[0]):
        data = subsample(load_examples(task), 9)
        ours = task_verdicts(model, tok, task, data, 1)  # one example per forward
        ref, _ = ref_core.verdicts(
            model64, tok, task.task_type, load_examples(task), task.num_fewshot, task.continuation_delimiter, CONTEXT, 9
        )
        assert ours == ref, task.label


def test_crop_keeps_the_last_tokens_and_shifts_the_span(tiny, tmp_path):
    tok, model, _ = tiny
    task = next(t for t in load_bundle(make_bundle(tmp_path / "b", seed=3)) if t.label == "mc_long_prompts")
    data = load_examples(task)
    full = encode_example(tok, task, data, 0, 10_000)
    cut = encode_example(tok, task, data, 0, CONTEXT)
    for r in range(len(full.rows)):
        assert len(full.rows[r]) > CONTEXT and cut.rows[r] == full.rows[r][-CONTEXT:]
        drop = len(full.rows[r]) - CONTEXT
        assert (cut.starts[r], cut.ends[r]) == (full.starts[r] - drop, full.ends[r] - drop)


def test_core_by_hand():
    # (acc - b) / (1 - b): 0.5 at 25% -> 1/3, 0.8 at 0% -> 0.8, 0.3 at 50% -> -0.4; mean 0.24444
    from rustchat.scoring import centered

    scores = [
        TaskScore("a", "multiple_choice", 0, 4, 0.5, centered(0.5, 0.25), 1.0),
        TaskScore("b", "language_modeling", 0, 5, 0.8, centered(0.8, 0.0), 1.0),
        TaskScore("c", "schema", 0, 10, 0.3, centered(0.3, 0.5), 1.0),
    ]
    res = CoreResult(scores, seconds=2.0)
    assert res.core == pytest.approx((1 / 3 + 0.8 - 0.4) / 3, abs=1e-12)
    assert core_metric([1.0, 0.0]) == 0.5
    lines = core_csv(res).splitlines()
    assert lines[0].split(",")[0].strip() == "Task" and len(lines) == 5
    assert lines[1].split(", ")[0].strip() == "a" and float(lines[1].split(",")[2]) == pytest.approx(1 / 3, abs=1e-6)
    assert lines[-1].split(",")[0].strip() == "CORE" and float(lines[-1].split(",")[2]) == pytest.approx(
        0.244444, abs=1e-6
    )
    assert res.examples == 19 and res.examples_per_s == pytest.approx(9.5)


def _read_csv(path):
    rows = {}
    for line in Path(path).read_text().splitlines()[1:]:
        label, acc, cen = (c.strip() for c in line.split(","))
        rows[label] = (float(acc) if acc else None, float(cen))
    return rows


def test_rustchat_eval_core_end_to_end(tiny, bundle, capsys):
    tok, model, base = tiny
    root, ref = bundle
    rc = main(
        [
            "eval",
            "-i",
            "base",
            "--core",
            "--bundle",
            str(root),
            "--max-per-task",
            "20",
            "--base-dir",
            str(base),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| Task | Type | Shots | Problems | Accuracy | Centered |" in out
    assert (
        "| mc_long_prompts | multiple_choice | 5 | 20 |" in out and "| lm_objects | language_modeling | 2 | 20 |" in out
    )
    assert "examples/s" in out
    got = _read_csv(base / "base_eval" / "base_model_d2_000040.csv")
    # by hand, from the reference's verdicts and the bundle's baselines (20 examples: all of them)
    centred = []
    for task in load_bundle(root):
        verdicts = ref[task.label][0]
        acc = sum(verdicts) / len(verdicts)
        b = TASKS[task.label][4] / 100
        centred.append((acc - b) / (1 - b))
        assert got[task.label] == pytest.approx((acc, centred[-1]), abs=1e-6)
    assert got["CORE"][1] == pytest.approx(sum(centred) / len(centred), abs=1e-6)
    report = (base / "report.md").read_text()
    assert "## base-eval" in report and "| CORE |" in report and "mc_colon" in report


@pytest.mark.e2e
@pytest.mark.slow
def test_two_gloo_processes_give_the_same_core(tiny, tmp_path):
    _, _, base = tiny
    bundle = make_bundle(tmp_path / "bundle", seed=random.randrange(1 << 30), n=70)  # 2 chunks per task
    results = []
    for nproc in (1, 2):
        d = tmp_path / f"run{nproc}"
        d.mkdir()
        for name in ("tokenizer", "base_checkpoints"):
            os.symlink(base / name, d / name)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "rustchat.cli",
                "eval",
                "-i",
                "base",
                "--core",
                "--bundle",
                str(bundle),
                "--base-dir",
                str(d),
                "--device",
                "cpu",
                "--quiet",
                "--nproc",
                str(nproc),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        results.append((d / "base_eval" / "base_model_d2_000040.csv").read_text())
    assert results[0] == results[1]
    assert _read_csv(tmp_path / "run1" / "base_eval" / "base_model_d2_000040.csv")["mc_objects"][0] > 0


# ----------------------------------------------------------------------------- malformed bundles
def _break(bundle: Path, how: str) -> str:
    """Damage the bundle one way; returns what the error must name."""
    yaml_path, meta = bundle / "core.yaml", bundle / "eval_meta_data.csv"
    data = bundle / "eval_data" / "sub" / "mc_objects.jsonl"
    if how == "no core.yaml":
        yaml_path.unlink()
        return "core.yaml"
    if how == "bad type":
        yaml_path.write_text(yaml_path.read_text().replace("icl_task_type: schema", "icl_task_type: essay"))
        return "icl_task_type"
    if how == "no label":
        yaml_path.write_text(yaml_path.read_text().replace("- label: lm_objects\n ", "-"))
        return "label"
    if how == "missing data":
        data.unlink()
        return "dataset_uri"
    if how == "no baseline":
        meta.write_text("\n".join(l for l in meta.read_text().splitlines() if not l.startswith("lm_objects")) + "\n")
        return "Random baseline"
    if how == "bad baseline":
        meta.write_text(meta.read_text().replace("lm_objects,test,0.0", "lm_objects,test,abc"))
        return "Random baseline"
    if how == "bad json":
        data.write_text(data.read_text() + "{not json\n")
        return "line 31"
    if how == "gold out of range":
        data.write_text(data.read_text() + json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
        return "gold"
    if how == "missing field":
        data.write_text(data.read_text() + json.dumps({"query": "q", "gold": 0}) + "\n")
        return "choices"
    if how == "too few examples":
        data.write_text(data.read_text().splitlines()[0] + "\n")
        return "few-shot"
    raise AssertionError(how)


BREAKS = [
    "no core.yaml",
    "bad type",
    "no label",
    "missing data",
    "no baseline",
    "bad baseline",
    "bad json",
    "gold out of range",
    "missing field",
    "too few examples",
]


@pytest.mark.parametrize("how", BREAKS)
def test_malformed_bundles_get_one_line_errors(tiny, tmp_path, capsys, how):
    _, _, base = tiny
    bundle = make_bundle(tmp_path / "b", seed=1, n=30)
    needle = _break(bundle, how)
    rc = main(
        ["eval", "-i", "base", "--core", "--bundle", str(bundle), "--base-dir", str(base), "--device", "cpu", "--quiet"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rustchat: error: ") and err.count("\n") == 1, err
    assert needle in err, err


def test_nproc_needs_core(capsys):
    assert main(["eval", "-i", "sft", "--nproc", "2"]) == 2
    assert "--nproc" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the download
def _zip_of(bundle: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(bundle.rglob("*")):
            z.write(p, "eval_bundle/" + str(p.relative_to(bundle)))
    return buf.getvalue()


def test_download_checks_the_checksum_and_places_the_bundle_once(tmp_path, monkeypatch):
    blob = _zip_of(make_bundle(tmp_path / "src", seed=2, n=12))
    (tmp_path / "eval_bundle.zip").write_bytes(blob)
    monkeypatch.setenv(core_bundle.URL_ENV, (tmp_path / "eval_bundle.zip").as_uri())
    base = tmp_path / "base"
    # a wrong checksum: refused, nothing left under the bundle's name
    monkeypatch.setenv(core_bundle.SHA_ENV, "0" * 64)
    with pytest.raises(RustchatError, match="SHA-256"):
        ensure_bundle(base, quiet=True)
    assert not (base / "eval_bundle").exists() and not list(base.glob(".eval_bundle.*"))
    # the right one, from 3 threads at once: one download, every caller gets the bundle
    monkeypatch.setenv(core_bundle.SHA_ENV, hashlib.sha256(blob).hexdigest())
    calls = []
    real = core_bundle._download
    monkeypatch.setattr(core_bundle, "_download", lambda *a: calls.append(1) or real(*a))
    got = []
    threads = [threading.Thread(target=lambda: got.append(ensure_bundle(base, quiet=True))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 3 and len(calls) == 1
    assert [t.label for t in load_bundle(got[0])] == list(TASKS)


def test_download_refuses_a_corrupt_zip_and_explains_offline(tmp_path, monkeypatch):
    blob = bytearray(_zip_of(make_bundle(tmp_path / "src", seed=2, n=12)))
    blob[len(blob) // 3] ^= 0xFF  # inside a member: its CRC fails
    (tmp_path / "eval_bundle.zip").write_bytes(bytes(blob))
    monkeypatch.setenv(core_bundle.URL_ENV, (tmp_path / "eval_bundle.zip").as_uri())
    monkeypatch.setenv(core_bundle.SHA_ENV, "")
    with pytest.raises(RustchatError, match="eval_bundle.zip"):
        ensure_bundle(tmp_path / "base", quiet=True)
    assert not (tmp_path / "base" / "eval_bundle").exists()
    monkeypatch.setenv(core_bundle.URL_ENV, "http://127.0.0.1:9/eval_bundle.zip")
    with pytest.raises(RustchatError) as e:
        ensure_bundle(tmp_path / "base", quiet=True)
    msg = str(e.value)
    assert "could not download" in msg and "--bundle" in msg and str(tmp_path / "base" / "eval_bundle") in msg
    assert "\n" not in msg
