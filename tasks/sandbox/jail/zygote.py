"""The long-lived process inside the sandbox that runs one untrusted program after another.

Started by tasks/sandbox/__init__.py (under bubblewrap when it works) and spoken to over a Unix socket.
Standard library only; never imports the project.

Per run it forks a fresh process tree, so every program starts from the same clean state:

    zygote (Z)         long-lived (this module); receives programs, never tests or expected
      |                outputs, so no ancestor of a program ever holds them in memory;
      runner (T)       trusted (runner.py); forks the program, and only then reads the
        |              tests from a sealed memfd and runs them against the program;
        program (Q)    untrusted (program.py); PID 1 of a fresh PID namespace (when it
                       dies the kernel kills every process in it), with its own mount namespace
                       (fresh /proc, tmpfs /tmp and /dev/shm) and IPC namespace; unprivileged
                       uid, no capabilities, no new privileges, rlimits; stdin/stdout/stderr on
                       pipes, plus a pipe pair to the runner for calls and replies.

Without namespaces (the fallback) the runner is a child subreaper and kills the program's whole
tree itself. Standard library only; never imports the project.
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402
from syscalls import (CLONE_NEWNS, CLONE_NEWPID, MS_NODEV, MS_NOEXEC, MS_NOSUID,  # noqa: E402
                        MS_PRIVATE, MS_REC, PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, Config,
                        _process_parents, mount, prctl, unshare)
from runner import runner_process  # noqa: E402

# Modules programs commonly import, loaded once here so each forked run finds them ready.
PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
           "random", "copy", "typing", "hashlib", "fractions", "decimal", "statistics",
           "operator", "datetime", "dataclasses", "io", "array", "json", "struct")


def probe_namespaces() -> bool:
    """Can this process give each run its own PID and mount namespaces?"""
    pid = os.fork()
    if pid == 0:
        try:
            unshare(CLONE_NEWPID | CLONE_NEWNS)
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            inner = os.fork()
            if inner == 0:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                os._exit(0 if os.getpid() == 1 else 1)
            os._exit(os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1]))
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def run_once(config: Config, job: dict, secret_fd: int, case_index: int | None) -> dict:
    result_r, result_w = os.pipe()
    runner_pid = os.fork()
    if runner_pid == 0:
        try:
            os.close(result_r)
            os.close(config.socket_fd)
            runner_process(config, job, secret_fd, case_index, result_w)
        finally:
            os._exit(1)
    os.close(result_w)
    # The runner enforces the time limit itself; this is the backstop if it cannot.
    deadline = time.monotonic() + float(job["timeout_s"]) + 10.0
    verdict = None
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([result_r], [], [], deadline - time.monotonic())
            if ready:
                verdict = wire.read_frame(result_r)
                break
    except (OSError, ValueError, EOFError):
        verdict = None
    finally:
        os.close(result_r)
    if verdict is None:
        os.kill(runner_pid, signal.SIGKILL)
        verdict = {"passed": False, "result": "timed out" if time.monotonic() >= deadline
                   else "failed: sandbox error: runner crashed"}
    os.waitpid(runner_pid, 0)
    return verdict


def sweep_strays() -> int:
    """Backstop after each run: nothing but this zygote (and bubblewrap's init) may remain in
    the sandbox's PID namespace. Reaps whatever was re-parented here."""
    if os.getpid() > 2:
        return 0  # not the sandbox's own PID namespace: the runs' trees are cleaned per run
    killed = 0
    me = os.getpid()
    for pid, _ in list(_process_parents()):
        if pid not in (1, me):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    try:
        while os.waitpid(-1, os.WNOHANG if not killed else 0)[0]:
            pass
    except ChildProcessError:
        pass
    return killed


def receive_job(sock: socket.socket):
    """One job: a frame header carrying the tests' memfd, then the JSON body."""
    header, fds, _, _ = socket.recv_fds(sock, wire.HEADER.size, 1)
    if not header:
        return None, None
    while len(header) < wire.HEADER.size:
        more = sock.recv(wire.HEADER.size - len(header))
        if not more:
            return None, None
        header += more
    (size,) = wire.HEADER.unpack(header)
    body = bytearray()
    while len(body) < size:
        chunk = sock.recv(min(1 << 20, size - len(body)))
        if not chunk:
            return None, None
        body += chunk
    return json.loads(body), (fds[0] if fds else None)


def main() -> int:
    config = Config(json.loads(sys.argv[1]))
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    # Objects alive now are shared copy-on-write with every forked run; keep the garbage
    # collector from touching (and so copying) them in each child.
    gc.collect()
    gc.freeze()
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    config.namespaces = probe_namespaces()
    if config.under_bwrap and config.namespaces:
        level = "bubblewrap"
    elif config.namespaces:
        level = "namespaces"
    else:
        level = "rlimits"
    sock = socket.socket(fileno=config.socket_fd)
    sock.sendall(wire.pack({"hello": True, "level": level, "uid": os.getuid(),
                                    "program_uid": config.program_uid}))
    while True:
        job, secret_fd = receive_job(sock)
        if job is None:
            return 0
        if secret_fd is None:
            verdict = {"passed": False, "result": "failed: sandbox error: no tests received"}
        elif job["kind"] == "io":
            verdict = {"passed": True, "result": "passed"}
            for index in range(len(job["inputs"])):
                verdict = run_once(config, job, secret_fd, index)
                sweep_strays()
                if not verdict["passed"]:
                    break
        else:
            verdict = run_once(config, job, secret_fd, None)
            sweep_strays()
        if secret_fd is not None:
            os.close(secret_fd)
        sock.sendall(wire.pack(verdict))


if __name__ == "__main__":
    sys.exit(main())
