"""`vlbridge validate FILE_OR_PRESET`: check an assembly and print its plan (no weights, no torch)."""

from __future__ import annotations

import argparse

from vlbridge.assembly import load_assembly
from vlbridge.cli.output import print_json
from vlbridge.errors import AssemblyError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate an assembly YAML or preset and print its plan")
    p.add_argument("assembly", metavar="FILE_OR_PRESET", help="an assembly YAML file or a preset name (see `vlbridge presets`)")
    p.add_argument("--json", action="store_true", help="print the plan (or the problems) as JSON")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        assembly = load_assembly(args.assembly)
    except AssemblyError as exc:
        if not args.json:
            raise
        print_json({"valid": False, "source": exc.source, "problems": exc.problems})
        return 2
    if args.json:
        print_json({"valid": True, "source": assembly.source, "plan": assembly.plan.to_dict()})
    else:
        print(assembly.plan.describe())
        print("valid")
    return 0
