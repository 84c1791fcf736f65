"""Helpers for plugin authors: `check_plugin("my_pkg.plugin")` in your own test suite.

It checks what vlbridge will check at load time, and more, without importing your factories:
hook names, return types, spec declarations, that every options model builds with defaults, and that
every shape function answers on default options.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

from vlbridge.errors import IncompatibleError, PluginError
from vlbridge.hookspecs import HOOK_KINDS
from vlbridge.plugin_loader import PluginSet, unknown_hooks
from vlbridge.specs import SPEC_TYPES, ConnectorSpec, EncoderSpec, LLMSpec, Spec, TokenShape

if TYPE_CHECKING:
    from vlbridge.registry import Registry

_PROBE_ENCODER = TokenShape(257, 1408)
_PROBE_LLM_WIDTH = 2560


def check_plugin(module: str | ModuleType) -> list[Spec]:
    """Validate a plugin module; return the specs it declares or raise PluginError naming the fault."""
    plugin = importlib.import_module(module) if isinstance(module, str) else module
    name = getattr(plugin, "__name__", repr(plugin))
    unknown = unknown_hooks(plugin)
    if unknown:
        raise PluginError(f"{name}: unknown hook(s) {unknown}; known hooks: {sorted(HOOK_KINDS)}")
    plugins = PluginSet()
    try:
        plugins.pm.register(plugin, name=name)
    except Exception as exc:
        raise PluginError(f"{name}: pluggy refused the plugin: {exc}") from exc
    hooks = [c.name for c in plugins.pm.get_hookcallers(plugin) or []]
    if not hooks:
        raise PluginError(f"{name}: implements no vlbridge hook (did you forget @vlbridge.hookimpl?)")
    specs: list[Spec] = []
    for hook_name in hooks:
        returned = getattr(plugin, hook_name)()
        expected = SPEC_TYPES[HOOK_KINDS[hook_name]]
        if not isinstance(returned, (list, tuple)):
            raise PluginError(f"{name}.{hook_name} must return a list of {expected.__name__}, got {type(returned).__name__}")
        for spec in returned:
            if not isinstance(spec, expected):
                raise PluginError(f"{name}.{hook_name} returned a {type(spec).__name__}; expected {expected.__name__}")
            spec.check()
            _probe_shapes(spec)
            specs.append(spec)
    return specs


def _probe_shapes(spec: Spec) -> None:
    """Run the pure shape functions on default options; they must return the declared types."""
    opts = spec.options()
    if isinstance(spec, EncoderSpec):
        out = spec.output(opts)
        if not (isinstance(out, TokenShape) and out.num_tokens > 0 and out.width > 0):
            raise PluginError(f"encoder {spec.name}: output() must return a positive TokenShape, got {out!r}")
        spec.preprocess(opts)
        if spec.num_params is not None and spec.num_params(opts) <= 0:
            raise PluginError(f"encoder {spec.name}: num_params() must be positive")
    elif isinstance(spec, LLMSpec):
        dims = spec.dims(opts)
        if dims.embed_width <= 0 or dims.context_length <= 0:
            raise PluginError(f"llm {spec.name}: dims() must give a positive width and context, got {dims!r}")
    elif isinstance(spec, ConnectorSpec):
        try:
            out = spec.output(opts, _PROBE_ENCODER, _PROBE_LLM_WIDTH)
        except IncompatibleError:
            return  # declining the probe pair is allowed; the message is the plugin's business
        if not isinstance(out, TokenShape):
            raise PluginError(f"connector {spec.name}: output() must return a TokenShape, got {out!r}")
        if spec.num_params is not None:
            counts = spec.num_params(opts, _PROBE_ENCODER, _PROBE_LLM_WIDTH)
            if set(counts) != set(spec.stages):
                raise PluginError(f"connector {spec.name}: num_params() gives stages {sorted(counts)} but the spec declares {list(spec.stages)}")


def registry_with(plugins: dict[str, object], builtins: bool = True) -> "Registry":
    """A fresh registry with the built-ins plus the given plugin objects (name -> module/object),
    registered as third-party plugins; for tests that need a fake or broken plugin in-process."""
    from vlbridge.plugin_loader import load_plugin_set
    from vlbridge.registry import Registry

    plugin_set = load_plugin_set() if builtins else PluginSet()
    for plugin_name, plugin in plugins.items():
        plugin_set.register(plugin, plugin_name, distribution=plugin_name, version="0", builtin=False)
    return Registry.collect(plugin_set)


@contextmanager
def using_registry(registry: "Registry") -> Iterator["Registry"]:
    """Make `registry` the process-wide one (what the CLI and load_assembly see) for a with-block."""
    from vlbridge import registry as registry_module

    previous = registry_module._CACHED
    registry_module._CACHED = registry
    try:
        yield registry
    finally:
        registry_module._CACHED = previous
