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

from rustchat import sandbox
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


_NO_GUARDS = 'import builtins, os\n_kept = {n: getattr(os, n) for n in ("read", "write", "_exit")}\n'  # what the runner needs of the guards' setup


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
        try:  # refused by the guards; were it not, the shell would run as another user
            posix.system("echo pwned > {victim}; rm -f {victim}; echo pwned > {tmp}/new.txt")
        except OSError:
            pass
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


@pytest.fixture
def no_guards(monkeypatch):
    """Candidates run without the in-process guards: what is left is the OS-level containment
    (a candidate that found a way past the guards gets no further than this)."""
    monkeypatch.setattr(sandbox, "_CANDIDATE_RUNNER", sandbox._CANDIDATE_RUNNER.replace(sandbox._GUARDS, _NO_GUARDS))


def _connect_attack_on_a_local_listener():
    """A candidate that connects to a service listening on 127.0.0.1 with the raw socket
    module: (its result, whether the listener was ever reached)."""
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
        try:
            server.accept()
        except socket.timeout:
            return result, False
        return result, True


@needs_namespaces
def test_raw_sockets_reach_nothing(no_guards):
    result, reached = _connect_attack_on_a_local_listener()
    assert not result.passed
    assert "OSError" in result.stderr or "ConnectionRefusedError" in result.stderr, result.stderr
    assert not reached


@needs_namespaces
def test_setsid_child_does_not_outlive_the_timeout(no_guards):
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


# --- the fallback (no bubblewrap): forced here whatever this machine has ---------------------


@pytest.fixture
def fallback(monkeypatch):
    """Run the sandbox as it runs where bwrap is missing (RUSTCHAT_SANDBOX=rlimits)."""
    monkeypatch.setenv("RUSTCHAT_SANDBOX", "rlimits")
    sandbox._bwrap_status.cache_clear()
    assert protection().startswith("rlimits only: ")
    yield
    sandbox._bwrap_status.cache_clear()


RAW_ENTRY_POINTS = {
    "_socket.socket": "import _socket\n_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)",
    "socket.socket": "import socket\nsocket.socket()",
    "socket.create_connection": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "_socket.socketpair": "import _socket\n_socket.socketpair()",
    "os.posix_spawn": "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "posix.posix_spawn": "import posix\nposix.posix_spawn('/bin/true', ['true'], {})",
    "posix.posix_spawnp": "import posix\nposix.posix_spawnp('true', ['true'], {})",
    "_posixsubprocess.fork_exec": "import _posixsubprocess\n_posixsubprocess.fork_exec()",
    "subprocess.run": "import subprocess\nsubprocess.run(['/bin/true'])",
    "posix.fork": "import posix\nposix.fork()",
    "posix.setsid": "import posix\nposix.setsid()",
    "posix.execv": "import posix\nposix.execv('/bin/true', ['true'])",
    "posix.system": "import posix\nposix.system('true')",
    "posix.kill": "import posix\nposix.kill(posix.getpid(), 0)",
    "os.killpg": "import os\nos.killpg(os.getpgid(0), 0)",
    "signal.pthread_kill": "import signal, threading\nsignal.pthread_kill(threading.get_ident(), 0)",
    "ctypes": "import ctypes",
    "a fresh posix": "import sys\ndel sys.modules['posix']\nimport posix",
    "a reloaded _socket": "import importlib, _socket\nimportlib.reload(_socket)",
}


@pytest.mark.parametrize("name", sorted(RAW_ENTRY_POINTS))
def test_fallback_guards_block_raw_entry_points(fallback, name):
    candidate = (
        "def probe():\n    try:\n"
        + textwrap.indent(RAW_ENTRY_POINTS[name], "        ")
        + "\n    except (OSError, ImportError) as e:\n        return 'blocked'\n    return 'ran'\n"
    )
    tests = "def check(candidate):\n    assert candidate() == 'blocked'\n"
    result = run_tests(candidate, "probe", "", tests, timeout=10)
    assert result.passed, result.stderr
    assert _exec_dirs() == set()


def test_fallback_refuses_network_to_local_services(fallback):
    result, reached = _connect_attack_on_a_local_listener()
    assert not result.passed and "network access is disabled" in result.stderr, result.stderr
    assert not reached


# A candidate that got past the in-process guards (here: run without them): what stays is the
# OS-level part of the fallback (a fresh uid per candidate, its session and uid killed, its files
# removed). It leaves a `setsid` grandchild that SIGSTOPs and kills every process it can reach,
# and files in /tmp and /dev/shm.
SABOTEUR = """
import os, signal, time
def add(a, b):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            end = time.monotonic() + 30
            while time.monotonic() < end:
                for p in os.listdir("/proc"):
                    if p.isdigit() and int(p) != os.getpid():
                        for sig in (signal.SIGSTOP, signal.SIGTERM):
                            try:
                                os.kill(int(p), sig)
                            except OSError:
                                pass
                time.sleep(0.005)
            os._exit(0)
        os._exit(0)
    for d in ("/tmp", "/dev/shm"):
        try:
            with open(f"{d}/MARKER", "wb") as f:
                f.write(b"x" * (8 << 20))
        except OSError:
            pass
    time.sleep(0.5)  # the grandchild is running when the candidate's turn ends
    return a + b
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a fresh uid per candidate needs root")
@pytest.mark.parametrize("guards", [True, False], ids=["guarded", "guards-bypassed"])
def test_fallback_saboteur_leaves_nothing_and_later_candidates_pass(fallback, monkeypatch, guards):
    marker = f"rustchat_saboteur_{random.randrange(10**9)}"
    if not guards:
        monkeypatch.setattr(
            sandbox, "_CANDIDATE_RUNNER", sandbox._CANDIDATE_RUNNER.replace(sandbox._GUARDS, _NO_GUARDS)
        )
    sabotage = run_tests(SABOTEUR.replace("MARKER", marker), "add", PROMPT, TEST, timeout=3)
    if guards:  # its fork is refused; unguarded, its own verdict is whatever its grandchild made it
        assert sabotage.status == "failed" and "PermissionError" in sabotage.stderr, sabotage.stderr
    # every process of the candidates' fresh uids is gone, and its files with them
    lo, size = sandbox._FRESH_UIDS
    assert [p for p, _g, _s, uids in sandbox._proc_table() if any(lo <= u < lo + size for u in uids)] == []
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/dev/shm/{marker}")
    for _ in range(3):
        result = run_tests("def add(a, b):\n    return a + b\n", "add", PROMPT, TEST, timeout=10)
        assert result.passed, (result.status, result.stderr)
    assert _exec_dirs() == set()


def test_fallback_eval_refuses_humaneval_without_allow_unsandboxed(fallback, tmp_path, capsys):
    from rustchat.cli import main

    args = ["eval", "--base-dir", str(tmp_path / "none"), "--tasks", "humaneval", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-unsandboxed" in err and "bubblewrap" in err, err
    # tasks that run no code are not refused
    assert sandbox_free("tiny") is None and sandbox_free("arc-easy,gsm8k") is None


def sandbox_free(tasks: str):
    from rustchat.config import EvalConfig
    from rustchat.evaluate import code_sandbox

    return code_sandbox(EvalConfig(tasks=tasks))


def test_fallback_allowed_line_says_unsandboxed(fallback):
    from rustchat.config import EvalConfig
    from rustchat.evaluate import code_sandbox

    line = code_sandbox(EvalConfig(tasks="humaneval", allow_unsandboxed=True))
    assert line.startswith("rlimits only: ") and "network not isolated" in line and "--allow-unsandboxed" in line
