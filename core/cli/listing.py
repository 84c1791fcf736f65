"""`vlbridge plugins`, `vlbridge components`, `vlbridge presets`: what is installed (no torch)."""

from __future__ import annotations

import argparse
from typing import Any

from vlbridge.cli.output import print_json, print_table
from vlbridge.plugin.loader import PluginRecord
from vlbridge.plugin.registry import get_registry
from vlbridge.plugin.resources import presets
from vlbridge.plugin.specs import KINDS
from vlbridge.plugintest.heavy_imports import heavy_import_problem, heavy_imports


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list loaded plugins and those that failed to load")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--all", action="store_true", help="also list plugins skipped by VLBRIDGE_LOAD_PLUGINS / VLBRIDGE_DISABLE_PLUGINS")
    p.set_defaults(func=cmd_plugins)
    c = sub.add_parser("components", help="list encoders, connectors and LLMs with their options")
    c.add_argument("--kind", choices=KINDS, help="only this kind")
    c.add_argument("--json", action="store_true", help="print JSON, with each options JSON schema")
    c.set_defaults(func=cmd_components)
    s = sub.add_parser("presets", help="list named assemblies from registry.yaml")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_presets)


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = get_registry()
    records = [r for r in registry.plugins.records.values() if args.all or r.status != "disabled"]
    heavy = heavy_registrations(records)
    if args.json:
        print_json({"plugins": [{**r.to_dict(), "heavy_imports": heavy.get(r.name, [])} for r in records],
                    "duplicates": registry.duplicates()})
        return 0
    rows = [[r.name, r.distribution, r.version, r.status, ", ".join(r.components) or "-"] for r in records]
    print_table(rows, ["PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "COMPONENTS"])
    for r in records:
        for error in r.errors + ([f"{r.module}: {heavy_import_problem(heavy[r.name])}"] if r.name in heavy else []):
            print(f"\n{r.name}: {error}")
    for dup in registry.duplicates():
        print(f"\nduplicate {dup['kind']} {dup['name']!r} from {', '.join(map(str, dup['providers']))}: "
              f"write use: '<distribution>:{dup['name']}' to choose")
    return 0


def heavy_registrations(records: list[PluginRecord]) -> dict[str, list[str]]:
    """The heavy modules (torch, ...) that each third-party plugin's registration module imports, by
    plugin name, found as check_plugin finds them: the module imported alone in a fresh interpreter,
    since this process has imported every plugin. Built-ins are held to it by vlbridge's own tests."""
    probed = (r for r in records if not r.builtin and r.status != "disabled" and r.module)
    return {r.name: heavy for r in probed if (heavy := heavy_imports(str(r.module)))}


def _component_dict(spec: Any) -> dict[str, Any]:
    return {
        "kind": spec.kind, "name": spec.name, "plugin": spec.plugin, "distribution": spec.distribution,
        "description": spec.description, "factory": spec.factory, "options": spec.options.model_json_schema(),
    }


def cmd_components(args: argparse.Namespace) -> int:
    registry = get_registry()
    specs = [s for kind in (args.kind,) if kind for s in registry.all_specs(kind)] if args.kind else [
        s for kind in KINDS for s in registry.all_specs(kind)]
    if args.json:
        print_json([_component_dict(s) for s in specs])
        return 0
    for spec in specs:
        print(f"{spec.kind} {spec.name}  ({spec.distribution})\n  {spec.description}")
        _print_fields(spec.options)
        print()
    if not args.kind:
        _print_recipes()
    return 0


def _print_fields(model: Any) -> None:
    for field_name, info in model.model_fields.items():
        default = info.default_factory() if info.default_factory is not None else info.default
        print(f"    {field_name} = {default!r}: {info.description or ''}")


def _print_recipes() -> None:
    """The trainer's fine-tuning recipes (a training config's `finetune:` section, docs/fine-tuning.md):
    not components, but what users look for next to the connector's options."""
    from vlbridge.train.finetune_config import EncoderTuning, LoraTuning

    for name, section in (("finetune.encoder", EncoderTuning), ("finetune.lora", LoraTuning)):
        print(f"recipe {name}  (training config)\n  {(section.__doc__ or '').strip().splitlines()[0]}")
        _print_fields(section)
        print()


def cmd_presets(args: argparse.Namespace) -> int:
    known = presets()
    if args.json:
        print_json(known)
        return 0
    rows = [[name, body["encoder"]["use"], body["connector"]["use"], body["llm"]["use"], body.get("description", "")]
            for name, body in sorted(known.items())]
    print_table(rows, ["PRESET", "ENCODER", "CONNECTOR", "LLM", "DESCRIPTION"])
    return 0
