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


def shipped_folders() -> dict[str, str]:
    """Placeholders a preset may use for folders shipped inside the package: "{world}" is the
    synthetic world's frozen parts (vlbridge/plugins/world)."""
    import vlbridge.plugins  # no torch; an editable install maps it to the repository's plugins/

    return {"world": str(Path(vlbridge.plugins.__file__).resolve().parent / "world")}


def _expand(value: Any, folders: dict[str, str]) -> Any:
    """Fill the shipped-folder placeholders into every string of a preset."""
    if isinstance(value, str):
        for name, folder in folders.items():
            value = value.replace("{" + name + "}", folder)
        return value
    if isinstance(value, dict):
        return {key: _expand(item, folders) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, folders) for item in value]
    return value


def presets() -> dict[str, dict[str, Any]]:
    """Preset name -> assembly mapping (the name is filled in, shipped folders expanded)."""
    folders = shipped_folders()
    return {name: {"name": name, **_expand(body, folders)} for name, body in read_registry()["presets"].items()}
