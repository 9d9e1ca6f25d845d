"""The repo's DVC cache type, with DVC itself: an output is stored once (a link to its cache
copy), and protected against edits that would write through into the cache."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

from conftest import REPO, init_repo


def test_a_cached_output_is_a_link_to_its_one_cache_copy(tmp_path):
    root = init_repo(tmp_path / "repo")
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")
    (root / "dvc.yaml").write_text(
        "stages:\n  weights:\n    cmd: python -c \"open('model.bin','wb').write(bytes(range(256))*4096)\"\n"
        "    outs:\n      - model.bin\n")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "repro", "-q"], cwd=root, check=True, capture_output=True, text=True)
    out = root / "model.bin"
    objects = [p for p in (root / ".dvc/cache").rglob("*") if p.is_file() and p.stat().st_size == out.stat().st_size]
    assert len(objects) == 1
    assert os.path.samefile(out, objects[0]), "the output is a second copy of its cache object"
    assert not out.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), "a linked output is writable"
    # DVC's own way to edit one: unprotect makes it a copy of its own, and the cache keeps its bytes.
    subprocess.run([*dvc, "unprotect", "model.bin"], cwd=root, check=True, capture_output=True, text=True)
    out.write_bytes(b"edited")
    assert objects[0].read_bytes() == bytes(range(256)) * 4096
