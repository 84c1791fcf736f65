"""`vlbridge validate FILE_OR_PRESET`: check an assembly and print its plan (no weights, no torch).

`vlbridge validate --train CONFIG.yaml` checks a training config as `vlbridge train` would and
also shows what its fine-tuning recipes train: connector + encoder (its unfrozen part) + LoRA
parameters. Those counts need the real layer shapes (LoRA's size is rank x (in + out) of each
adapted Linear), so this form builds the model on the CPU, loading its weights, and runs on it the
recipe checks `train --check` runs on the meta device (optimizer.lr_scales, parallel settings:
vlbridge.train.dry_run.recipe_problems). It reads no data file; `train --check` does, and loads no weight.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vlbridge.assemblies.assembly import load_assembly
from vlbridge.assemblies.reachability import missing_local_sources
from vlbridge.cli.argtypes import positive_int
from vlbridge.cli.output import plan_listed, print_json
from vlbridge.errors import AssemblyError, VLBridgeError

if TYPE_CHECKING:
    from vlbridge.train.memory_plan import MemoryPlan


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate an assembly YAML or preset and print its plan",
                       description="Validate an assembly (torch-free), or with --train a training config: checked as "
                                   "`vlbridge train` checks it, then its model built on the CPU with the real weights, the "
                                   "fine-tuning recipes, optimizer.lr_scales and parallel settings checked on that model, and "
                                   "what trains and the memory plan printed. --train reads no data file; `vlbridge train CONFIG "
                                   "--check` reads the annotation files and runs the same model checks on the meta device, "
                                   "loading no weights, but prints no parameter counts.")
    p.add_argument("assembly", metavar="FILE_OR_PRESET", nargs="?",
                   help="an assembly YAML file or a preset name (see `vlbridge presets`)")
    p.add_argument("--train", metavar="CONFIG.yaml", help="validate a training config instead: build its model with the "
                   "real weights on the CPU, check the fine-tuning recipes, optimizer.lr_scales and parallel settings on it, "
                   "and print its trainable parameters (connector + encoder (unfrozen part) + LoRA) and memory plan; reads "
                   "no data file (train --check does)")
    p.add_argument("--world-size", type=positive_int, default=None, metavar="N",
                   help="with --train: processes of the memory plan (default 1)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="with --train: device memory (e.g. 40GiB); the plan says what to shard or "
                                                      "shrink when it does not fit")
    p.add_argument("--plan-only", action="store_true", help="with --train: print the memory plan from the declarations only "
                                                          "(torch-free: no weights, no build, no reachability check)")
    p.add_argument("--json", action="store_true", help="print the plan (or the problems) as JSON")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    if (args.assembly is None) == (args.train is None):
        raise VLBridgeError("give an assembly (FILE_OR_PRESET) or --train CONFIG.yaml, exactly one of them")
    if args.train is None and (args.world_size is not None or args.gpu_memory or args.plan_only):
        raise VLBridgeError("--world-size, --gpu-memory and --plan-only describe a training run; use them with --train CONFIG.yaml")
    if args.train is not None:
        sizing = _sizing(args)
        if args.plan_only:
            return print_memory_plan(args.train, sizing, as_json=args.json)
        return validate_train(args.train, as_json=args.json, sizing=sizing)
    try:
        assembly = load_assembly(args.assembly)
        missing = missing_local_sources(assembly)  # a path that does not exist would stop every build
        if missing:
            raise AssemblyError(assembly.source, missing)
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


def _sizing(args: argparse.Namespace) -> tuple[int, int | None]:
    """(world size, device bytes or None) from the flags, refused with what is accepted."""
    from vlbridge.train.memory_plan import parse_size

    world = 1 if args.world_size is None else args.world_size
    if world < 1:
        raise VLBridgeError(f"--world-size: give a number of processes of 1 or more, got {world}")
    try:
        return world, None if args.gpu_memory is None else parse_size(args.gpu_memory)
    except ValueError as exc:
        raise VLBridgeError(f"--gpu-memory: {exc}") from None


def print_memory_plan(path: str, sizing: tuple[int, int | None], *, as_json: bool) -> int:
    """--plan-only: the structure checked, the assembly loaded from its declarations, the plan printed."""
    from vlbridge.train.config import read_config
    from vlbridge.train.memory_plan import plan_for_config

    config, _ = read_config(path)
    plan = plan_for_config(config, load_assembly(config.assembly).plan, sizing[0])
    if as_json:
        print_json({"memory": plan.to_dict(), **({"fits": plan.total <= sizing[1]} if sizing[1] else {})})
        return 0
    _print_plan(plan, sizing[1])
    return 0


def _print_plan(plan: "MemoryPlan", device_bytes: int | None) -> None:
    """The plan's lines, and with --gpu-memory whether it fits and what to shrink."""
    print(plan.describe())
    if device_bytes is not None:
        print(f"  {plan.advice(device_bytes)}")


def validate_train(path: str, *, as_json: bool, sizing: tuple[int, int | None] = (1, None)) -> int:
    """Check the config, build its model on the CPU with the recipes applied, and print the counts."""
    from vlbridge.train.config import TrainConfigError, check_config, read_config

    try:
        config, label = read_config(path)
        assembly = check_config(config, label)
        with plan_listed():  # printed below with the plan
            counts, notes = _trainable(config, assembly, label)
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
    from vlbridge.train.memory_plan import plan_for_config

    _print_plan(plan_for_config(config, assembly.plan, sizing[0], counts), sizing[1])
    print("valid")
    return 0


def _trainable(config, assembly, label: str) -> tuple[dict[str, int], str]:
    """Build the model as training does (real weights, on the CPU), run `train --check`'s recipe checks
    on it (optimizer.lr_scales, parallel settings), and count what trains."""
    import torch

    from vlbridge.train.config import TrainConfigError
    from vlbridge.train.dry_run import recipe_problems
    from vlbridge.train.finetune import describe_trainable, trainable_counts
    from vlbridge.train.run_setup import build_model

    model, recipe = build_model(config, assembly, torch.device("cpu"))
    problems = recipe_problems(model, config, recipe, skipped={})
    if problems:
        raise TrainConfigError(label, problems)
    return trainable_counts(model), describe_trainable(model, recipe.notes)
