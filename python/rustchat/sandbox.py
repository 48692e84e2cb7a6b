"""Run untrusted generated code (HumanEval candidates) in separate, limited processes.

Every program runs in its own process group (its own session), with RLIMIT_CPU, RLIMIT_AS,
RLIMIT_NPROC and RLIMIT_FSIZE set before any of its code runs, an environment without the
parent's variables, and as the unprivileged user `nobody` when the evaluator is root. Where
bubblewrap (`bwrap`) works, the program also runs in new mount, pid, net, ipc, uts and cgroup
namespaces (and a user namespace when not root), sees only the Python installation
read-only plus a small private tmpfs as its temp dir, and dies with its sandbox: killing
the sandbox ends the pid namespace and so every process the program started, `setsid`
children included. Where bwrap is missing or cannot
create namespaces (`protection()` says which), `rustchat eval` refuses model-written code
unless --allow-unsandboxed (`require_containment`); then only the rlimits, the process group
and session, a fresh uid per candidate when the evaluator is root (so it cannot signal later
candidates, and its leftover processes and its files in the shared temp dirs are found by
owner and removed after it), and the in-process guards (socket, _socket, os/posix process,
signal and file functions, _posixsubprocess, ctypes replaced or refused) remain. The guards
stop accidents and the obvious raw entry points, not a determined attacker: the network, in
particular, is not isolated.

Verdicts for tests (`run_tests`) are not decided inside the candidate's process: the tests
run in a second process (the harness, in its own sandbox) that calls the candidate's function
over a pipe and receives plain data back (None, bool, int, float, str, bytes, list, tuple,
dict, set). Nothing the candidate prints, exits with or returns can say "passed"; only the
harness reaching the end of `check(...)` does.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import RustchatError

# Per-program limits besides the caller's timeout and memory.
MAX_PROCESSES = 64
MAX_FILE_BYTES = 16 << 20
TMPFS_BYTES = 64 << 20  # the private temp dir under bubblewrap

# Python source shared by the child programs: set limits, then disable the obvious escape
# hatches (a second line of defence; the namespaces are the first). Limits come from argv.
_LIMITS = r"""
import sys
_timeout, _mem_bytes, _nproc, _fsize = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
_uid, _gid, _preload = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1"
_extra = sys.argv[8:]
del sys.argv[1:]
import resource
def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # e.g. macOS refuses RLIMIT_AS: the wall-clock timeout still applies
if _mem_bytes > 0:
    _limit(resource.RLIMIT_AS, _mem_bytes)
_cpu = int(_timeout) + 1
try:
    resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
except (ValueError, OSError):
    pass
_limit(resource.RLIMIT_FSIZE, _fsize)
_limit(resource.RLIMIT_NPROC, _nproc)
_limit(resource.RLIMIT_CORE, 0)
if _uid >= 0:
    # Started as root: become `nobody` so the limits stick (root may raise them and is exempt
    # from RLIMIT_NPROC) and no other process can be signalled. Without bwrap the stdlib may
    # lie under a directory only root may enter (/root/.pyenv): common modules are loaded first.
    if _preload:
        import bisect, collections, copy, decimal, fractions, functools, hashlib, heapq, itertools, json, math
        import operator, random, re, shutil, socket, statistics, string, struct, subprocess, traceback, typing
    import os as _os_for_drop
    _os_for_drop.setgroups([])
    _os_for_drop.setgid(_gid)
    _os_for_drop.setuid(_uid)
"""

_GUARDS = r"""
import builtins, os, posix, shutil, signal, socket as _socket_py, subprocess, sys, _imp
import _socket, _posixsubprocess  # loaded before any drop of privileges (preload), so importable here
def _no_net(*a, **k):
    raise PermissionError("network access is disabled in the evaluation sandbox")
def _disabled(*a, **k):
    raise PermissionError("disabled in the evaluation sandbox")
class _NoSocket(_socket_py.socket):
    def __init__(self, *a, **k):
        _no_net()
# the Python-level socket module and the raw one under it
_socket_py.socket = _socket_py.SocketType = _NoSocket
for _mod in (_socket_py, _socket):
    for _name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd", "dup",
                  "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        if hasattr(_mod, _name) and not (_mod is _socket_py and _name in ("socket", "SocketType")):
            setattr(_mod, _name, _no_net)
_kept = {n: getattr(os, n) for n in ("read", "write", "_exit")}
# processes, signals and file changes outside the cwd: every name in os and in posix (they
# share the functions, so both modules must be patched) and the raw _posixsubprocess
for _name in ("system", "kill", "killpg", "fork", "forkpty", "posix_spawn", "posix_spawnp", "setsid",
              "setpgid", "setpgrp", "tcsetpgrp", "pidfd_open", "register_at_fork", "execv", "execve", "execvp",
              "execvpe", "execl", "execle", "execlp", "execlpe", "fexecve", "spawnv", "spawnve", "spawnvp",
              "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "popen", "remove", "unlink", "rmdir",
              "removedirs", "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod", "chown",
              "fchown", "lchown", "putenv", "unsetenv", "setuid", "seteuid", "setreuid", "setresuid", "setgid",
              "setegid", "setregid", "setresgid", "setgroups", "chroot", "mkfifo", "mknod", "link", "symlink"):
    for _mod in (os, posix):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _disabled)
_posixsubprocess.fork_exec = _disabled
for _name in ("pthread_kill", "pidfd_send_signal", "sigwait"):
    if hasattr(signal, _name):
        setattr(signal, _name, _disabled)
shutil.rmtree = shutil.move = shutil.chown = _disabled
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _disabled
builtins.help = _disabled
# no foreign-function escape hatch, and no fresh copy of a patched module: ctypes and the raw
# modules cannot be (re)loaded; what is already loaded stays patched
for _name in ("ctypes", "_ctypes", "_posixshmem", "_multiprocessing"):
    sys.modules[_name] = None
_blocked = frozenset(("posix", "_socket", "_posixsubprocess", "_ctypes", "_posixshmem", "_multiprocessing", "_signal"))
def _guard_create(create):
    def guarded(spec, *a):
        if getattr(spec, "name", None) in _blocked:
            raise ImportError(f"{spec.name} cannot be loaded in the evaluation sandbox")
        return create(spec, *a)
    return guarded
_imp.create_builtin = _guard_create(_imp.create_builtin)
_imp.create_dynamic = _guard_create(_imp.create_dynamic)
"""

# A program that must merely run to its end (run_program). The nonce says it did; a hostile
# program can print it too, so this is no verdict on untrusted code (run_tests is).
_PROGRAM_RUNNER = (
    _LIMITS
    + r"""
_nonce = _extra[0]
"""
    + _GUARDS
    + r"""
_src = open(_extra[1], encoding="utf-8").read()
try:
    exec(compile(_src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit as e:
    # sys.exit() inside the program must not count as running to the end
    print(f"program called sys.exit({e.code!r})", file=sys.stderr)
    sys.stderr.flush()
    _kept["_exit"](3)
sys.stdout.flush()
sys.__stdout__.write("\n" + _nonce + "\n")
sys.__stdout__.flush()
"""
)

# Plain-data wire format between harness and candidate: length-prefixed JSON with tagged
# containers, so tuples stay tuples and nothing but data crosses (no pickle, no objects).
_CODEC = r"""
import json as _json, struct as _struct
_MAX_FRAME = 64 << 20
def _enc(v):
    if v is None or type(v) in (bool, str):
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, tuple):
        return {"t": [_enc(x) for x in v]}
    if isinstance(v, list):
        return {"l": [_enc(x) for x in v]}
    if isinstance(v, dict):
        return {"d": [[_enc(k), _enc(x)] for k, x in v.items()]}
    if isinstance(v, frozenset):
        return {"f": [_enc(x) for x in v]}
    if isinstance(v, set):
        return {"s": [_enc(x) for x in v]}
    if isinstance(v, (bytes, bytearray)):
        return {"b": bytes(v).hex()}
    if isinstance(v, complex):
        return {"c": [v.real, v.imag]}
    raise TypeError(f"a {type(v).__name__} cannot cross the sandbox boundary")
def _dec(v):
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is not dict or len(v) != 1:
        raise ValueError("malformed value from the other side of the sandbox")
    (tag, x), = v.items()
    if tag == "b" and type(x) is str:
        return bytes.fromhex(x)
    if type(x) is not list:
        raise ValueError("malformed value from the other side of the sandbox")
    if tag == "t":
        return tuple(_dec(y) for y in x)
    if tag == "l":
        return [_dec(y) for y in x]
    if tag == "s":
        return {_dec(y) for y in x}
    if tag == "f":
        return frozenset(_dec(y) for y in x)
    if tag == "d":
        return {_dec(k): _dec(y) for k, y in x}
    if tag == "c" and len(x) == 2 and all(type(y) in (int, float) for y in x):
        return complex(x[0], x[1])
    raise ValueError("malformed value from the other side of the sandbox")
def _send(fd, obj):
    data = _json.dumps(obj).encode()
    data = _struct.pack(">Q", len(data)) + data
    while data:
        data = data[_kept_write(fd, data):]
def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = _kept_read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the candidate process ended")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
def _recv(fd):
    (n,) = _struct.unpack(">Q", _read_exact(fd, 8))
    if n > _MAX_FRAME:
        raise ValueError(f"a message of {n} bytes from the other side of the sandbox is too large")
    return _json.loads(_read_exact(fd, n))
"""

# The candidate: define its code, then answer calls of `entry_point` from the harness.
_CANDIDATE_RUNNER = (
    _LIMITS
    + r"""
import os as _os
_entry, _req_fd, _resp_fd, _code_path = _extra[0], int(_extra[1]), int(_extra[2]), _extra[3]
_kept_read, _kept_write = _os.read, _os.write
"""
    + _CODEC
    + _GUARDS
    + r"""
_ns = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(open(_code_path, encoding="utf-8").read(), "program.py", "exec"), _ns)
except BaseException as e:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    _kept["_exit"](1)
while True:
    try:
        _args = _dec(_recv(_req_fd))
    except EOFError:
        break
    try:
        _reply = {"ok": _enc(_ns[_entry](*_args))}
    except BaseException as e:
        _reply = {"error": f"{type(e).__name__}: {e}"[:2000]}
    sys.stdout.flush()
    sys.stderr.flush()
    _send(_resp_fd, _reply)
_kept["_exit"](0)
"""
)

# The harness: trusted setup (the problem's prompt) and tests, calling the candidate remotely.
# Its exit status is the verdict; the candidate never runs code in this process.
_HARNESS_RUNNER = (
    _LIMITS
    + r"""
import os as _os
_entry, _req_fd, _resp_fd, _setup_path, _test_path, _check = _extra
_kept_read, _kept_write = _os.read, _os.write
try:  # not dumpable: a candidate running as the same user cannot ptrace this process
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
except (OSError, AttributeError):
    pass
"""
    + _CODEC
    + r"""
def _candidate(*args):
    _send(int(_req_fd), _enc(list(args)))
    reply = _recv(int(_resp_fd))
    if type(reply) is not dict or len(reply) != 1 or not ({"ok", "error"} & reply.keys()):
        raise ValueError("malformed reply from the candidate")
    if "error" in reply:
        raise RuntimeError(f"the candidate raised {reply['error']}")
    return _dec(reply["ok"])
_ns = {"__name__": "__main__"}
exec(compile(open(_setup_path, encoding="utf-8").read(), "setup.py", "exec"), _ns)
exec(compile(open(_test_path, encoding="utf-8").read(), "test.py", "exec"), _ns)
_ns[_entry] = _candidate
_ns[_check](_candidate)
sys.stdout.write("harness: all checks passed\n")
"""
)


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


def _python() -> str:
    """The base interpreter (a venv's python is a link into it), which the sandbox can see."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _unprivileged_ids() -> tuple[int, int] | None:
    """(uid, gid) of `nobody` when we are root: a program running as root could raise its own
    limits back, signal any process and write anywhere. None when we are not root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _bwrap_args(bwrap: str, chdir: str, ro_binds: list[tuple[str, str]], drop: bool) -> list[str]:
    """Namespaces, a read-only view of the Python installation and a private tmpfs at /tmp.

    As root, bwrap makes no user namespace (the program drops to `nobody` itself, which needs
    CAP_SETUID/SETGID until then); otherwise it needs one to make the others."""
    if _unprivileged_ids() is not None:
        args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if drop:
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args = [bwrap, "--unshare-all"]
    args += ["--die-with-parent", "--new-session"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for extra in sorted({os.path.realpath(sys.base_prefix), os.path.dirname(_python())}):
        if extra == "/usr" or extra.startswith("/usr/") or not os.path.isdir(extra):
            continue
        # bwrap copies the modes of the parents it creates; /root is 0700 and would hide the prefix from nobody
        parents = Path(extra).parents
        for parent in reversed([str(p) for p in parents if str(p) != "/"]):
            args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", extra, extra]
    # sticky and world-writable like any /tmp, so `nobody` may write in it
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp"]
    for src, dest in ro_binds:
        args += ["--ro-bind", src, dest]
    return args + ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", chdir]


@functools.lru_cache(maxsize=1)
def _bwrap_status() -> tuple[str | None, str]:
    """(path to a working bwrap or None, why not). Tried once per process with the exact
    arguments and user the programs will get: user namespaces are often disabled in containers."""
    if os.environ.get("RUSTCHAT_SANDBOX", "auto") == "rlimits":
        return None, "RUSTCHAT_SANDBOX=rlimits"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bwrap not found (apt-get install bubblewrap)"
    ids = _unprivileged_ids() or (-1, -1)
    probe = f"import os\nif {ids[0]} >= 0: os.setgroups([]); os.setgid({ids[1]}); os.setuid({ids[0]})\nimport json"
    try:
        proc = subprocess.run(
            _bwrap_args(bwrap, "/tmp", [], drop=True) + [_python(), "-I", "-c", probe],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"bwrap failed: {e}"
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return None, f"bwrap failed: {why[-1] if why else f'exit {proc.returncode}'}"
    return bwrap, ""


def protection() -> str:
    """One line saying which protection untrusted programs run under on this machine."""
    bwrap, why = _bwrap_status()
    rlimits = f"rlimits (cpu, memory, {MAX_PROCESSES} processes, {MAX_FILE_BYTES >> 20} MiB files)"
    user = ", as nobody" if _unprivileged_ids() else ""
    if bwrap:
        namespaces = "mount, pid, net, ipc, uts, cgroup" + ("" if _unprivileged_ids() else ", user")
        return (
            f"bubblewrap (namespaces: {namespaces}; read-only Python, private {TMPFS_BYTES >> 20} MiB "
            f"temp dir, no network) + {rlimits}{user}"
        )
    if _unprivileged_ids():
        user = (
            ", a fresh uid per candidate (its processes killed and its files in the shared temp dirs removed after it)"
        )
    else:
        user = ", as your own user (not root: leftovers found by session only; a candidate can signal your processes)"
    return (
        f"rlimits only: {rlimits}, own process group and session{user}, in-process guards; "
        f"network not isolated; no namespaces ({why})"
    )


def contained() -> bool:
    """Whether untrusted programs run in namespaces here (bubblewrap works)."""
    return _bwrap_status()[0] is not None


def require_containment(allow_unsandboxed: bool, what: str = "HumanEval") -> str:
    """protection(), after refusing to run model-written code without namespaces unless
    `allow_unsandboxed` (--allow-unsandboxed) says to go on with the weaker fallback."""
    line = protection()
    if not contained() and not allow_unsandboxed:
        raise RustchatError(
            f"{what} runs model-written code and bubblewrap cannot sandbox it here "
            f"({_bwrap_status()[1]}); install bubblewrap, or pass --allow-unsandboxed to run it "
            "with rlimits and in-process guards only (no network isolation)"
        )
    return line if contained() else f"{line}; UNSANDBOXED, run by --allow-unsandboxed"


_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    # anything that honours proxies goes nowhere (the only guard when there is no net namespace)
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
    "NO_PROXY": "",
}


class _Sandbox:
    """One sandboxed Python process: files to read in `code_dir`, a private writable temp dir."""

    def __init__(self, root: Path, name: str, files: dict[str, str], unprivileged: bool):
        self.code_dir = root / f"{name}_code"
        # readable by `nobody` whatever the umask; the harness's files (the tests) are not the candidate's to read
        self.code_dir.mkdir()
        os.chmod(self.code_dir, 0o755 if unprivileged else 0o700)
        for fname, text in files.items():
            (self.code_dir / fname).write_text(text, encoding="utf-8")
            os.chmod(self.code_dir / fname, 0o644 if unprivileged else 0o600)
        self.out_path, self.err_path = root / f"{name}.out", root / f"{name}.err"
        self.ids = _unprivileged_ids() if unprivileged else None
        self.bwrap = _bwrap_status()[0]
        # without namespaces, a uid no other process has: its processes cannot signal or trace
        # any other (later candidates included), and all it leaves behind can be found by owner
        self.fresh = bool(self.ids) and not self.bwrap
        if self.fresh:
            uid = _FRESH_UIDS[0] + secrets.randbelow(_FRESH_UIDS[1])
            self.ids = (uid, uid)
        if self.bwrap:
            self.work, self.code = "/tmp", "/sandbox"
        else:
            work = root / f"{name}_tmp"
            work.mkdir()
            if self.ids:
                os.chown(work, *self.ids)
                os.chmod(root, 0o711)  # nobody may pass through to its own dir, not list ours
            self.work, self.code = str(work), str(self.code_dir)
        self.proc: subprocess.Popen | None = None
        self.info_r = -1

    def path(self, fname: str) -> str:
        return f"{self.code}/{fname}"

    def start(
        self,
        runner: str,
        timeout: float,
        memory_mb: int,
        extra: list[str],
        stdin=subprocess.DEVNULL,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        uid, gid = self.ids or (-1, -1)
        preload = "0" if self.bwrap else "1"  # under bwrap the prefix's parents are made enterable
        argv = [
            _python(),
            "-I",
            self.path(runner),
            str(timeout),
            str(memory_mb << 20),
            str(MAX_PROCESSES),
            str(MAX_FILE_BYTES),
            str(uid),
            str(gid),
            preload,
            *extra,
        ]
        info_w = -1
        if self.bwrap:
            # bwrap reports the host pid of the sandbox's init there; killing that one ends the
            # pid namespace, and bwrap exits only once every process in it is gone
            self.info_r, info_w = os.pipe()
            argv = (
                _bwrap_args(self.bwrap, self.work, [(str(self.code_dir), self.code)], drop=self.ids is not None)
                + ["--info-fd", str(info_w)]
                + argv
            )
            pass_fds = (*pass_fds, info_w)
        env = dict(_ENV, HOME=self.work, TMPDIR=self.work)
        try:
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self.proc = subprocess.Popen(
                    argv,
                    cwd=self.work,
                    env=env,
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    pass_fds=pass_fds,
                    start_new_session=True,  # own process group: a timeout kills its children too
                )
        finally:
            if info_w >= 0:
                os.close(info_w)

    def _sandbox_init_pid(self) -> int | None:
        if self.info_r < 0:
            return None
        info = b""
        try:
            # bwrap writes '{"child-pid": N' at once and the rest of its JSON later
            while select.select([self.info_r], [], [], 1.0)[0]:
                chunk = os.read(self.info_r, 4096)
                if not chunk:
                    break
                info += chunk
                if re.search(rb'"child-pid":\s*\d+\D', info):
                    break
            found = re.search(rb'"child-pid":\s*(\d+)', info)
            return int(found.group(1)) if found else None  # None: bwrap ended before starting anything
        finally:
            os.close(self.info_r)
            self.info_r = -1

    def kill(self) -> int | None:
        """Kill the whole group (under bwrap, ending the sandbox ends its pid namespace)."""
        if self.proc is None:
            return None
        init_pid = self._sandbox_init_pid()
        if init_pid is not None and self.proc.poll() is None:  # still bwrap's child, so still ours
            try:
                os.kill(init_pid, signal.SIGKILL)
                # the init exits only after every process in its namespace has: bwrap then follows
                self.proc.wait(timeout=10)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rc = self.proc.wait()
        # the group's other members die asynchronously: wait (bounded) until none is running
        deadline = time.monotonic() + 5.0
        while _group_running(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.bwrap:
            # `setsid` children left the group: every process of the session, and (as root) of
            # the candidate's own uid, goes; then its files in the shared temp dirs
            _kill_leftovers(self.proc.pid, self.ids[0] if self.fresh else None)
            if self.fresh:
                _remove_files_of(self.ids[0])
        return rc

    def tails(self) -> tuple[str, str]:
        return (
            self.out_path.read_bytes()[-4000:].decode("utf-8", "replace"),
            self.err_path.read_bytes()[-4000:].decode("utf-8", "replace"),
        )


# Without bwrap, each candidate runs (when the evaluator is root) as a uid drawn from this range
# (start, size): far above any system or login account, so no other process has it.
_FRESH_UIDS = (1_900_000_000, 100_000_000)
# World-writable places a candidate could leave files in (its own temp dir is removed anyway).
_SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock", "/var/lock")


def _proc_table() -> list[tuple[int, int, int, set[int]]]:
    """(pid, pgid, sid, uids) of every live process (zombies left out); [] without /proc."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    table = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/status", "rb") as f:
                uid_line = next(line for line in f if line.startswith(b"Uid:"))
        except (OSError, IndexError, StopIteration):
            continue
        if len(fields) > 3 and fields[0] not in (b"Z", b"X"):
            table.append((pid, int(fields[2]), int(fields[3]), {int(u) for u in uid_line.split()[1:]}))
    return table


def _kill_leftovers(sid: int, uid: int | None) -> None:
    """SIGKILL every process of session `sid` and, if given, of `uid` (a fresh uid: nothing
    else has it), over and over until none is left (bounded): a forking process cannot outrun
    it for long, RLIMIT_NPROC caps its count."""
    me = os.getpid()
    if uid is not None and shutil.which("kill"):
        # kill(-1) as that uid reaches every process of the uid at once, forks in flight included
        try:
            subprocess.run(
                [shutil.which("kill"), "-KILL", "-1"],
                user=uid,
                group=uid,
                extra_groups=[],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin"},
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        found = [
            pid
            for pid, _pgid, psid, uids in _proc_table()
            if pid != me and (psid == sid or (uid is not None and uid in uids))
        ]
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _remove_files_of(uid: int) -> None:
    """Remove what `uid` owns at the top of the shared temp dirs (symlinks as links)."""
    for top in sorted({tempfile.gettempdir(), *_SHARED_TMP}):
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` is still alive (zombies, which an init that never
    reaps may keep forever, do not count). Without /proc: assume not."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _rmtree(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


def _cpu_killed(rc: int | None) -> bool:
    # directly: -SIGXCPU; through bwrap, which reports a signal as 128 + its number
    return rc is not None and rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU)


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 1024) -> ExecResult:
    """Run `program` (source text) sandboxed; "passed" iff it ran to its end.

    The program itself could claim that, so this is no verdict on hostile code: test verdicts
    come from `run_tests`. `memory_mb` caps the address space (0: no cap)."""
    nonce = secrets.token_hex(16)
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="rustchat_exec_"))
    try:
        box = _Sandbox(root, "program", {"runner.py": _PROGRAM_RUNNER, "program.py": program}, unprivileged=True)
        box.start("runner.py", timeout, memory_mb, [nonce, box.path("program.py")])
        try:
            rc, timed_out = box.proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:
            box.kill()
        stdout, stderr = box.tails()
    finally:
        _rmtree(root)
    if timed_out or _cpu_killed(rc) or (rc == -signal.SIGKILL and "MemoryError" not in stderr):
        status = "timeout"
    elif rc == 0 and stdout.rstrip().endswith(nonce):
        status = "passed"
    else:
        status = "failed"
    return ExecResult(status, rc, stdout.replace(nonce, "").rstrip(), stderr, time.monotonic() - t0)


def run_tests(
    candidate: str,
    entry_point: str,
    setup: str,
    tests: str,
    check: str = "check",
    timeout: float = 3.0,
    memory_mb: int = 1024,
) -> ExecResult:
    """Judge `candidate` (untrusted source defining `entry_point`) by `tests`.

    The harness process runs `setup` (trusted code the tests need, e.g. the problem's prompt),
    then `tests`, then `check(candidate)`, where each call of the candidate is forwarded to the
    candidate's own sandboxed process and only plain data comes back. "passed" iff `check`
    returned; stdout is the candidate's, stderr the candidate's then the harness's."""
    if not entry_point.isidentifier() or not check.isidentifier():
        raise RustchatError(f"run_tests: {entry_point!r} / {check!r} is not a Python name")
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="rustchat_exec_"))
    req_r = req_w = resp_r = resp_w = -1
    try:
        cand = _Sandbox(root, "candidate", {"runner.py": _CANDIDATE_RUNNER, "program.py": candidate}, unprivileged=True)
        harness = _Sandbox(
            root, "harness", {"runner.py": _HARNESS_RUNNER, "setup.py": setup, "test.py": tests}, unprivileged=False
        )  # a uid of its own: the candidate cannot signal or trace it
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        try:
            cand.start(
                "runner.py",
                timeout,
                memory_mb,
                [entry_point, "0", str(resp_w), cand.path("program.py")],
                stdin=req_r,
                pass_fds=(resp_w,),
            )
            harness.start(
                "runner.py",
                timeout,
                memory_mb,
                [entry_point, str(req_w), str(resp_r), harness.path("setup.py"), harness.path("test.py"), check],
                pass_fds=(req_w, resp_r),
            )
            for fd in (req_r, req_w, resp_r, resp_w):
                os.close(fd)
            req_r = req_w = resp_r = resp_w = -1
            try:
                rc, timed_out = harness.proc.wait(timeout=max(0.0, timeout - (time.monotonic() - t0))), False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
        finally:
            for fd in (req_r, req_w, resp_r, resp_w):
                if fd >= 0:
                    os.close(fd)
            cand_rc = cand.kill()
            harness.kill()
        out, cand_err = cand.tails()
        harness_out, harness_err = harness.tails()
    finally:
        _rmtree(root)
    if timed_out or _cpu_killed(rc) or _cpu_killed(cand_rc):
        status = "timeout"
    elif rc == 0 and harness_out.rstrip().endswith("harness: all checks passed"):
        status = "passed"
    else:
        status = "failed"
    stderr = cand_err + (f"\n[harness]\n{harness_err}" if harness_err.strip() else "")
    return ExecResult(status, rc, out.rstrip(), stderr, time.monotonic() - t0)
