"""The GPU smoke run's wheels in parts small enough to carry one at a time, and back.

    python3 bench/wheel_parts.py split .whl -o .whl-parts [--part-mib 60]   # here (make gpu-wheel-parts)
    python3 bench/wheel_parts.py join .whl-parts -o .whl                   # on the GPU machine

`split` writes the wheels of a directory as one uncompressed tar stream (wheels are zip files
already) cut into parts of at most --part-mib MiB (part-000, part-001, ...) and SHA256SUMS: each
part's sha256 and the whole stream's. `join` checks every part against SHA256SUMS (a missing or
damaged part is named), checks the joined stream, and unpacks the wheels; nothing is unpacked
unless all of it checks. Standard library only: it runs on the GPU machine's bare Python.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
from pathlib import Path

MiB = 2**20
SUMS = "SHA256SUMS"
WHOLE = "wheels.tar"  # the name SHA256SUMS gives the joined stream


def split(wheel_dir: Path, out: Path, part_bytes: int) -> list[Path]:
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: {wheel_dir}: no *.whl files (make gpu-wheels writes them)")
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name)
    data = stream.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    parts, lines = [], []
    for i, start in enumerate(range(0, len(data), part_bytes)):
        part = out / f"part-{i:03d}"
        chunk = data[start:start + part_bytes]
        part.write_bytes(chunk)
        parts.append(part)
        lines.append(f"{hashlib.sha256(chunk).hexdigest()}  {part.name}")
    lines.append(f"{hashlib.sha256(data).hexdigest()}  {WHOLE}")
    (out / SUMS).write_text("\n".join(lines) + "\n")
    return parts


def join(parts_dir: Path, out: Path) -> list[str]:
    try:
        sums = dict(reversed(line.split("  ", 1)) for line in (parts_dir / SUMS).read_text().splitlines() if line)
    except FileNotFoundError:
        raise SystemExit(f"error: {parts_dir / SUMS}: missing (bench/wheel_parts.py split writes it)") from None
    names = sorted(name for name in sums if name != WHOLE)
    data = b""
    for name in names:
        path = parts_dir / name
        if not path.is_file():
            raise SystemExit(f"error: {path}: missing ({len(names)} parts: {', '.join(names)})")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != sums[name]:
            raise SystemExit(f"error: {path}: damaged (its sha256 is not the one in {SUMS}); carry it again")
        data += chunk
    if hashlib.sha256(data).hexdigest() != sums.get(WHOLE):
        raise SystemExit(f"error: {parts_dir}: the joined parts are not the stream {SUMS} names")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members = tar.getmembers()
        for member in members:
            if not member.isfile() or "/" in member.name or not member.name.endswith(".whl"):
                raise SystemExit(f"error: {parts_dir}: {member.name!r} is not a wheel at the top level")
        for member in members:
            (out / member.name).write_bytes(tar.extractfile(member).read())
    return [m.name for m in members]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="cut a directory's wheels into parts")
    s.add_argument("wheels", type=Path)
    s.add_argument("-o", "--out", type=Path, required=True)
    s.add_argument("--part-mib", type=float, default=60.0,
                   help="most MiB per part (default 60: a device call carries at most 64 MiB in all)")
    j = sub.add_parser("join", help="check the parts and unpack the wheels")
    j.add_argument("parts", type=Path)
    j.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "split":
        if not 0 < args.part_mib <= 64:
            raise SystemExit(f"error: --part-mib {args.part_mib:g}: more than 0 and at most 64")
        parts = split(args.wheels, args.out, int(args.part_mib * MiB))
        sizes = ", ".join(f"{p.name} {p.stat().st_size / MiB:.1f} MiB" for p in parts)
        print(f"{args.out}: {len(parts)} parts ({sizes}) and {SUMS}; carry each part (and {SUMS} with one of them)")
    else:
        wheels = join(args.parts, args.out)
        print(f"{args.out}: {len(wheels)} wheels, checked against {args.parts / SUMS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
