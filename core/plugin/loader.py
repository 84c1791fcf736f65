"""Finds and loads plugins (built-ins from registry.yaml, third-party from the `vlbridge` entry-point
group) into one pluggy manager, isolating failures: a broken plugin is recorded, never fatal, unless
VLBRIDGE_STRICT_PLUGINS=1. VLBRIDGE_LOAD_PLUGINS (allow-list of distributions, empty = built-ins
only) and VLBRIDGE_DISABLE_PLUGINS (block-list) are applied before any third-party code is imported.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from vlbridge.plugin import hookspecs
from vlbridge.errors import PluginError
from vlbridge.plugin.resources import builtin_plugin_modules

BUILTIN_DISTRIBUTION = "vlbridge"


@dataclass
class PluginRecord:
    """What `vlbridge plugins` shows about one plugin."""

    name: str
    distribution: str
    version: str
    builtin: bool
    status: str = "loaded"  # loaded | error | disabled
    module: str | None = None  # the registration module, where the plugin is one (the listing probes its imports)
    hooks: list[str] = field(default_factory=list)
    components: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": self.status,
            "module": self.module,
            "hooks": self.hooks,
            "components": self.components,
            "errors": self.errors,
        }


_ON, _OFF = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


def strict_mode() -> bool:
    value = os.environ.get("VLBRIDGE_STRICT_PLUGINS", "").strip().lower()
    if value not in _ON | _OFF:
        raise PluginError(f"VLBRIDGE_STRICT_PLUGINS={value!r} is neither on nor off; set it to 1 (a broken plugin stops "
                          "vlbridge) or 0 / unset (it is recorded and skipped)")
    return value in _ON


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {normalise_distribution(part) for part in raw.split(",") if part.strip()}


def normalise_distribution(dist_name: str) -> str:
    """A distribution name as pip compares them (case, '_' and '.' do not matter)."""
    return dist_name.strip().lower().replace("_", "-").replace(".", "-")


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginSet:
    """A loaded pluggy manager plus a record of every plugin it saw, good or broken."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}

    # -- registration --------------------------------------------------------------------------
    def register(self, plugin: ModuleType | object, name: str, distribution: str, version: str, builtin: bool,
                 module: str | None = None) -> None:
        """Register one plugin object, recording (or in strict mode raising) what goes wrong; `module`:
        the module it came from (default: the plugin's own name where it is a module)."""
        module = module or (plugin.__name__ if isinstance(plugin, ModuleType) else None)
        record = PluginRecord(name=name, distribution=distribution, version=version, builtin=builtin, module=module)
        self.records[name] = record
        unknown = unknown_hooks(plugin)
        if unknown:
            self.fail(record, f"unknown hook(s) {unknown}; known hooks: {sorted(hookspecs.HOOK_KINDS)}")
            return
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validation: wrong arguments, duplicate names, ...
            self.fail(record, _short_error(exc), exc)
            return
        record.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])

    def fail(self, record: PluginRecord, message: str, exc: BaseException | None = None) -> None:
        record.status = "error"
        record.errors.append(message)
        if self.pm.has_plugin(record.name):
            self.pm.unregister(name=record.name)
        if strict_mode():
            raise PluginError(f"plugin {record.name!r} ({record.distribution}): {message}") from exc

    def load_builtins(self) -> None:
        version = _dist_version(BUILTIN_DISTRIBUTION)
        for module_name in builtin_plugin_modules():
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                record = PluginRecord(module_name, BUILTIN_DISTRIBUTION, version, builtin=True)
                self.records[module_name] = record
                self.fail(record, _short_error(exc), exc)
                continue
            self.register(module, module_name, BUILTIN_DISTRIBUTION, version, builtin=True)

    def load_entry_points(self) -> None:
        strict_mode()  # a value that is neither on nor off is said now, not at the first broken plugin
        allow = _env_list("VLBRIDGE_LOAD_PLUGINS")
        block = _env_list("VLBRIDGE_DISABLE_PLUGINS") or set()
        points = sorted(metadata.entry_points(group=hookspecs.PROJECT), key=lambda e: e.name)
        installed = {normalise_distribution(ep.dist.name if ep.dist is not None else ep.name) for ep in points}
        unknown = sorted((allow or set()) - installed)  # an allow-list entry that matches nothing loads nothing of it, silently
        if unknown:
            raise PluginError(f"VLBRIDGE_LOAD_PLUGINS names {', '.join(unknown)}, which no installed plugin distribution is "
                              f"(installed: {', '.join(sorted(installed)) or 'none'}); name distributions as pip lists them")
        for ep in sorted(points, key=lambda e: (e.name, e.dist.name if e.dist is not None else "")):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            name = ep.name
            if name in self.records:
                if normalise_distribution(self.records[name].distribution) == normalise_distribution(dist):
                    continue  # the same distribution seen twice on sys.path
                name = f"{ep.name} ({dist})"  # another distribution reused the entry-point name: it loads too, not in its place
            skipped = (allow is not None and normalise_distribution(dist) not in allow) or normalise_distribution(dist) in block
            if skipped:
                self.records[name] = PluginRecord(name, dist, version, builtin=False, status="disabled")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                record = PluginRecord(name, dist, version, builtin=False, module=ep.module)
                self.records[name] = record
                self.fail(record, _short_error(exc) + _where(exc), exc)
                continue
            self.register(plugin, name, dist, version, builtin=False, module=ep.module)

    # -- calling hooks, one implementation at a time --------------------------------------------
    def call_each(self, hook_name: str) -> list[tuple[PluginRecord, Any]]:
        """Call every implementation of a hook separately so one failure cannot hide the others."""
        results: list[tuple[PluginRecord, Any]] = []
        caller = getattr(self.pm.hook, hook_name)
        trace = tracing()
        for impl in caller.get_hookimpls():  # registration order
            record = self.records[impl.plugin_name]
            try:
                returned = impl.function()
            except Exception as exc:
                if trace:
                    print(f"vlbridge plugins: {hook_name} of {record.name} ({record.distribution}) raised {_short_error(exc)}",
                          file=sys.stderr, flush=True)
                self.fail(record, f"{hook_name} raised {_short_error(exc)}", exc)
                continue
            if trace:
                print(f"vlbridge plugins: {hook_name} of {record.name} ({record.distribution}) returned {_summary(returned)}",
                      file=sys.stderr, flush=True)
            results.append((record, returned))
        return results


def tracing() -> bool:
    """VLBRIDGE_TRACE_PLUGINS: print every hook call (plugin, distribution, what it returned) to stderr.
    The hooks are called one plugin at a time (`call_each`), not through pluggy's hook caller, so
    pluggy's own tracing would see none of them."""
    return os.environ.get("VLBRIDGE_TRACE_PLUGINS", "").strip().lower() not in _OFF


def _summary(returned: Any) -> str:
    """What a hook returned, briefly: the names of the specs in a list, else the value's type."""
    if isinstance(returned, (list, tuple)):
        return "[" + ", ".join(str(getattr(item, "name", type(item).__name__)) for item in returned) + "]"
    return type(returned).__name__


def unknown_hooks(plugin: object) -> list[str]:
    """Names that look like vlbridge hooks but match none (a typo would otherwise do nothing)."""
    names = []
    for attr in dir(plugin):
        if not attr.startswith("vlbridge_"):
            continue
        value = getattr(plugin, attr, None)
        if callable(value) and attr not in hookspecs.HOOK_KINDS:
            names.append(attr)
    return sorted(names)


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def load_plugin_set() -> PluginSet:
    """Load built-ins then third-party plugins. Third-party first would let them shadow nothing."""
    plugins = PluginSet()
    plugins.load_builtins()
    plugins.load_entry_points()
    return plugins
