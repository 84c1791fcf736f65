"""The assembly config a checkpoint keeps: what it must say so that the same model loads elsewhere.

Two things a live assembly knows but its YAML may leave implicit: where a relative path pointed (the
current directory of the run that wrote it: `config_with_absolute_paths`), and which installed
plugin provided a part. A checkpoint that says `use: attnpool` loads only as long as exactly one
plugin claims that name; once a second one is installed it is ambiguous, and on a machine without
the plugin the message can only say "unknown connector". So a part from a third-party plugin is
written `distribution:name`, and that distribution is added to `requires` (the version that wrote
the checkpoint is recorded in the plugin's own metadata; any version may load it).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from vlbridge.assemblies.reachability import config_with_absolute_paths
from vlbridge.plugin.loader import BUILTIN_DISTRIBUTION, normalise_distribution

SLOTS = ("encoder", "connector", "llm")


def checkpoint_config(assembly: Any) -> dict[str, Any]:
    """`assembly`'s config as a checkpoint saves it: local paths absolute, plugin parts pinned."""
    return pin_plugins(config_with_absolute_paths(assembly), assembly)


def pin_plugins(config: dict[str, Any], assembly: Any) -> dict[str, Any]:
    """`config` (a dict copy of `assembly`'s config) with every part from a third-party plugin named
    `distribution:name`, and each installed such distribution listed in `requires`."""
    requires = list(config.get("requires") or [])
    named = {normalise_distribution(_requirement_name(text)) for text in requires}
    for slot in SLOTS:
        resolved, part = getattr(assembly, slot, None), config.get(slot)
        distribution = getattr(getattr(resolved, "spec", None), "distribution", None)
        if resolved is None or not isinstance(part, dict) or not distribution or distribution == BUILTIN_DISTRIBUTION:
            continue
        part["use"] = f"{distribution}:{resolved.spec.name}"
        if normalise_distribution(distribution) not in named and _installed(distribution):
            requires.append(distribution)
            named.add(normalise_distribution(distribution))
    if requires:
        config["requires"] = requires
    return config


def _requirement_name(text: str) -> str:
    """The distribution a `requires` entry names (the entry itself where it does not parse: the
    assembly check reports that)."""
    try:
        return Requirement(text).name
    except InvalidRequirement:
        return text


def _installed(distribution: str) -> bool:
    """Whether pip knows `distribution` (an in-process plugin from `registry_with` is no distribution)."""
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True
