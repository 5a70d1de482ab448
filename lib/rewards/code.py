"""Code rewards: the share of a row's tests that the response's code passes, each test in a fresh subprocess.

The program of one test is the row's setup (if any), the response's code (its last ```python fenced block, else the
whole response) and the test (an assert). It runs as `python -I` in an empty temporary folder with:

- a wall-clock limit (`timeout_s`), after which its whole process group is killed, and a CPU-time limit beside it;
- an address-space limit (`memory_mb`), a file-size limit (16 MiB), few open files, no core dumps;
- no network: a network namespace of its own where the kernel allows one unprivileged (`unshare --net`), and in every
  case an audit hook (PEP 578) installed before the code runs that refuses sockets, new processes (fork, exec,
  spawn, subprocess, os.system) and ctypes. A refused call raises, so the test fails; a fork bomb never forks;
- no file written, created, removed or renamed outside its own temporary folder (the same audit hook);
- an environment of PATH alone and no standard input.

These are limits for model-written code that is wrong, slow or careless, not a security boundary against code
written to escape (a C extension already installed could, for one). Run untrusted code at scale in a container or
a VM as well.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_FENCED = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# The child's first lines: its limits (set by itself: no preexec_fn, which is unsafe beside threads), the audit hook,
# then the program. Audit hooks cannot be removed once added.
RUNNER = r"""
import resource, sys
_cpu, _mem = int(sys.argv[2]), int(sys.argv[3]) << 20
for _lim, _val in ((resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_AS, _mem), (resource.RLIMIT_FSIZE, 16 << 20),
                   (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_lim, (_val, _val))
_BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
            "socket.sendmsg", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec",
            "os.startfile", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.cdata", "os.kill",
            "os.killpg", "signal.pthread_kill"}
_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}

import os as _os
_HOME = _os.path.realpath(_os.getcwd()) + _os.sep
_WRITES = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC
_CHANGES = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
            "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}

def _outside(path):
    return isinstance(path, (str, bytes, _os.PathLike)) and not _os.path.realpath(_os.fsdecode(path)).startswith(_HOME)

def _hook(event, args):
    if event in _BLOCKED or (event == "import" and args and str(args[0]).split(".")[0] in _MODULES):
        raise PermissionError(f"not allowed in align's code sandbox: {event}")
    if event == "open" and args:
        mode, flags = (args + (None, 0))[1:3]
        if (any(c in str(mode or "") for c in "wax+") or (flags or 0) & _WRITES) and _outside(args[0]):
            raise PermissionError(f"not allowed in align's code sandbox: writing {args[0]!r}")
    if event in _CHANGES and args and _outside(args[0]):
        raise PermissionError(f"not allowed in align's code sandbox: {event} outside its folder")

sys.addaudithook(_hook)
with open(sys.argv[1], encoding="utf-8") as _f:
    _src = _f.read()
del _f
exec(compile(_src, "program.py", "exec"), {"__name__": "__main__"})
"""

OUTPUT_LIMIT = 1 << 16  # bytes of a test's output kept (for the failure's message)


def code_of(response: str) -> str:
    """The response's code: its last fenced block (```python, ```py or ```), else the whole response."""
    blocks = _FENCED.findall(response)
    return blocks[-1] if blocks else response


@functools.cache
def network_namespace() -> list[str]:
    """The command prefix that gives a child a network namespace of its own, or [] where the kernel refuses one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    try:
        ok = subprocess.run([unshare, "--net", "--map-root-user", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [unshare, "--net", "--map-root-user"] if ok.returncode == 0 else []


def run_program(program: str, timeout_s: float, memory_mb: int) -> tuple[bool, str]:
    """(passed, what happened) of one program run in the sandbox: passed when it exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="align-code-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        cpu = str(int(timeout_s) + 1)
        cmd = [*network_namespace(), sys.executable, "-I", "-c", RUNNER, str(path), cpu, str(memory_mb)]
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills everything it started
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return False, f"timed out after {timeout_s:g} s"
        finally:
            _kill_group(proc)  # anything it left behind in its group
        text = out[-OUTPUT_LIMIT:].decode("utf-8", "replace")
        if proc.returncode == 0:
            return True, "passed"
        if proc.returncode < 0:
            return False, f"killed by signal {signal.Signals(-proc.returncode).name}"
        last = text.strip().splitlines()[-1] if text.strip() else f"exit status {proc.returncode}"
        return False, last


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def tests_of(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [str(t) for t in value if str(t).strip()]


def code_tests_reward(spec):
    workers = max(1, min(8, os.cpu_count() or 1))

    def score(prompts, completions, columns):
        jobs, owners = [], []
        for i, (c, col) in enumerate(zip(completions, columns, strict=True)):
            setup = str(col.get(spec.setup_field) or "") if spec.setup_field else ""
            for t in tests_of(col.get(spec.tests_field)):
                jobs.append(f"{setup}\n{code_of(c)}\n\n{t}\n")
                owners.append(i)
        run = functools.partial(run_program, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb)
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(run, jobs))
        passed = [0] * len(completions)
        total = [0] * len(completions)
        for i, (ok, _) in zip(owners, results, strict=True):
            total[i] += 1
            passed[i] += int(ok)
        return [p / n if n else None for p, n in zip(passed, total, strict=True)]

    return score
