"""Params as DVC records them: dotted keys over nested sections, from a params file's text."""
from __future__ import annotations

import json

import yaml


def flatten(values: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; dvc.lock stores whole sections as nested maps."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_params(text: str | None, name: str) -> dict:
    """A params file's text (YAML, or JSON by its name) as flat dotted keys; {} for no file."""
    if text is None:
        return {}
    data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    return flatten(data) if isinstance(data, dict) else {}
