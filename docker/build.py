#!/usr/bin/env python3
"""Build the selfdistill image with this host's way to PyPI passed into the build.

    python3 docker/build.py                       # FROM python:3.11-slim (Docker Hub)
    python3 docker/build.py --local-base          # FROM a Debian bookworm made here (no registry)
    python3 docker/build.py --base IMAGE --tag selfdistill:dev --dry-run
    SELFDISTILL_DOCKER_BASE=IMAGE python3 docker/build.py      # the same as --base IMAGE

A plain `docker build .` is enough where pip reaches PyPI and the PyTorch CPU index directly.
This script is for hosts that reach them another way. It reads pip's settings here
(`pip config list`, PIP_* variables) and hands the build what it needs, as build args the
Dockerfile documents (none of them is kept in the image's environment):
  - http(s) index / extra-index / find-links URLs and trusted hosts: as they are;
  - local ones (a file:// index, a find-links directory): served read-only over HTTP on
    127.0.0.1 for the length of the build, which runs with --network host to reach them;
  - the CAs this host added to its trust store (/usr/local/share/ca-certificates) and pip's own
    `cert` when it is not the system bundle: EXTRA_CA_CERTS (a TLS-intercepting gateway's CA);
  - HTTP(S)_PROXY / NO_PROXY from the environment;
  - torch==2.13.0's CPU build: a torch-*+cpu wheel in a find-links directory when there is one,
    else PyTorch's CPU index.
Needs a running dockerd; --local-base also needs root and debootstrap (docker/make-base-image.sh).
"""
from __future__ import annotations

import argparse
import ast
import functools
import glob
import http.server
import os
import shlex
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

PROJECT = Path(__file__).resolve().parents[1]
LOCAL_BASE_TAG = "selfdistill-base:bookworm"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SYSTEM_BUNDLES = {"/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs", "/etc/ssl/cert.pem"}
LIST_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host")
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def pip_settings(python: str = sys.executable) -> dict[str, list[str]]:
    """pip's list settings here, every file and PIP_* variable pooled: {'find-links': [...], ...}."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        for item in str(value).split():
            settings.setdefault(name, [])
            if item not in settings[name]:
                settings[name].append(item)
    return settings


class _Servers:
    """Read-only HTTP servers on 127.0.0.1, one per local directory, for the build's pip."""

    def __init__(self):
        self.servers: dict[str, http.server.ThreadingHTTPServer] = {}

    def url(self, directory: str) -> str:
        if directory not in self.servers:
            handler = functools.partial(_QuietHandler, directory=directory)
            # A port fixed by the directory when free: the URL is a build arg, and a build arg
            # that changes misses Docker's cache for every RUN after it (the whole install).
            try:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", _stable_port(directory)), handler)
            except OSError:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers[directory] = server
        return f"http://127.0.0.1:{self.servers[directory].server_address[1]}"

    def close(self):
        for server in self.servers.values():
            server.shutdown()
            server.server_close()


def _stable_port(directory: str) -> int:
    return 20000 + zlib.crc32(directory.encode()) % 10000


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_PUT(self):  # read-only
        self.send_error(405)

    do_POST = do_DELETE = do_PUT


def _local_path(value: str) -> str | None:
    parsed = urlparse(value)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    if parsed.scheme == "" and os.path.exists(value):
        return value
    return None


def build_args(servers: _Servers, settings: dict[str, list[str]] | None = None) -> tuple[dict[str, str], list[str]]:
    """(build args, notes) for the Dockerfile from this host's pip settings."""
    settings = pip_settings() if settings is None else settings
    args: dict[str, list[str]] = {}
    notes: list[str] = []
    has_cpu_torch = False
    for key in LIST_KEYS:
        for value in settings.get(key, []):
            path = _local_path(value) if key != "trusted-host" else None
            if path is None:
                args.setdefault(key, []).append(value)
                continue
            path = os.path.abspath(path)
            if not os.path.isdir(path):
                notes.append(f"skipped {key} {value}: not a directory")
                continue
            if key == "find-links":
                url = servers.url(path) + "/"
                has_cpu_torch |= bool(glob.glob(os.path.join(path, "torch-*+cpu-*.whl")))
            else:  # a file:// simple index: serve its parent, keep its relative links working
                parent, name = os.path.split(path.rstrip("/"))
                url = f"{servers.url(parent)}/{name}/"
            notes.append(f"{key} {value} served as {url}")
            args.setdefault(key, []).append(url)
    if not has_cpu_torch and TORCH_CPU_INDEX not in args.get("extra-index-url", []):
        args.setdefault("extra-index-url", []).append(TORCH_CPU_INDEX)
        notes.append(f"no local torch CPU wheel: extra index {TORCH_CPU_INDEX}")
    if len(args.get("index-url", [])) > 1:  # pip takes one; the rest become extra indexes
        args["extra-index-url"] = args["index-url"][1:] + args.get("extra-index-url", [])
        args["index-url"] = args["index-url"][:1]
    out = {f"PIP_{key.upper().replace('-', '_')}": " ".join(values) for key, values in args.items() if values}

    cas = sorted(glob.glob("/usr/local/share/ca-certificates/**/*.crt", recursive=True))
    cas += [c for c in settings.get("cert", []) if os.path.isfile(c) and c not in SYSTEM_BUNDLES]
    pems = [Path(c).read_text().strip() for c in dict.fromkeys(cas)]
    if pems:
        out["EXTRA_CA_CERTS"] = "\n".join(pems)
        notes.append(f"EXTRA_CA_CERTS from {', '.join(dict.fromkeys(cas))}")
    for name in PROXIES:
        if os.environ.get(name):
            out[name] = os.environ[name]
    return out, notes


def make_local_base(tag: str = LOCAL_BASE_TAG) -> str:
    subprocess.run(["bash", str(PROJECT / "docker" / "make-base-image.sh"), tag], check=True)
    return tag


def build(tag: str, base: str | None, context: Path = PROJECT, extra: list[str] = (), dry_run: bool = False,
          log=None) -> list[str]:
    """docker build the image; returns the command run (EXTRA_CA_CERTS shortened)."""
    servers = _Servers()
    try:
        args, notes = build_args(servers)
        if base:
            args["BASE_IMAGE"] = base
        cmd = ["docker", "build", "--network", "host", "-t", tag, "-f", str(context / "Dockerfile")]
        for name, value in args.items():
            cmd += ["--build-arg", f"{name}={value}"]
        cmd += [*extra, str(context)]
        shown = [c if not c.startswith("EXTRA_CA_CERTS=") else f"EXTRA_CA_CERTS=<{c.count('BEGIN CERTIFICATE')} PEM>"
                 for c in cmd]
        for note in notes:
            print(f"build: {note}", file=sys.stderr, flush=True)
        print("build: " + shlex.join(shown), file=sys.stderr, flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT if log else None)
        return shown
    finally:
        servers.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="selfdistill")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--base", default=os.environ.get("SELFDISTILL_DOCKER_BASE") or None,
                       help="BASE_IMAGE (default: $SELFDISTILL_DOCKER_BASE, else the Dockerfile's, python:3.11-slim)")
    where.add_argument("--local-base", nargs="?", const=LOCAL_BASE_TAG, metavar="TAG",
                       help=f"debootstrap a Debian bookworm base as TAG (default {LOCAL_BASE_TAG}), reused if present")
    parser.add_argument("--context", type=Path, default=PROJECT)
    parser.add_argument("--dry-run", action="store_true", help="print the docker build command only")
    parser.add_argument("docker_args", nargs="*", help="more `docker build` args, after --")
    opts = parser.parse_args(argv)
    base = opts.base
    if opts.local_base:
        base = opts.local_base if opts.dry_run else make_local_base(opts.local_base)
    try:
        build(opts.tag, base, opts.context.resolve(), opts.docker_args, opts.dry_run)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
