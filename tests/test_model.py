"""The `model` stage: a hub id at a pinned revision, resolved through huggingface_hub's cache
(offline here, as on an air-gapped machine), with the commit it resolved to recorded."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, make_workspace, stage_env
from tasks.core.config import EXIT_NO_RETRY, ParamsError, validate_params
from tasks.core.profiles import update_params_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, model_dir, refs: dict[str, str]):
    """A huggingface_hub cache holding `model_dir` as the hub repo selfdistill/tiny at COMMIT."""
    repo = root / "models--selfdistill--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)
    return root


def test_a_hub_revision_resolves_from_the_cache_and_its_commit_is_recorded(tmp_path, tiny_model):
    cache = hub_cache(tmp_path / "hub", tiny_model, {"main": COMMIT, "v1": COMMIT})
    root = make_workspace(tmp_path / "ws", "selfdistill/tiny", {"model": {"base": "selfdistill/tiny", "revision": "v1"}})
    env = {**stage_env(root), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def model_stage():
        return subprocess.run([sys.executable, "-m", "tasks.model"], cwd=root, env=env, capture_output=True, text=True)

    done = model_stage()
    assert done.returncode == 0, done.stderr[-3000:]
    source = json.loads((root / "models/base/source.json").read_text())
    assert source["base"] == "selfdistill/tiny" and source["revision"] == "v1" and source["commit"] == COMMIT
    assert f"commit {COMMIT}" in done.stdout

    shutil.rmtree(root / "models/base")
    update_params_file(root / "params.yaml", ["model.revision=v2"])  # a tag the cache does not hold
    refused = model_stage()
    assert refused.returncode == EXIT_NO_RETRY and "model.revision='v2' could not be loaded" in refused.stderr
    assert not (root / "models/base").exists()


@pytest.mark.parametrize("base", ["embedded:smollm2-135m-instruct", "a-local-dir"])
def test_a_revision_is_refused_where_the_base_has_none(tmp_path, base):
    (tmp_path / "a-local-dir").mkdir()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"] = {"base": base, "revision": "v1"}
    with pytest.raises(ParamsError, match="model.revision='v1': only a hub id has revisions"):
        validate_params(raw, "params.yaml", tmp_path)
