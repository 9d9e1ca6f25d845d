"""The project's Docker image against a real dockerd: a Debian bookworm base made here with
debootstrap (docker/make-base-image.sh; reused while its tag exists), the image built from it the
way docker/build.py builds it on this host (pip's route to PyPI passed in as build args), then the
tiny profile run in a container on a copy of the workspace, with the security options docs/docker.md
gives for bubblewrap: report/summary.md is written and every eval metrics file records the
sandbox's isolation level.

Uses the running dockerd, or starts one (root) and stops it after; skips, saying why, only when
no dockerd can run here. SELFDISTILL_DOCKER_BASE=IMAGE builds from IMAGE instead of the
debootstrap base (e.g. python:3.11-slim where Docker Hub is reachable).
A second test deploys prefect.yaml's nightly-docker and has a real `prefect worker --type docker`
run it (needs prefect-docker: the docker extra, which .ci/run installs).
Measured on 2 quiet cores: base image 72 s (once), image 156 s cold and 2 s warm, the three tests
3 min 54 s warm; with other test suites running on the same 2 cores, 3-6x that."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import stop_process_group

from test_deployment import prefect_server  # noqa: F401  (a fixture: a real Prefect server)

pytestmark = [pytest.mark.slow, pytest.mark.docker]

PROJECT = Path(__file__).resolve().parents[1]
IMAGE = "selfdistill:test"
# What docs/docker.md gives for bubblewrap inside a container (user namespaces, a fresh /proc).
FULL_ISOLATION = ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
                  "--security-opt", "systempaths=unconfined"]
DOCKERD_START_TIMEOUT_S = 60
BUILD_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 1500
LEVELS = ("bubblewrap", "namespaces", "rlimits")


def _load_build_helper():
    # docker/build.py by path: a package named `docker` would shadow the Docker SDK.
    spec = importlib.util.spec_from_file_location("selfdistill_docker_build", PROJECT / "docker" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skip_loudly(reason: str):
    message = f"DOCKER TESTS SKIPPED: {reason}"
    print(f"\n{'!' * 78}\n{message}\n{'!' * 78}", file=sys.stderr)
    pytest.skip(message)


def _docker_ok() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    """A dockerd that answers: the running one, or one started here and stopped after."""
    if not shutil.which("docker"):
        _skip_loudly("no docker CLI (apt-get install docker.io)")
    if _docker_ok():
        yield
        return
    if not shutil.which("dockerd"):
        _skip_loudly("no dockerd answers and none is installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        _skip_loudly("no dockerd answers, and starting one needs root")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + DOCKERD_START_TIMEOUT_S
    while not _docker_ok():
        if daemon.poll() is not None or time.monotonic() > deadline:
            _stop(daemon)
            _skip_loudly(f"dockerd cannot run here (exit {daemon.returncode}); its log ends:\n"
                         + log_path.read_text()[-2000:])
        time.sleep(1)
    try:
        yield
    finally:
        _stop(daemon)


def _stop(daemon: subprocess.Popen) -> None:
    stop_process_group(daemon, timeout=60)


@pytest.fixture(scope="module")
def image(dockerd, tmp_path_factory) -> str:
    helper = _load_build_helper()
    base = os.environ.get("SELFDISTILL_DOCKER_BASE")
    log_path = tmp_path_factory.mktemp("docker-build") / "build.log"
    started = time.monotonic()
    if not base:
        if not shutil.which("debootstrap") and subprocess.run(
                ["docker", "image", "inspect", helper.LOCAL_BASE_TAG], capture_output=True).returncode != 0:
            pytest.fail("no base image: install debootstrap (apt-get install debootstrap), or set "
                        "SELFDISTILL_DOCKER_BASE to an image that has one")
        base = helper.make_local_base()
    base_s = time.monotonic() - started
    with open(log_path, "w") as log:
        try:
            helper.build(IMAGE, base, PROJECT, log=log)
        except subprocess.CalledProcessError:
            pytest.fail(f"docker build failed; its log ends:\n{log_path.read_text()[-5000:]}")
    # The images earlier builds left untagged (each a full install when the deps changed).
    subprocess.run(["docker", "image", "prune", "-f", "--filter", "label=io.selfdistill.image"], capture_output=True)
    print(f"docker: base {base} in {base_s:.0f}s, image {IMAGE} in {time.monotonic() - started - base_s:.0f}s",
          file=sys.stderr)
    return IMAGE


def _workspace(root: Path) -> Path:
    """A copy of this checkout's files (tracked and untracked, not ignored) in its own git repo,
    writable by the image's user (uid 1000)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        source = PROJECT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "workspace"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "1000:1000", str(root)], check=True)
    elif os.geteuid() != 1000:
        subprocess.run(["chmod", "-R", "a+rwX", str(root)], check=True)
    return root


def _mounted(workspace: Path) -> list[str]:
    """docker run args: the workspace at /workspace, its working dir, git trusting it (owned by
    uid 1000 when this runs as root; by whoever runs it otherwise)."""
    return ["-v", f"{workspace}:/workspace", "-w", "/workspace", "-e", "GIT_CONFIG_COUNT=1",
            "-e", "GIT_CONFIG_KEY_0=safe.directory", "-e", "GIT_CONFIG_VALUE_0=*"]


def _docker_run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    name = f"selfdistill-test-{uuid.uuid4().hex[:8]}"
    try:
        return subprocess.run(["docker", "run", "--rm", "--name", name, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        raise


def _isolation(image: str, options: list[str]) -> str:
    proc = _docker_run(["--network", "none", *options, image, "python", "-c",
                        "from tasks.sandbox import isolation_level; print(isolation_level())"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_isolation_levels(image):
    """Docker's defaults leave the sandbox a fallback level; docs/docker.md's options give it what this
    host gives it (bubblewrap where the kernel allows user namespaces)."""
    from tasks.sandbox import isolation_level

    default = _isolation(image, [])
    full = _isolation(image, FULL_ISOLATION)
    print(f"isolation in a container: default options {default!r}, docs/docker.md's options {full!r}", file=sys.stderr)
    assert default in LEVELS and full in LEVELS
    if isolation_level() == "bubblewrap":
        assert full == "bubblewrap", f"docs/docker.md's security options give {full!r}, not bubblewrap"


@pytest.fixture(scope="module")
def tiny_run(image, tmp_path_factory) -> tuple[Path, str]:
    """The tiny profile run once in a container on a copy of the workspace, with docs/docker.md's
    security options: (the workspace, the run's output)."""
    workspace = _workspace(tmp_path_factory.mktemp("tiny-run") / "workspace")
    started = time.monotonic()
    script = "selfdistill profile tiny && selfdistill validate && dvc repro && cat report/summary.md"
    proc = _docker_run(["--network", "none", *FULL_ISOLATION, *_mounted(workspace), image, "sh", "-c", script],
                       timeout=RUN_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the tiny profile failed in the container:\n{output[-6000:]}"
    print(f"docker: tiny profile in the container in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return workspace, output


def _isolation_recorded(workspace: Path) -> str:
    """The one isolation level every eval metrics file records (and the report states)."""
    metrics = sorted(glob.glob(str(workspace / "eval" / "**" / "metrics.json"), recursive=True))
    assert metrics, "no eval metrics written"
    levels = {path: json.loads(Path(path).read_text()).get("isolation") for path in metrics}
    assert all(level in LEVELS for level in levels.values()), levels
    assert len(set(levels.values())) == 1, levels
    level = next(iter(levels.values()))
    assert f"sandbox isolation: {level}" in (workspace / "report" / "summary.md").read_text()
    return level


def test_tiny_profile_in_container(image, tiny_run):
    workspace, output = tiny_run
    assert "compiling the fused CPU kernels" not in output, "the image's prebuilt CPU kernels were not used"
    summary = workspace / "report" / "summary.md"
    assert summary.is_file() and "# selfdistill report" in summary.read_text()
    level = _isolation_recorded(workspace)
    print(f"docker: sandbox isolation in the container: {level}", file=sys.stderr)
    # Nothing the run wrote counts as a change: a second `dvc repro` would do nothing.
    status = _docker_run(["--network", "none", *_mounted(workspace), image, "dvc", "status"], timeout=600)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout[-3000:] + status.stderr[-3000:]
    from tasks.sandbox import isolation_level

    if isolation_level() == "bubblewrap":
        assert level == "bubblewrap"


def test_prefect_docker_worker(tiny_run, prefect_server, tmp_path):
    """prefect.yaml's nightly-docker deployment: `prefect deploy` builds the image (its build
    step, docker/build.py), a real `prefect worker --type docker` runs a flow run in a container
    on a copy of the tiny run's workspace with one param changed (report.bootstrap): the flow
    reruns `report` only, in the container, and records the run on a branch of the workspace."""
    if importlib.util.find_spec("prefect_docker") is None:
        _skip_loudly("prefect-docker is not installed: pip install -e '.[docker]' (.ci/run does)")
    from flows.pipeline import FLOW_NAME

    workspace = tmp_path / "workspace"
    subprocess.run(["cp", "-a", str(tiny_run[0]), str(workspace)], check=True)
    # The recording's DVC remote, inside the mounted workspace (not under git or DVC).
    for ignore in (".gitignore", ".dvcignore"):
        with open(workspace / ignore, "a") as f:
            f.write("\n/.dvc-remote/\n")
    subprocess.run(["git", "-c", "safe.directory=*", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam",
                    "remote"], cwd=workspace, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "remote", "add", "-d", "nightly",
                    "/workspace/.dvc-remote"], cwd=workspace, check=True, capture_output=True)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "1000:1000", str(workspace)], check=True)

    prefect = str(Path(sys.executable).parent / "prefect")
    env = dict(prefect_server, SELFDISTILL_WORKSPACE=str(workspace),
               SELFDISTILL_DOCKER_BASE=os.environ.get("SELFDISTILL_DOCKER_BASE") or
               _load_build_helper().LOCAL_BASE_TAG,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def run(*cmd: str, timeout: float = 600) -> str:
        proc = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    run(prefect, "work-pool", "create", "selfdistill-docker", "--type", "docker")
    run(prefect, "--no-prompt", "deploy", "--name", "nightly-docker", timeout=BUILD_TIMEOUT_S)
    triggered = run(prefect, "deployment", "run", f"{FLOW_NAME}/nightly-docker",
                    "--param", 'set_params=["report.bootstrap=100"]')
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered).group(1)
    started = time.monotonic()
    worker = run(prefect, "worker", "start", "--pool", "selfdistill-docker", "--type", "docker", "--run-once",
                 timeout=RUN_TIMEOUT_S)
    print(f"docker: the nightly-docker flow run took {time.monotonic() - started:.0f}s", file=sys.stderr)

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    assert state.is_completed(), f"flow run {state.name}: {state.message}\nworker:\n{worker[-4000:]}"
    lock = (workspace / "dvc.lock").read_text()
    assert "report.bootstrap: 100" in lock, "the flow did not rerun report with the changed param"
    experiments = subprocess.run(["git", "-c", "safe.directory=*", "for-each-ref", "--format=%(refname)", "refs/exps/"],
                                 cwd=workspace, capture_output=True, text=True).stdout.split()
    assert [r for r in experiments if not r.startswith("refs/exps/exec/")], "the flow run left no DVC experiment"
    assert any((workspace / ".dvc-remote").rglob("*")), "the flow run pushed nothing to the DVC remote"
