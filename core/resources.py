"""Reads registry.yaml: the built-in plugin modules and the named assembly presets (data, not code)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REGISTRY_FILE = Path(__file__).resolve().parent / "registry.yaml"


@lru_cache(maxsize=1)
def read_registry() -> dict[str, Any]:
    """The parsed registry.yaml shipped with the package (cached: it never changes in a process)."""
    if not REGISTRY_FILE.is_file():
        raise FileNotFoundError(f"vlbridge's registry.yaml is missing from {REGISTRY_FILE.parent}: reinstall vlbridge")
    with REGISTRY_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return data


def builtin_plugin_modules() -> list[str]:
    return list(read_registry()["builtin_plugins"])


def presets() -> dict[str, dict[str, Any]]:
    """Preset name -> assembly mapping (the name is filled in)."""
    out: dict[str, dict[str, Any]] = {}
    for name, body in read_registry()["presets"].items():
        out[name] = {"name": name, **body}
    return out
