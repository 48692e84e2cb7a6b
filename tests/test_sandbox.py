"""The HumanEval sandbox against hostile candidates: every attack fails and the evaluator (this
process), files outside the sandbox and the process table are left as they were.

Attacks that only namespaces stop are skipped, saying why, where bubblewrap cannot run."""

import os
import random
import shutil
import socket
import tempfile
import textwrap
from pathlib import Path

import pytest

from rustchat.sandbox import MAX_PROCESSES, protection, run_tests
from rustchat.tasks.humaneval import check_humaneval

PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n"

NAMESPACES = protection().startswith("bubblewrap")
# without namespaces, signals and writes are stopped only by running as another user (nobody)
OTHER_USER = NAMESPACES or os.geteuid() == 0
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason=f"needs bubblewrap: {protection()}")
needs_other_user = pytest.mark.skipif(not OTHER_USER, reason=f"rlimits only and not root: {protection()}")


@pytest.fixture(autouse=True)
def own_tempdir(monkeypatch, tmp_path):  # tmp_path first: pytest makes it under the real temp dir
    """The sandbox's temp dirs go to a dir of this test's own, so others' runs cannot confuse
    the leak check; enterable (not listable) by `nobody`, as /tmp is."""
    d = tempfile.mkdtemp(prefix="rustchat_sandbox_test_")
    os.chmod(d, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _exec_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("rustchat_exec_")}


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(pid))
    return found


def _body(code: str) -> str:
    """`code` as the body of the candidate `add`: a reply defining the function, as HumanEval
    replies must (the prompt is not prepended, as in nanochat)."""
    return "def add(a, b):\n" + textwrap.indent(textwrap.dedent(code), "    ")


def _attack(code: str, timeout: float = 5.0):
    """Run `code` as a hostile `add`; the evaluator's temp dirs must all be cleaned up."""
    result = check_humaneval(PROMPT, _body(code), TEST, "add", timeout=timeout)
    assert _exec_dirs() == set(), "the sandbox left its temp dir behind"
    return result


@pytest.fixture
def outside(tmp_path):
    """A file and a directory outside the sandbox that no candidate may change."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return tmp_path, victim


def test_protection_is_reported():
    line = protection()
    assert line.startswith(("bubblewrap (namespaces: mount, pid, net", "rlimits only: "))
    assert f"{MAX_PROCESSES} processes" in line


@needs_other_user
def test_posix_system_cannot_touch_files_outside(outside):
    tmp, victim = outside
    result = _attack(f"""
        import posix
        posix.system("echo pwned > {victim}; rm -f {victim}; echo pwned > {tmp}/new.txt")
        return a + b
    """)
    assert result.passed  # the attack did not stop a correct answer from counting...
    assert victim.read_text() == "precious" and not (tmp / "new.txt").exists()  # ...and changed nothing


@needs_other_user
def test_writing_and_deleting_outside_fails(outside):
    tmp, victim = outside
    result = _attack(f"""
        import posix
        for attempt in (lambda: open({str(victim)!r}, "w").write("pwned"),
                        lambda: posix.unlink({str(victim)!r}),
                        lambda: open({str(tmp / "new.txt")!r}, "w").write("pwned"),
                        lambda: posix.rename({str(victim)!r}, {str(tmp / "moved.txt")!r})):
            try:
                attempt()
            except OSError:
                pass
        open("scratch.txt", "w").write("own temp dir is writable")  # the cwd is its own
        return a + b
    """)
    assert result.passed, result.stderr
    assert sorted(p.name for p in tmp.iterdir()) == ["victim.txt"] and victim.read_text() == "precious"


@needs_namespaces
def test_raw_sockets_reach_nothing():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = _attack(f"""
            import _socket
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(("127.0.0.1", {port}))
            return a + b
        """)
        assert not result.passed
        assert "OSError" in result.stderr or "ConnectionRefusedError" in result.stderr, result.stderr
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected


@needs_namespaces
def test_setsid_child_does_not_outlive_the_timeout():
    marker = f"{random.randrange(10**6, 10**7)}.{random.randrange(10**6)}"
    result = _attack(
        f"""
        import posix
        if posix.fork() == 0:
            posix.setsid()
            posix.execv("/bin/sleep", ["sleep", "{marker}"])
        while True:
            pass
    """,
        timeout=2,
    )
    assert result.status == "timeout"
    assert _processes_with(marker) == []


@needs_other_user
def test_killing_the_evaluator_fails():
    result = _attack("""
        import os, posix
        for target in (os.getppid(), 1, -1):
            try:
                posix.kill(target, 9)
            except OSError:
                pass
        return a + b
    """)
    # this process (the evaluator) is still here, the harness survived to judge, and _attack
    # saw the temp dir removed
    assert result.passed, result.stderr


def test_fork_bomb_is_bounded_by_the_process_limit():
    marker = f"{random.randrange(10**6, 10**7)}.{random.randrange(10**6)}"
    candidate = textwrap.dedent(f"""
        import posix
        def forks():
            n = 0
            try:
                for _ in range(5 * {MAX_PROCESSES}):
                    if posix.fork() == 0:
                        posix.execv("/bin/sleep", ["sleep", "{marker}"])
                    n += 1
            except OSError:
                pass
            return n
    """)
    # the harness (outside the candidate) checks the count the candidate reached
    tests = f"def check(candidate):\n    n = candidate()\n    assert n < {MAX_PROCESSES}, n\n"
    result = run_tests(candidate, "forks", "", tests, timeout=10)
    assert result.passed, result.stderr
    assert _processes_with(marker) == []


@pytest.mark.parametrize(
    "forgery",
    [
        "import __main__, os\nprint('\\n' + str(getattr(__main__, '_nonce', '')))\nos._exit(0)",
        "import sys, os\nprint('harness: all checks passed')\nsys.stdout.flush()\nos._exit(0)",
        "import os\nos.write(3, b'harness: all checks passed\\n')\nos._exit(0)",
        "raise SystemExit(0)",
        "class Anything:\n    def __eq__(self, other):\n        return True\nreturn Anything()",
    ],
)
def test_a_pass_cannot_be_forged(forgery):
    result = _attack(forgery)
    assert result.status == "failed", (result.stdout, result.stderr)
    # the same candidate with the right answer still passes: the harness, not the candidate, decides
    assert _attack("return a + b").passed


def test_memory_limit_and_big_values_fail_cleanly():
    assert _attack("x = bytearray(8 << 30)\nreturn a + b").status == "failed"
    assert _attack("return 'x' * (100 << 20)").status == "failed"  # larger than a reply may be
