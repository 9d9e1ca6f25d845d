"""Docs that stay true: README's map of the repo, the `selfdistill` commands README and docs/
show, the params keys they name, and their relative links, checked against the code."""
from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from conftest import REPO
from tasks.commands.cli import COMMANDS
from tasks.core.config import Params

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
PAGES = [README, REPO / "problems" / "README.md", *DOCS]
# A start page, not a manual: the reference lives in docs/ (the project's before-stop hook warns
# above 250 lines).
README_MAX_LINES = 220

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # a span may wrap onto the next line


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_of(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(fenced blocks as (language, body), inline code spans outside them)."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return blocks, [span.replace("\n", " ") for span in SPAN.findall(FENCE.sub("", text))]


def section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


# --- README's "Where things are" ---

def map_entries(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(candidate paths, named by) for README's map: each row's paths (first column) and, for a
    row of one directory, the modules and files its description names in backticks (inside that
    directory, or at the top for a file such as `dvc.yaml`)."""
    entries = []
    for line in section(text, "Where things are").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        paths = SPAN.findall(cells[0])
        entries += [((p,), p) for p in paths]
        if len(paths) == 1 and paths[0].endswith("/"):
            entries += [((paths[0] + name, name), f"{paths[0]} row: `{name}`") for name in SPAN.findall(cells[1])
                        if " " not in name]
    return entries


def map_path_exists(candidates: tuple[str, ...]) -> bool:
    """A path, or a module named without its .py."""
    targets = [REPO / path.rstrip("/") for path in candidates]
    return any(t.exists() or t.with_suffix(".py").is_file() for t in targets)


def test_readme_map_names_only_paths_that_exist():
    entries = map_entries(README.read_text())
    assert len(entries) > 20, "README's map lost its rows"
    missing = [named for paths, named in entries if not map_path_exists(paths)]
    assert not missing, f"README's 'Where things are' names what does not exist: {missing}"


def test_readme_map_covers_every_top_level_entry():
    """Every tracked top-level file and directory (dotfiles aside) has its row."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    top = {line.split("/")[0] + ("/" if "/" in line else "") for line in tracked.splitlines()}
    top = {t for t in top if not t.startswith(".") and t not in ("README.md",)}
    if not top:
        pytest.skip("no tracked files")
    named = {paths[0].rstrip("/") for paths, _ in map_entries(README.read_text())}
    missing = sorted(t for t in top if t.rstrip("/") not in named)
    assert not missing, f"README's 'Where things are' omits {missing}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference to docs/"


# --- `selfdistill` commands ---

# `selfdistill` where a shell command starts: a line's start (or after `$ `), after `&&`, `;`,
# `|`, `(` or an opening quote; then the subcommand and, where it is a bare word, the next word
# (a sub-subcommand such as `flow run`, or a positional, which --help ignores).
COMMAND = re.compile(r"(?:^|\$ |&& |; |\| |\(|[\"'])\s*selfdistill +([a-z][a-z0-9_-]*)(?: +([a-z][a-z0-9_-]*)(?=\s|$))?",
                     re.M)


def shown_commands() -> dict[tuple[str, ...], list[str]]:
    found: dict[tuple[str, ...], list[str]] = {}
    for page in PAGES:
        blocks, spans = code_of(page.read_text())
        for code in [body for _, body in blocks] + spans:
            for match in COMMAND.finditer(code):
                words = tuple(w for w in match.groups() if w)
                found.setdefault(words, []).append(rel(page))
    return found


def test_docs_show_selfdistill_commands():
    commands = shown_commands()
    assert {words[0] for words in commands} >= {"score", "lineage", "flow", "plan", "profile"}, commands


def test_every_shown_selfdistill_command_answers_help():
    failures = []
    for words, pages in sorted(shown_commands().items()):
        if words[0] not in COMMANDS:
            failures.append(f"selfdistill {words[0]} (in {', '.join(sorted(set(pages)))}): not a command")
            continue
        proc = subprocess.run([sys.executable, "-m", "tasks.commands.cli", *words, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or "usage:" not in proc.stdout:
            failures.append(f"selfdistill {' '.join(words)} --help (in {', '.join(sorted(set(pages)))}): "
                            f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    assert not failures, "\n".join(failures)


# --- params keys ---

SECTIONS = tuple(Params.model_fields)
# A key where a value is set or named: after a space, `-S `, `--set `, `(` or the start of a span
# or line; `<name>` stands for any name in a named section (sample.configs.<config>, arms.<arm>).
KEY = re.compile(rf"(?:^|(?<=[\s(]))((?:{'|'.join(SECTIONS)})(?:\.(?:[a-z0-9_][a-z0-9_-]*|<[a-z_-]+>|\*))+)")
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "yml", "txt", "png", "cpp", "toml", "gz", "safetensors", "tsv"}


def key_exists(annotation, parts: list[str]) -> bool:
    if not parts or parts == ["*"]:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(parts[0])
        return field is not None and key_exists(field.annotation, parts[1:])
    if origin is dict:  # a named section: any name
        return key_exists(args[1], parts[1:])
    if origin is list and (parts[0].isdigit() or parts[0].startswith("<")):
        return key_exists(args[0], parts[1:])
    return False


def yaml_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in [prefix + str(key)] + yaml_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for item in node for k in yaml_keys(item, f"{prefix}0.")]
    return []


def shown_keys() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for page in PAGES:
        blocks, spans = code_of(page.read_text())
        keys = [m.group(1) for code in [body for lang, body in blocks if lang != "yaml"] + spans
                for m in KEY.finditer(code)]
        keys = [k.rstrip(".") for k in keys if k.rsplit(".", 1)[-1] not in FILE_SUFFIXES]
        for lang, body in blocks:
            if lang == "yaml":
                keys += yaml_keys(yaml.safe_load(body))
        for key in keys:
            found.setdefault(key, []).append(rel(page))
    return found


def test_docs_name_params_keys():
    keys = shown_keys()
    assert {"train.lr", "evaluate.sweep", "data.train.source"} <= set(keys), sorted(keys)


def test_every_params_key_in_the_docs_is_in_the_schema():
    bad = {key: sorted(set(pages)) for key, pages in shown_keys().items()
           if not key_exists(Params, key.split("."))}
    assert not bad, f"params keys the schema does not have (tasks/core/config.py): {bad}"


# --- links ---

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{rel(page)}: {target}")
    assert not broken, f"links to nothing: {broken}"
