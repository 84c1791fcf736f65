"""The component registry: every spec declared by every loaded plugin, by kind and name.

Built once per process on first use (`get_registry()`), never at import. Lookups raise with the
installed names and a "did you mean" instead of returning None.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

from vlbridge.errors import PluginError, UnknownComponentError
from vlbridge.plugin.hookspecs import HOOK_KINDS
from vlbridge.plugin.loader import PluginRecord, PluginSet, load_plugin_set
from vlbridge.plugin.specs import KINDS, SPEC_TYPES, Kind, Spec


@dataclass
class Resolution:
    """The spec a `use:` string resolved to, plus a warning when the choice was not unique."""

    spec: Spec
    warning: str | None = None


@dataclass
class Registry:
    plugins: PluginSet
    components: dict[Kind, dict[str, list[Spec]]] = field(default_factory=lambda: {k: {} for k in KINDS})

    @classmethod
    def collect(cls, plugins: PluginSet | None = None) -> "Registry":
        registry = cls(plugins or load_plugin_set())
        for hook_name, kind in HOOK_KINDS.items():
            for record, returned in registry.plugins.call_each(hook_name):
                registry._add_returned(record, hook_name, kind, returned)
        return registry

    def _add_returned(self, record: PluginRecord, hook_name: str, kind: Kind, returned: object) -> None:
        expected = SPEC_TYPES[kind]
        if returned is None:
            return
        if not isinstance(returned, Iterable) or isinstance(returned, (str, bytes, dict)):
            self.plugins.fail(record, f"{hook_name} must return a list of {expected.__name__}, got {type(returned).__name__}")
            return
        for item in returned:
            if not isinstance(item, expected):
                self.plugins.fail(record, f"{hook_name} returned a {type(item).__name__}; expected {expected.__name__}")
                continue
            try:
                item.check()
            except PluginError as exc:
                self.plugins.fail(record, f"{hook_name}: {exc}", exc)
                continue
            if f"{kind}:{item.name}" in record.components:  # no `use:` could tell the two apart
                self.plugins.fail(record, f"{hook_name} declares {kind} {item.name!r} twice; a name must be unique within its kind")
                continue
            spec = item.with_origin(record.name, record.distribution)
            self.components[kind].setdefault(spec.name, []).append(spec)
            record.components.append(f"{kind}:{spec.name}")

    # -- queries --------------------------------------------------------------------------------
    def names(self, kind: Kind) -> list[str]:
        return sorted(self.components[kind])

    def all_specs(self, kind: Kind) -> list[Spec]:
        return [spec for name in self.names(kind) for spec in self.components[kind][name]]

    def duplicates(self) -> list[dict[str, object]]:
        return [
            {"kind": kind, "name": name, "providers": [s.distribution for s in specs]}
            for kind in KINDS
            for name, specs in sorted(self.components[kind].items())
            if len(specs) > 1
        ]

    def resolve(self, kind: Kind, use: str) -> Resolution:
        """Find the spec for `use` ("name" or "distribution:name")."""
        qualifier, _, name = use.rpartition(":")
        candidates = self.components[kind].get(name, [])
        if qualifier:
            # a distribution's own name first: another distribution's plugin may bear it as its entry-point name
            chosen = [s for s in candidates if s.distribution == qualifier] or [s for s in candidates if s.plugin == qualifier]
            if not chosen:
                providers = ", ".join(str(s.distribution) for s in candidates) or "no loaded plugin"
                raise UnknownComponentError(
                    f"no {kind} named {name!r} comes from {qualifier!r} (it is provided by: {providers}); "
                    + self._provider_state(qualifier) + self._installed_hint(kind, name)
                )
            return Resolution(chosen[0])
        if not candidates:
            raise UnknownComponentError(f"unknown {kind} {name!r}." + self._installed_hint(kind, name) + self._broken_hint())
        if len(candidates) == 1:
            return Resolution(candidates[0])
        providers = [str(s.distribution) for s in candidates]
        builtins = [s for s in candidates if s.plugin and self.plugins.records[s.plugin].builtin]
        choices = " or ".join(f"'{p}:{name}'" for p in providers)
        if len(builtins) == 1:
            return Resolution(builtins[0], f"{kind} {name!r} is provided by {', '.join(providers)}; using the built-in one (write {choices} to choose)")
        raise UnknownComponentError(f"{kind} {name!r} is provided by several plugins ({', '.join(providers)}); write {choices}")

    def _provider_state(self, qualifier: str) -> str:
        """Why a named provider gave nothing: skipped by the plugin variables, broken, or not installed."""
        records = [r for r in self.plugins.records.values() if qualifier in (r.distribution, r.name)]
        if any(r.status == "disabled" for r in records):
            return (f"the plugin distribution {qualifier!r} is installed but was not loaded (VLBRIDGE_DISABLE_PLUGINS or "
                    "VLBRIDGE_LOAD_PLUGINS leaves it out).")
        broken = [error for r in records if r.status == "error" for error in r.errors]
        if broken:
            return f"the plugin {qualifier!r} failed to load: {broken[0]} (vlbridge plugins shows it)."
        if records:
            return f"the plugin {qualifier!r} is loaded but declares no such part."
        return f"no installed plugin is called {qualifier!r}; install it (pip install {qualifier})."

    def _broken_hint(self) -> str:
        """A part asked for by name may be missing because the plugin declaring it failed to load, or
        was skipped by the plugin variables (an installed plugin left out said only 'unknown')."""
        def named(status: str) -> str:
            return ", ".join(sorted(str(r.distribution or r.name) for r in self.plugins.records.values() if r.status == status))

        hint = ""
        if broken := named("error"):
            hint += f" Plugins that failed to load, one of which may declare it: {broken} (vlbridge plugins shows why)."
        if skipped := named("disabled"):
            hint += (f" Plugins installed but not loaded (VLBRIDGE_LOAD_PLUGINS or VLBRIDGE_DISABLE_PLUGINS leaves them out), "
                     f"one of which may declare it: {skipped} (vlbridge plugins --all lists them).")
        return hint

    def _installed_hint(self, kind: Kind, name: str) -> str:
        installed = self.names(kind)
        close = difflib.get_close_matches(name, installed, n=3, cutoff=0.7)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"{hint} Installed {kind}s: {', '.join(installed) or 'none'}."


_CACHED: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, collected on first use (plugins load in every process that asks)."""
    global _CACHED
    if _CACHED is None:
        _CACHED = Registry.collect()
    return _CACHED


def invalidate() -> None:
    """Forget the cached registry (after changing plugin environment variables, or in tests)."""
    global _CACHED
    _CACHED = None
