"""`vlbridge validate FILE_OR_PRESET`: check an assembly and print its plan (no weights, no torch).

`vlbridge validate --train CONFIG.yaml` checks a training config as `vlbridge train` would and
also shows what its fine-tuning recipes train: connector + encoder (its unfrozen part) + LoRA
parameters. Those counts need the real layer shapes (LoRA's size is rank x (in + out) of each
adapted Linear), so this form builds the model on the CPU, loading its weights.
"""

from __future__ import annotations

import argparse

from vlbridge.assemblies.assembly import load_assembly
from vlbridge.cli.output import print_json
from vlbridge.errors import AssemblyError, VLBridgeError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate an assembly YAML or preset and print its plan",
                       description="Validate an assembly (torch-free), or with --train a training config (builds its model "
                                   "on the CPU to count what each fine-tuning recipe trains).")
    p.add_argument("assembly", metavar="FILE_OR_PRESET", nargs="?",
                   help="an assembly YAML file or a preset name (see `vlbridge presets`)")
    p.add_argument("--train", metavar="CONFIG.yaml", help="validate a training config instead, and print its trainable "
                                                          "parameters: connector + encoder (unfrozen part) + LoRA")
    p.add_argument("--json", action="store_true", help="print the plan (or the problems) as JSON")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    if (args.assembly is None) == (args.train is None):
        raise VLBridgeError("give an assembly (FILE_OR_PRESET) or --train CONFIG.yaml, exactly one of them")
    if args.train is not None:
        return validate_train(args.train, as_json=args.json)
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


def validate_train(path: str, *, as_json: bool) -> int:
    """Check the config, build its model on the CPU with the recipes applied, and print the counts."""
    from vlbridge.train.config import TrainConfigError, check_config, read_config

    try:
        config, label = read_config(path)
        assembly = check_config(config, label)
        counts, notes = _trainable(config, assembly)
    except TrainConfigError as exc:
        if not as_json:
            raise
        print_json({"valid": False, "source": exc.source, "problems": exc.problems})
        return 2
    except VLBridgeError as exc:
        if not as_json:
            raise
        print_json({"valid": False, "source": path, "problems": [str(exc)]})
        return 2
    if as_json:
        print_json({"valid": True, "source": label, "plan": assembly.plan.to_dict(), "stage": config.stage,
                    "finetune": config.finetune.model_dump(mode="json"), "trainable": {**counts, "total": sum(counts.values())}})
        return 0
    print(assembly.plan.describe())
    print(f"  training   stage {config.stage}; {config.finetune.describe()}")
    print(f"  trainable  {notes}")
    print("valid")
    return 0


def _trainable(config, assembly) -> tuple[dict[str, int], str]:
    import torch

    from vlbridge.train.finetune import describe_trainable, trainable_counts
    from vlbridge.train.trainer import build_model

    model, recipe = build_model(config, assembly, torch.device("cpu"))
    return trainable_counts(model), describe_trainable(model, recipe.notes)
