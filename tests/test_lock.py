"""The install is the lock: requirements/lock.txt pins every package with hashes, satisfies
pyproject.toml's ranges, and is exactly what `make install` put in this venv; a stage warns when it
runs on another stack, and a run's record names the lock."""
from __future__ import annotations

import os
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import REPO
from tasks.core import stack

LOCK = REPO / "requirements" / "lock.txt"


def locked_requirements(path=LOCK) -> list[tuple[str, list[str]]]:
    """(`name==version`, [hashes]) per requirement of a pip-compile lock."""
    entries, current = [], None
    for line in path.read_text().splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            current = (line.split()[0], [])
            entries.append(current)
        elif line.strip().startswith("--hash=sha256:") and current:
            current[1].append(line.strip().removesuffix("\\").strip())
    return entries


def test_every_locked_requirement_is_pinned_with_a_hash():
    entries = locked_requirements()
    assert len(entries) > 100
    for pin, hashes in entries:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[^\s=]+", pin), pin
        assert hashes, f"{pin} has no --hash in {LOCK}"


def test_the_lock_satisfies_pyproject_and_holds_the_no_deps_packages():
    """Editing a range in pyproject.toml without `make lock` fails here, naming the package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = stack.read_lock(LOCK)
    for line in project["dependencies"] + extras["dev"] + extras["docker"]:
        req = Requirement(line)
        name = stack.canonical(req.name)
        assert name in pins, f"pyproject.toml asks for {line!r}; {LOCK.name} lacks it: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {line!r}: run `make lock`"
    for line in (REPO / "requirements" / "no-deps.in").read_text().splitlines():
        pin = line.split("#")[0].strip()
        if pin:
            name, version = pin.split("==")
            assert pins.get(stack.canonical(name)) == version, f"{pin} (no-deps.in) is not in {LOCK.name}"


@pytest.mark.skipif(os.environ.get("SELFDISTILL_OFF_LOCK") == "1", reason="make test-latest: off the lock by design")
def test_this_venv_holds_exactly_the_lock():
    """`make install` installs the lock and nothing else (the project itself aside)."""
    assert sys.prefix != sys.base_prefix, "the tests run in the venv `make install` made"
    differs = stack.differences(stack.read_lock(LOCK), stack.installed(), exact=True)
    assert not differs, "this venv is not requirements/lock.txt (make clean install):\n" + "\n".join(differs)


def test_differences_name_missing_other_and_unlocked_packages():
    lock = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "pyyaml": "6.0.3"}
    found = {"torch": "2.13.0+cpu", "numpy": "2.4.5", "kernels": "0.19.1", "selfdistill": "0.1.0"}
    assert stack.differences(lock, found) == ["numpy: locked 2.4.6, installed 2.4.5", "pyyaml: locked 6.0.3, not installed"]
    assert stack.differences(lock, found, exact=True)[-1] == "kernels: installed 0.19.1, not in the lock"
    assert stack.differences(lock, dict(lock)) == []


def test_a_stage_warns_once_when_it_runs_off_the_lock(tmp_path, capsys, monkeypatch):
    from tasks.core.config import run_stage

    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1 \\\n    --hash=sha256:00\n")
    monkeypatch.setattr(stack, "LOCK", lock)
    assert run_stage(lambda: 0) == 0
    err = capsys.readouterr().err
    assert err.count("warning: this environment is not") == 1 and "numpy: locked 0.0.1, installed" in err
    lock.write_text(f"numpy=={stack.installed()['numpy']} \\\n    --hash=sha256:00\n")
    assert run_stage(lambda: 0) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_stage_interrupted_says_so_in_one_line(capsys):
    from tasks.core.config import run_stage

    def interrupted():
        raise KeyboardInterrupt

    assert run_stage(interrupted) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted; rerun to resume"


def test_a_run_record_names_the_lock():
    from flows import records

    files = records.RecordFiles([], [], [], [], [])
    described = stack.describe(LOCK)
    message = records.commit_message("run", "id", "completed", records.datetime.now(records.timezone.utc), {},
                                     "0" * 40, [], files, None, described)
    assert f"{records.T_LOCK}: {stack.lock_sha256(LOCK)}" in message
    assert records.parse_trailers(message)[records.T_LOCK] == stack.lock_sha256(LOCK)


def test_each_tested_transformers_version_has_a_lock_of_its_own():
    """pyproject's lower bound is what test_backends_under_older_transformers installs and checks."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (spec,) = [Requirement(d).specifier for d in project["dependencies"] if d.startswith("transformers")]
    lowest = next(s.version for s in spec if s.operator == ">=")
    for version in (lowest, "5.19.0"):  # 5.19.0: what the vllm extra brings (tests/test_extras.py)
        lock = REPO / "requirements" / f"transformers-{version}.txt"
        assert lock.is_file(), f"{lock.name} is missing: run `make lock`"
        assert stack.read_lock(lock)["transformers"] == version
        assert all(hashes for _, hashes in locked_requirements(lock))
