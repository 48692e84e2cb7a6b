"""Run untrusted generated code (HumanEval candidates) in a separate, limited Python process.

The child gets: a fresh temp dir as cwd (deleted afterwards), a wall-clock timeout (its whole
process group is killed), RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE, an environment without the
parent's variables and with dead proxies, `socket.socket` replaced by one that refuses to be
created, and destructive os / shutil / subprocess functions disabled. This stops accidents
(infinite loops, memory blow-ups, `rm -rf`, network calls), not a determined attacker: run
evaluations of models you do not trust inside a container or VM as well.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the candidate program. Limits come in through argv.
_PRELUDE = r'''
import sys
_timeout, _mem_bytes, _nonce = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
del sys.argv[1:]
try:
    import resource
    if _mem_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (_mem_bytes, _mem_bytes))
    _cpu = int(_timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
except (ImportError, ValueError, OSError):
    pass  # e.g. macOS refuses RLIMIT_AS: the wall-clock timeout still applies

import socket as _socket
class _NoSocket(_socket.socket):
    def __init__(self, *a, **k):
        raise OSError("network access is disabled in the evaluation sandbox")
_socket.socket = _NoSocket
def _no_net(*a, **k):
    raise OSError("network access is disabled in the evaluation sandbox")
_socket.create_connection = _socket.socketpair = _socket.fromfd = _no_net

import builtins, os, shutil, subprocess
def _disabled(*a, **k):
    raise PermissionError("disabled in the evaluation sandbox")
for _name in ("system", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir", "removedirs",
              "rename", "renames", "replace", "truncate", "chmod", "chown", "putenv", "setuid", "execv",
              "execve", "execvp", "execl", "spawnv", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, _disabled)
shutil.rmtree = shutil.move = shutil.chown = _disabled
subprocess.Popen = _disabled
builtins.help = _disabled

_src = open("program.py", encoding="utf-8").read()
try:
    exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit as e:
    # sys.exit() inside the candidate must not count as passing the tests
    print(f"candidate called sys.exit({e.code!r})", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)
sys.stdout.flush()
sys.__stdout__.write("\n" + _nonce + "\n")
sys.__stdout__.flush()
'''


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed", "failed" or "timeout"
    returncode: int | None
    stdout: str  # tails, for debugging
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024) -> ExecResult:
    """Run `program` (source text) in a limited child Python; "passed" iff it ran to the end.

    `memory_mb` caps the address space (0: no cap). Output is kept to files capped at 16 MiB."""
    nonce = secrets.token_hex(16)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rustchat_exec_") as tmp:
        d = Path(tmp)
        (d / "program.py").write_text(program, encoding="utf-8")
        (d / "runner.py").write_text(_PRELUDE, encoding="utf-8")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            # anything that honours proxies goes nowhere
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "ALL_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": "",
        }
        with open(d / "stdout", "wb") as out, open(d / "stderr", "wb") as err:
            # -I: isolated mode (no user site-packages, no PYTHON* env, cwd not on sys.path first)
            proc = subprocess.Popen(
                [sys.executable, "-I", "runner.py", str(timeout), str(memory_mb << 20), nonce],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # own process group, so a timeout kills any children too
            )
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
            finally:
                _kill_group(proc)
        stdout = (d / "stdout").read_bytes()[-4000:].decode("utf-8", "replace")
        stderr = (d / "stderr").read_bytes()[-4000:].decode("utf-8", "replace")
    seconds = time.monotonic() - t0
    if timed_out or (rc is not None and rc in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in stderr):
        status = "timeout"  # SIGXCPU: the CPU-time limit hit first
    elif rc == 0 and stdout.rstrip().endswith(nonce):
        status = "passed"
    else:
        status = "failed"
    return ExecResult(status, rc, stdout.replace(nonce, "").rstrip(), stderr, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()

