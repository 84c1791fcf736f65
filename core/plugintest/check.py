"""Helpers for plugin authors: `check_plugin("my_pkg.plugin")` in your own test suite.

It checks what vlbridge will check at load time, and more: hook names, return types, spec
declarations, that every options model builds with defaults, and that every shape function answers
on default options. Then (unless `build=False`) it builds each component and calls on a dummy input
everything vlbridge will call (vlbridge.plugintest.probe), so a missing method fails your test.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vlbridge.plugin.contract import describe, plugin_call
from vlbridge.errors import IncompatibleError, PluginError, VLBridgeError
from vlbridge.plugin.hookspecs import HOOK_KINDS
from vlbridge.plugin.loader import PluginSet, unknown_hooks
from vlbridge.plugin.sources import checked_sources
from vlbridge.plugin.specs import SPEC_TYPES, ConnectorSpec, EncoderSpec, LLMSpec, Spec, TokenShape
from vlbridge.assemblies.plan import split_size
from vlbridge.plugintest.heavy_imports import heavy_import_problem, heavy_imports

if TYPE_CHECKING:
    from vlbridge.plugin.registry import Registry

# (encoder output, LLM width) pairs a connector is probed with, smallest first: its shape functions
# answer on the last (EVA ViT-g into OPT-2.7b); it is built for the first its output() accepts.
PROBE_PAIRS: tuple[tuple[TokenShape, int], ...] = ((TokenShape(16, 32), 64), (TokenShape(257, 1408), 2560))
_PROBE_ENCODER, _PROBE_LLM_WIDTH = PROBE_PAIRS[-1]


def check_plugin(module: str | ModuleType, *, build: bool = True, options: Mapping[str, Mapping[str, Any]] | None = None,
                 probe: tuple[TokenShape, int] | None = None) -> list[Spec]:
    """Validate a plugin module; return the specs it declares or raise PluginError naming the fault.

    :param build: also build every component and call what vlbridge calls on a dummy input (imports
        torch and your factories); False checks the declarations only.
    :param options: options by component name to build with instead of the defaults, e.g.
        ``{"my-encoder": {"variant": "tiny"}}`` when the default would load a large checkpoint.
    :param probe: ``(encoder_out, llm_width)`` to build connectors for; default: the first of
        ``(TokenShape(16, 32), 64)`` and ``(TokenShape(257, 1408), 2560)`` the connector accepts.
    """
    plugin = importlib.import_module(module) if isinstance(module, str) else module
    name = getattr(plugin, "__name__", repr(plugin))
    heavy = heavy_imports(module) if isinstance(module, str) else []
    if heavy:
        raise PluginError(f"{name}: {heavy_import_problem(heavy)}")
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
        returned = plugin_call(f"{name}.{hook_name}", "the hook", getattr(plugin, hook_name))
        expected = SPEC_TYPES[HOOK_KINDS[hook_name]]
        if not isinstance(returned, (list, tuple)):
            raise PluginError(f"{name}.{hook_name} must return a list of {expected.__name__}, got {type(returned).__name__}")
        for spec in returned:
            if not isinstance(spec, expected):
                raise PluginError(f"{name}.{hook_name} returned a {type(spec).__name__}; expected {expected.__name__}")
            spec.check()
            if any(seen.kind == spec.kind and seen.name == spec.name for seen in specs):
                raise PluginError(f"{name}.{hook_name} declares {spec.kind} {spec.name!r} twice; a name must be unique within its kind")
            specs.append(spec)
    chosen = _chosen_options(specs, options or {})
    for spec in specs:
        labelled = spec.with_origin(name, name)  # errors then name the plugin module
        who = describe(labelled)
        plugin_call(who, "a shape function", _probe_shapes, spec, chosen[spec.name], who)
        plugin_call(who, "weight_sources()", _probe_sources, spec, chosen[spec.name], who)
        if build:
            from vlbridge.plugintest.probe import probe_component

            probe_component(labelled, chosen[spec.name], [probe] if probe is not None else PROBE_PAIRS)
    return specs


def _chosen_options(specs: list[Spec], given: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each spec's validated options: `given[name]` where present, else the defaults."""
    unknown = sorted(set(given) - {spec.name for spec in specs})
    if unknown:
        raise VLBridgeError(f"check_plugin(options=...) names {unknown}, which the plugin does not declare; "
                            f"it declares {[s.name for s in specs]}")
    chosen = {}
    for spec in specs:
        try:
            chosen[spec.name] = spec.options.model_validate(dict(given.get(spec.name, {})))
        except ValidationError as exc:
            raise VLBridgeError(f"check_plugin(options=...): bad options for {spec.kind} {spec.name!r}: {exc}") from exc
    return chosen


def _probe_shapes(spec: Spec, opts: Any, who: str) -> None:
    """Run the pure shape functions on the options; they must return the declared types."""
    if isinstance(spec, EncoderSpec):
        out = spec.output(opts)
        if not (isinstance(out, TokenShape) and out.num_tokens > 0 and out.width > 0):
            raise PluginError(f"{who}: output() must return a positive TokenShape, got {out!r}")
        spec.preprocess(opts)
        count = split_size(spec.num_params(opts) if spec.num_params is not None else None)[0]
        if count is not None and count <= 0:  # None: the size is not known from the options (validate prints "?")
            raise PluginError(f"{who}: num_params() must be positive or None, got {count}")
    elif isinstance(spec, LLMSpec):
        dims = spec.dims(opts)
        if dims.embed_width <= 0 or dims.context_length <= 0:
            raise PluginError(f"{who}: dims() must give a positive width and context, got {dims!r}")
    elif isinstance(spec, ConnectorSpec):
        try:
            out = spec.output(opts, _PROBE_ENCODER, _PROBE_LLM_WIDTH)
        except IncompatibleError:
            return  # declining the probe pair is allowed; the message is the plugin's business
        if not isinstance(out, TokenShape):
            raise PluginError(f"{who}: output() must return a TokenShape, got {out!r}")
        if spec.num_params is not None:
            counts = spec.num_params(opts, _PROBE_ENCODER, _PROBE_LLM_WIDTH)
            if set(counts) != set(spec.stages):
                raise PluginError(f"{who}: num_params() gives stages {sorted(counts)} but the spec declares {list(spec.stages)}")


def _probe_sources(spec: Spec, opts: Any, who: str) -> None:
    """Call the optional weight_sources for every stage that builds the part; each answer must be
    a list of WeightSource naming one of the component's options (nothing is looked up)."""
    if spec.weight_sources is None:
        return
    stages = spec.stages if isinstance(spec, ConnectorSpec) else (2,) if isinstance(spec, LLMSpec) else (1, 2)
    for stage in stages:
        checked_sources(spec.weight_sources(opts, stage), spec.options.model_fields, who)


def registry_with(plugins: dict[str, object], builtins: bool = True) -> "Registry":
    """A fresh registry with the built-ins (unless `builtins=False`) plus the given plugin objects
    (name -> module/object), registered as third-party plugins; for tests that need a fake or broken
    plugin in-process. Installed entry-point plugins are left out, so a test sees the same parts
    whatever else is installed."""
    from vlbridge.plugin.registry import Registry

    plugin_set = PluginSet()
    if builtins:
        plugin_set.load_builtins()
    for plugin_name, plugin in plugins.items():
        plugin_set.register(plugin, plugin_name, distribution=plugin_name, version="0", builtin=False)
    return Registry.collect(plugin_set)


@contextmanager
def using_registry(registry: "Registry") -> Iterator["Registry"]:
    """Make `registry` the process-wide one (what the CLI and load_assembly see) for a with-block."""
    from vlbridge.plugin import registry as registry_module

    previous = registry_module._CACHED
    registry_module._CACHED = registry
    try:
        yield registry
    finally:
        registry_module._CACHED = previous
