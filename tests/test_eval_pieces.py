"""Model-free evaluation pieces: the calculator tool, the sandboxed HumanEval runner, scoring."""

import random
import re
import string
import time

import numpy as np
import pytest

from rustchat.common import RustchatError
from rustchat.sandbox import run_program
from rustchat.scoring import BASELINES, categorical_pick, centered, chatcore, extract_answer, gsm8k_correct
from rustchat.tasks.humaneval import MEMORY_MB, TIMEOUT_S, build_candidate, check_humaneval, extract_imports
from rustchat.tools import calculate

SEED = random.randrange(1 << 30)


@pytest.fixture
def rng():
    print(f"seed {SEED}")
    return random.Random(SEED)


# ------------------------------------------------------------------------------- calculator


def random_expr(rng, depth=0):
    if depth > 3 or rng.random() < 0.3:
        return str(rng.randint(0, 999))
    op = rng.choice(["+", "-", "*", "//", "%", "/", "**"])
    a, b = random_expr(rng, depth + 1), random_expr(rng, depth + 1)
    if op == "**":
        b = str(rng.randint(0, 4))
    e = f"({a} {op} {b})"
    return f"-{e}" if rng.random() < 0.2 else e


def test_calculator_arithmetic(rng):
    checked = 0
    for _ in range(400):
        e = random_expr(rng)
        try:
            want = eval(e, {"__builtins__": {}})  # test oracle on our own generated arithmetic only
        except (ZeroDivisionError, OverflowError):
            assert calculate(e) is None
            continue
        got = calculate(e)
        if isinstance(want, int) and want.bit_length() <= 4096:
            assert got == str(want), e
        elif isinstance(want, float):
            assert got is not None and float(got) == pytest.approx(want, rel=1e-9, abs=1e-9), e
        checked += 1
    assert checked > 200
    assert calculate("48/2") == "24" and calculate("10/4") == "2.5" and calculate(" 2 ** 10 ") == "1024"
    assert calculate("-3 // 2") == "-2" and calculate("+7 % 3") == "1" and calculate("1,200 * 3") == "3600"


def test_calculator_count(rng):
    for _ in range(50):
        s = "".join(rng.choices("abcr, ", k=rng.randint(0, 30)))
        ch = rng.choice("abcr,")
        assert calculate(f"'{s}'.count('{ch}')") == str(s.count(ch))
        assert calculate(f'"{s}".count("{ch}") + 1') == str(s.count(ch) + 1)
    assert calculate("'strawberry'.count('r')") == "3"


@pytest.mark.parametrize(
    "expr",
    [
        "x + 1",
        "__import__('os').system('echo hi')",
        "open('/etc/passwd').read()",
        "abs(-1)",
        "'a'.upper()",
        "'a'.__class__",
        "(1).real",
        "'ab'.count('a', 1)",
        "'ab'.count(x)",
        "s.count('a')",
        "'a' * 3",
        "'a' + 'b'",
        "lambda: 1",
        "[x for x in range(3)]",
        "{1: 2}",
        "[1, 2]",
        "(1, 2)",
        "1 if 1 else 2",
        "1 < 2",
        "not 1",
        "True + 1",
        "None",
        "1j * 2",
        "~1",
        "1 << 3",
        "1 & 3",
        "import os",
        "x = 1",
        "9**9**9",
        "2**100000",
        "10**5000",
        "(2**4000) * (2**4000)",
        "1/0",
        "5 % 0",
        "1e308 * 10",
        "(-8) ** 0.5",
        "",
        "1 +",
        "a" * 2000,
        "f'{1}'",
        "b'x'.count(b'x')",
        "...",
        "(lambda: 1)()",
        "__builtins__",
        "(" * 400 + "1" + ")" * 400,
    ],
)
def test_calculator_refuses(expr):
    # Refused by its limits up front, not after computing for a while (CPU time: a busy
    # machine stalling this process must not fail the test).
    t = time.process_time()
    assert calculate(expr) is None
    assert time.process_time() - t < 0.5


# ------------------------------------------------------------------------ HumanEval sandbox


def test_sandbox_limits():
    # sys.exit before the tests must not count as a pass
    assert run_program("import sys\nsys.exit(0)\nassert False", timeout=3).status == "failed"
    assert run_program("import os\nos._exit(0)", timeout=3).status == "failed"
    net = run_program("import socket\nsocket.socket()", timeout=3)
    assert net.status == "failed" and "network access is disabled" in net.stderr
    assert run_program("x = bytearray(8 << 30)", timeout=3, memory_mb=512).status == "failed"
    assert run_program("import os\nos.system('true')", timeout=3).status == "failed"
    env = run_program("import os\nassert 'PYTHONPATH' not in os.environ and os.environ['HTTPS_PROXY'].endswith(':9')")
    assert env.passed, env.stderr
    out = run_program("print('hello')")
    assert out.passed and out.stdout == "hello"


# ---------------------------------------------------------------------------------- scoring


def test_chatcore(rng):
    accs = {t: rng.random() for t in BASELINES}
    want = np.mean(
        [
            (a - (0.25 if t in ("ARC-Easy", "ARC-Challenge", "MMLU") else 0.0))
            / (1 - (0.25 if t in ("ARC-Easy", "ARC-Challenge", "MMLU") else 0.0))
            for t, a in accs.items()
        ]
    )
    assert chatcore(accs) == pytest.approx(want)
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.0}) == 0.0
    assert chatcore({"MMLU": 1.0, "HumanEval": 1.0}) == pytest.approx(1.0)
    assert chatcore({"ARC-Easy": 0.4}) == pytest.approx(0.2)
    assert centered(0.5, 0.5) == 0.0
    assert chatcore({"Mine": 0.6}, baselines={"Mine": 0.5}) == pytest.approx(0.2)
    with pytest.raises(RustchatError, match="no ChatCORE baseline"):
        chatcore({"Unknown": 0.5})
    with pytest.raises(RustchatError):
        chatcore({})


def test_categorical_pick(rng):
    gen = np.random.default_rng(rng.randrange(1 << 30))
    for _ in range(50):
        vocab = int(gen.integers(10, 500))
        letters = gen.choice(vocab, size=int(gen.integers(2, 6)), replace=False)
        logits = gen.normal(size=vocab).astype(np.float32)
        want = max(range(len(letters)), key=lambda i: logits[letters[i]])
        assert categorical_pick(logits, letters) == want
    torch = pytest.importorskip("torch")
    batch = gen.normal(size=(7, 100)).astype(np.float32)
    letters = [5, 17, 3, 99]
    want = [max(range(4), key=lambda i: row[letters[i]]) for row in batch]
    assert categorical_pick(batch, letters) == want
    assert categorical_pick(torch.from_numpy(batch).to(torch.bfloat16).float(), letters) == [
        max(range(4), key=lambda i: float(torch.tensor(row).bfloat16().float()[letters[i]])) for row in batch
    ]
    # the best token overall is not a letter: it must be ignored
    x = np.zeros(10)
    x[0], x[4] = 100.0, 1.0
    assert categorical_pick(x, [2, 4, 6]) == 1


def nanochat_answer(text):
    """nanochat's reader (GSM8K's at 48abd7d and 92d63d4, SpellingBee's at 48abd7d), transcribed:
    the first match of `#### (-?[0-9.,]+)`, stripped, commas removed; None without a match."""
    m = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return None if m is None else m.group(1).strip().replace(",", "")


def test_answer_extraction_is_nanochats(rng):
    for _ in range(50):
        n = rng.randint(-(10**7), 10**7)
        text = "".join(rng.choices(string.ascii_letters + " \n", k=20))
        assert extract_answer(f"{text}\n#### {n:,}") == str(n)
        assert gsm8k_correct(f"#### {n}", f"{text} #### {n:,}")
        assert not gsm8k_correct(f"#### {n}", f"#### {n + 1}")
    # fuzz: random strings around the marker read exactly as nanochat reads them
    alphabet = "#### 0123456789.,-$\nab "
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 16)))
        if rng.random() < 0.7:
            text = text[: rng.randint(0, len(text))] + "#### " + text
        assert extract_answer(text) == nanochat_answer(text), text
        ref = f"#### {rng.randint(0, 99)}"
        assert gsm8k_correct(ref, text) == (nanochat_answer(text) == nanochat_answer(ref)), (ref, text)
    assert extract_answer("no answer") is None
    # the cases nanochat rejects and rustchat used to accept
    for reply in ("#### 18.0", "####18", "#### $18", "####\n18", "#### +18", "the answer is 18"):
        assert not gsm8k_correct("#### 18", reply), reply
    assert gsm8k_correct("#### 1800", "so #### 1,800 in all") and extract_answer("#### 1,234.50.") == "1234.50."
    assert not gsm8k_correct("#### 1800", "so #### 1,800.")  # the trailing dot is read too, as in nanochat
    assert extract_answer("#### 3 and #### 4") == "3"  # the first match counts


# the HumanEval program as nanochat builds it (48abd7d and 92d63d4), transcribed: prompt imports (up to the first line
# that is neither import, comment nor blank), the first closed ```python / ``` block (else the
# whole reply), both stripped, then the tests and check(entry_point)
def nanochat_imports(prompt):
    out = []
    for line in prompt.split("\n"):
        s = line.strip()
        if s.startswith("import ") or s.startswith("from "):
            out.append(s)
        elif s and not s.startswith("#"):
            break
    return "\n".join(out)


def nanochat_program(prompt, completion, test, entry_point):
    blocks = re.findall(r"```(?:python)?\s*\n(.*?)\n```", completion, re.DOTALL)
    code = blocks[0].strip() if blocks else completion.strip()
    return nanochat_imports(prompt) + "\n\n" + code + "\n\n" + test + "\n" + f"check({entry_point})"


def test_humaneval_program_is_nanochats(rng):
    prompt = "import math\n# helper\nfrom typing import List\n\ndef f(xs: List[int]) -> int:\n    import os\n"
    pieces = [
        "```python\n",
        "```\n",
        "```Python\n",
        "```",
        "\n",
        "def f(xs):\n",
        "    return sum(xs)\n",
        "text ",
        "```python \n",
        "    return 1\n",
    ]
    for _ in range(300):
        completion = "".join(rng.choices(pieces, k=rng.randint(0, 8)))
        # our candidate is nanochat's program without the tests (those run in the harness)
        ours = build_candidate(prompt, completion) + "\n\n" + TEST + "\n" + "check(f)"
        assert ours == nanochat_program(prompt, completion, TEST, "f"), completion
    assert extract_imports(prompt) == "import math\nfrom typing import List"


PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n"


def test_humaneval_pass_fail_timeout():
    full = "def add(a, b):\n    return a + b\n"
    ok = check_humaneval(PROMPT, f"Sure:\n```python\n{full}```\nThat's it.", TEST, "add", timeout=3)
    assert ok.status == "passed" and ok.passed, ok.stderr
    bad = check_humaneval(PROMPT, "def add(a, b):\n    return a - b\n", TEST, "add", timeout=3)
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    # as in nanochat: a reply with only the body fails (the prompt is not prepended), so does an unclosed fence
    assert check_humaneval(PROMPT, "    return a + b\n", TEST, "add", timeout=3).status == "failed"
    assert check_humaneval(PROMPT, f"```python\n{full}", TEST, "add", timeout=3).status == "failed"
    loop = check_humaneval(PROMPT, "def add(a, b):\n    while True:\n        pass\n", TEST, "add", timeout=2)
    assert loop.status == "timeout"  # killed at its limit: the status says so, whatever the machine's load
    syntax = check_humaneval(PROMPT, "def add(a, b):\n    return a +\n", TEST, "add", timeout=3)
    assert syntax.status == "failed"
    # nanochat's limits (48abd7d, 92d63d4): 5 s and 256 MiB
    assert (TIMEOUT_S, MEMORY_MB) == (5.0, 256)
    hog = check_humaneval(PROMPT, "def add(a, b):\n    x = bytearray(400 << 20)\n    return a + b\n", TEST, "add")
    assert hog.status == "failed"
    small = check_humaneval(PROMPT, "def add(a, b):\n    x = bytearray(50 << 20)\n    return a + b\n", TEST, "add")
    assert small.passed, small.stderr


def test_calculator_refuses_malformed_numbers_without_a_warning():
    """What a small model writes ("3abc", "1e", "0x") is refused quietly: no SyntaxWarning
    reaches the user's terminal during RL or chat."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for expr in ("3abc", "1e", "12and 3", "0x", "1_"):
            assert calculate(expr) is None
    assert not caught, [str(w.message) for w in caught]
