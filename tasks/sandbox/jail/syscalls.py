"""The kernel interfaces the sandbox needs and the standard library lacks: namespaces, mounts,
capabilities, prctl; plus finding and killing processes through /proc.

Standard library only: this module is loaded inside the sandbox.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x08000000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 36, 38, 47
SYS_MOUNT_SETATTR, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, 0x8000, 1


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
        self.python_dirs = list(raw.get("python_dirs", []))  # outside bubblewrap only
        self.hide = list(raw.get("hide", []))  # outside bubblewrap only
        self.namespaces = False  # set by probe_namespaces()


def isolate_mounts(config: Config) -> None:
    """Fresh /proc showing only this run's processes; a private tmpfs /tmp and /dev/shm that
    vanish with the run; private SysV IPC. Outside bubblewrap, also a read-only root and no
    network."""
    flags = CLONE_NEWNS | CLONE_NEWIPC | (0 if config.under_bwrap else CLONE_NEWNET)
    unshare(flags)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if not config.under_bwrap:
        expose_to_all(config.python_dirs)
        for path in config.hide:
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
            elif os.path.exists(path):
                mount("/dev/null", path, None, MS_BIND)
        remount_tree_read_only("/")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    owner = config.program_uid if config.program_uid is not None else os.getuid()
    options = f"size={config.tmp_mb}m,nr_inodes=4096,mode=0700,uid={owner},gid={owner}"
    for path in ("/tmp", "/dev/shm", "/var/tmp"):
        if os.path.isdir(path) and (path != "/var/tmp" or not config.under_bwrap):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)


def expose_to_all(dirs: list[str]) -> None:
    """Outside bubblewrap: make the interpreter reachable for the program's uid when it lives
    under a private directory (a pyenv in /root): cover that directory with a tmpfs holding
    only the interpreter's directories, bound back from descriptors opened beforehand."""
    cover: dict[str, list[tuple[str, int]]] = {}
    for path in dirs:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                cover.setdefault(ancestor, []).append((path, os.open(path, os.O_PATH)))
                break
    for ancestor, inside in cover.items():
        mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for path, fd in inside:
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)


def kill_descendants() -> None:
    """Fallback only (no PID namespace): SIGKILL every process below this one until none is
    left. Orphans are re-parented here because the runner is a child subreaper."""
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
