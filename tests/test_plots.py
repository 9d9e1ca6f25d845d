"""`dvc plots show` with the project's DVC config renders offline: the page it fills
(.dvc/config: plots.html_template = .dvc/plots/offline.html) carries vega, vega-lite and
vega-embed inline instead of loading them from a CDN."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys

from conftest import REPO, init_repo

TEMPLATE = REPO / ".dvc" / "plots" / "offline.html"
# The builder's note above each inlined library, and the library itself.
LIBRARY = re.compile(r"<!-- (\S+)@(\S+) (\S+) integrity (sha512-\S+) sha256 ([0-9a-f]{64}) -->\n"
                     r"    <script>\n(.*?)\n    </script>", re.S)


def test_each_inlined_library_is_the_build_its_note_names():
    page = TEMPLATE.read_text(encoding="utf-8")
    found = {name: (version, sha256, hashlib.sha256(code.encode()).hexdigest())
             for name, version, _, _, sha256, code in LIBRARY.findall(page)}
    assert set(found) == {"vega", "vega-lite", "vega-embed"}, list(found)
    assert all(noted == actual for _, noted, actual in found.values()), found
    # DVC 3 writes Vega-Lite v5 specs.
    assert found["vega"][0].startswith("5.") and found["vega-lite"][0].startswith("5.")
    assert "{plot_divs}" in page and "{scripts}" not in page  # `{scripts}`: DVC's CDN tags


def test_dvc_plots_show_writes_a_page_that_loads_nothing_from_the_network(tmp_path):
    """A dvclive-style curve (step and value, tab-separated) drawn by `dvc plots show` in a repo
    with the project's .dvc/config and .dvc/plots."""
    root = init_repo(tmp_path / "ws")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    curve = root / "train/none/live/plots/metrics/loss.tsv"
    curve.parent.mkdir(parents=True)
    curve.write_text("step\tloss\n1\t2.5\n2\t1.75\n3\t1.5\n")
    (root / "dvc.yaml").write_text("plots:\n  - train/none/live/plots/metrics:\n      x: step\n")

    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "html"], cwd=root, check=True,
                   capture_output=True, text=True)
    page = (root / "html" / "index.html").read_text(encoding="utf-8")
    tags = re.findall(r"<script\b[^>]*>", page, re.I)
    assert tags and not [tag for tag in tags if "src" in tag.lower()], tags
    assert "cdn.jsdelivr" not in page
    assert "train/none/live/plots/metrics/loss.tsv" in page and "vegaEmbed(" in page
    assert len(LIBRARY.findall(page)) == 3
