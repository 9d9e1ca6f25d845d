"""Writes offline.html beside this file: the page `dvc plots show` fills (.dvc/config:
plots.html_template), carrying vega, vega-lite and vega-embed inline, so the plots render on a
machine with no network. DVC's own page loads them from a CDN and is blank offline.

The page has no `{scripts}` placeholder: that is where DVC would put its CDN <script> tags. It
keeps `{plot_divs}` (required) and `{refresh_tag}` (`dvc plots show --open` with refresh).

    python .dvc/plots/build_offline_template.py

Each library is the minified UMD build of its npm tarball, pinned below by version and by the
registry's sha512 integrity (checked before anything is written), copied byte for byte; the
page names each one with the sha256 of the copy (tests/test_plots.py checks them). To upgrade,
change a version and its integrity (`npm view vega@5.33.1 dist.integrity`). vega-lite and
vega-embed stay on majors 5 and 6: DVC 3's plots are Vega-Lite v5 specs.
"""
from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

# (package, version, build file inside the tarball, the registry's dist.integrity)
LIBRARIES = [
    ("vega", "5.33.1", "package/build/vega.min.js",
     "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    ("vega-lite", "5.23.0", "package/build/vega-lite.min.js",
     "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    ("vega-embed", "6.29.0", "package/build/vega-embed.min.js",
     "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
]
REGISTRY = "https://registry.npmjs.org"
OUT = Path(__file__).with_name("offline.html")

PAGE = """<!DOCTYPE html>
<!-- The page `dvc plots show` fills (.dvc/config: plots.html_template), written by
     .dvc/plots/build_offline_template.py: vega, vega-lite and vega-embed inline, so the plots
     render with no network. Each library below is named with its npm tarball's sha512 integrity
     and the sha256 of the minified build copied here. -->
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{libraries}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, member: str, integrity: str) -> bytes:
    url = f"{REGISTRY}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=120) as response:
        tarball = response.read()
    got = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if got != integrity:
        sys.exit(f"error: {url}: integrity {got}, expected {integrity}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        return tar.extractfile(member).read()


def script(name: str, version: str, member: str, integrity: str, code: bytes) -> str:
    text = code.decode("utf-8")
    # Inline, the code must not end its own <script> element or put the HTML parser in a
    # script's escaped states, and must not hold a placeholder DVC would fill.
    for bad in ("</script", "<script", "<!--", "{plot_divs}", "{refresh_tag}", "{scripts}"):
        if bad in text.lower():
            sys.exit(f"error: {name}@{version} {member} holds {bad!r}: it cannot be inlined as it is")
    sha256 = hashlib.sha256(code).hexdigest()
    return (f"    <!-- {name}@{version} {member.removeprefix('package/')} integrity {integrity} "
            f"sha256 {sha256} -->\n    <script>\n{text}\n    </script>")


def main() -> int:
    libraries = "\n".join(script(*lib, fetch(*lib)) for lib in LIBRARIES)
    OUT.write_text(PAGE.format(libraries=libraries), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
