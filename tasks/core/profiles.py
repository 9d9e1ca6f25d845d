"""Params overlays: a profile (profiles/*.yaml, only the keys it changes) and `key=value`
overrides applied to params.yaml, checked against the schema (tasks.core.config) before the
file is written back with its comments and key order."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from tasks.core.config import ParamsError, Params, evaluated_models, read_params, stage_lists, validate_params


# Named sections: a profile that names them gives the whole set (the arms of a profile are its
# arms, not those of params.yaml plus its own); a key=value override still sets one leaf.
NAMED_SECTIONS = ("arms", "sample.configs")


def merge(raw: dict, overlay: dict, where: str, whole: tuple[str, ...] = (), at: str = "") -> dict:
    """Set each leaf of `overlay` in `raw` (lists, and the sections named in `whole`, are values:
    replaced whole); `where` names the source of the overlay in errors."""
    for key, value in overlay.items():
        path = f"{at}{key}"
        if isinstance(value, dict) and path not in whole:
            node = raw.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"{where}: {key} is not a section")
            merge(node, value, f"{where}: {key}", whole, f"{path}.")
        else:
            raw[key] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides, values parsed as YAML 1.2 (like `dvc exp run -S`: 1e-4 is a float)."""
    from ruamel.yaml import YAML

    parse = YAML(typ="safe").load
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r}: expected key=value")
        overlay: dict = {}
        node = overlay
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse(value)
        merge(raw, overlay, f"override {item!r}", whole=(key,))  # a mapping given for a key: that key's whole value
    return raw


def read_profile(path: str | os.PathLike) -> dict:
    """A profile: an overlay of params.yaml holding only the keys it changes."""
    path = Path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (FileNotFoundError, IsADirectoryError):
        raise ParamsError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def sync_stage_lists(raw: dict) -> None:
    """Set sample.stages and evaluate.stages in a round-trip params mapping to what the names they
    shard (sample.configs; base and the arms) and their `shards` make (stage_lists), each list in
    flow style; lists already right are left as written. Where a part is not valid yet, it is left
    alone: the schema names it."""
    sample, arms = raw.get("sample"), raw.get("arms")
    configs = sample.get("configs") if isinstance(sample, dict) else None
    _sync_section_stages(sample, list(configs) if isinstance(configs, dict) else None)
    _sync_section_stages(raw.get("evaluate"), evaluated_models(arms) if isinstance(arms, dict) else None)


def _sync_section_stages(section, names) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if not isinstance(section, dict) or names is None or not all(isinstance(n, str) for n in names):
        return
    shards = section.get("shards")
    if type(shards) is not int or shards < 1:
        return
    stages = section.get("stages")
    if not isinstance(stages, dict):
        stages = section["stages"] = CommentedMap()
    for key, value in stage_lists(names, shards).items():
        if stages.get(key) != value:
            seq = CommentedSeq(value)
            seq.fa.set_flow_style()
            stages[key] = seq


def update_params_file(path: str | os.PathLike, overrides: list[str] = (), profile: str | os.PathLike | None = None,
                       write: bool = True, require_files: bool = True) -> Params:
    """Validate the params file with a profile and then `key=value` overrides applied; write it
    back (atomically, comments and key order kept) if `write`. Nothing is written unless the
    result passes the schema (with require_files False, problem files may be missing yet)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    from tasks.core.files import write_text

    path = Path(path)
    if not overrides and profile is None:
        return read_params(path)
    yaml_rt = YAML()  # round-trip mode: keeps the file's comments and key order
    try:
        raw = yaml_rt.load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file") from None
    except YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    raw = raw if raw is not None else {}
    sources = []
    if profile is not None:
        merge(raw, read_profile(profile), str(profile), whole=NAMED_SECTIONS)
        sources.append(f"profile {profile}")
    if overrides:
        apply_overrides(raw, list(overrides))
        sources.append(f"--set {' '.join(overrides)}")
    sync_stage_lists(raw)
    params = validate_params(raw, f"{path} with {' and '.join(sources)}", path.parent, require_files)
    if write:
        import io

        text = io.StringIO()
        yaml_rt.dump(raw, text)
        write_text(path, text.getvalue())
    return params
