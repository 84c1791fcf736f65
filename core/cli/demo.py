"""`vlbridge demo` (the main job) and `vlbridge compare CONFIG.yaml`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from vlbridge.cli.argtypes import positive_int, seed
from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_yaml
from vlbridge.train.stopping import stopped_by, terminate_as_interrupt


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="run the miniature BLIP-2 experiment offline and write a report", description=(
        "BLIP-2's argument as a miniature experiment that runs offline: keep the synthetic world's image encoder and "
        "LLM frozen, train only a bridge (a Q-Former in two stages, the same without stage 1, fewer queries, LLaVA's "
        "linear and MLP projectors) on the same data and steps, and score each on zero-shot VQA, captioning and "
        "retrieval against a blind prior, with 95% intervals and significance. Writes OUT/report.md, results.json "
        "and report.png, and prints the report on stdout; progress goes to stderr. Rerun to resume."))
    d.add_argument("--out", default=None, help="output folder, reused and resumed if it exists (default: ./vlbridge-demo; "
                   "./vlbridge-demo-quick with --quick; -flan-t5 added for --llm flan-t5, -stage1-train for --stage1 train (-Nsteps for "
                   "other --stage1-steps) and -worldN for --world-seed N, so each keeps its own runs; a folder holding "
                   "another of these variants' runs is refused)")
    d.add_argument("--quick", action="store_true", help="a tiny world and a few steps (under 2 minutes on 2 idle cores; what the tests run)")
    d.add_argument("--seeds", type=seed, nargs="+", default=[0], help="repeat every run per seed (mean and spread)")
    d.add_argument("--queries", type=positive_int, nargs="+", default=[8, 32], help="Q-Former query counts to compare (default 8 32: the shipped stage-1 checkpoints; "
                   "e.g. 8 16 32 64 with --stage1 train)")
    d.add_argument("--runs", nargs="+", metavar="NAME", help="only these runs (e.g. qformer-32q linear); default: all")
    d.add_argument("--world-seed", type=int, default=0, metavar="N",
                   help="generate and use another world (same frozen parts; default 0): do the effects hold there too?")
    d.add_argument("--llm", choices=["opt", "flan-t5"], default="opt",
                   help="the frozen world LLM every run bridges to: OPT (decoder-only, default) or FlanT5 (encoder-decoder)")
    d.add_argument("--stage1", choices=["shipped", "train"], default="shipped", help=(
        "where the Q-Former's stage 1 comes from: the shipped stage-1 checkpoints (default; BLIP-2's users start from its "
        "pretrain checkpoints) or a short stage 1 trained inside the run (train; see --stage1-steps)"))
    d.add_argument("--stage1-steps", type=int, default=None, metavar="N",
                   help="with --stage1 train: the stage-1 steps (default 80, 24 with --quick)")
    d.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes training runs side by side (default: one per core, at most 2); results do not depend on it")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("compare", help="train and evaluate several assemblies on one dataset; one table, one plot", description=(
        "Train and evaluate several assemblies on the same data and budget; write OUTPUT_DIR/report.md, results.json "
        "and report.png and print the report on stdout (progress on stderr). Rerun to resume. CONFIG.yaml keys: "
        "name; runs (each: name, assembly (preset, YAML or mapping) or checkpoint, stage1_steps, init_from, "
        "stage2_steps, connector_options, lr, group, stage2_data); stage1_data and stage2_data (training data configs: "
        "format coco/jsonl/..., paths, image_root); evals (each: name, captions, questions, annotations, images, "
        "image_pattern, scenes, tasks, limit, retrieval_limit, retrieval_k, retrieval_captions, lmms_eval); seeds; "
        "batch_size; lr; warmup_steps; stage1_objective; stage2_objective; features; output_dir; device; threads; jobs; "
        "and the prompts and generation settings (caption_prompt, vqa_prompt, generation, vqa_max_new_tokens). "
        "Example: examples/compare-world.yaml."))
    c.add_argument("config", metavar="CONFIG.yaml", help="the comparison config (keys above); relative paths are read from "
                   "the working directory")
    c.set_defaults(func=cmd_compare)


def default_demo_folder(quick: bool, world_seed: int, llm: str = "opt", stage1: str = "shipped", stage1_steps: int | None = None) -> str:
    """./vlbridge-demo, or a folder of its own for the quick demo, the FlanT5 bridges, a stage 1
    trained in the run (of other than the default steps, `stage1_steps`) and each other world, so that
    one demo never meets another's runs (they share run names; a folder holding another's is refused)."""
    return ("vlbridge-demo" + ("-quick" if quick else "") + (f"-{llm}" if llm != "opt" else "")
            + ("-stage1-train" if stage1 == "train" else "") + (f"-{stage1_steps}steps" if stage1 == "train" and stage1_steps else "")
            + (f"-world{world_seed}" if world_seed else ""))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stoppable(command: str, out: str | Path, run: Callable[[], Any]) -> Any:
    """`run()`'s result; or, stopped by Ctrl-C or SIGTERM (a scheduler's stop unwinds too: the workers are
    stopped, not left training), the exit status after saying how to go on: a rerun of the same command
    keeps every finished run and resumes the interrupted one from its last checkpoint."""
    try:
        with terminate_as_interrupt():
            return run()
    except KeyboardInterrupt as exc:
        stopped, status = stopped_by(exc)
        print(f"vlbridge {command}: {stopped}; run the same command again to go on: the runs finished in {out} are kept, "
              "and the one in progress resumes from its last checkpoint", file=sys.stderr, flush=True)
        return status


def cmd_demo(args: argparse.Namespace) -> int:
    from vlbridge.compare.config import MAX_JOBS
    from vlbridge.compare.demo import FULL, QUICK, run_demo

    if args.jobs is not None and not 1 <= args.jobs <= MAX_JOBS:
        raise VLBridgeError(f"--jobs must be between 1 and {MAX_JOBS} worker processes, got {args.jobs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise VLBridgeError(f"--seeds: give each seed once (a repeated seed trains the same run twice), got {args.seeds}")
    if args.out is None:
        steps = None if args.stage1_steps == (QUICK if args.quick else FULL).stage1_steps else args.stage1_steps
        args.out = default_demo_folder(args.quick, args.world_seed, args.llm, args.stage1, steps)
    results = _stoppable("demo", args.out, lambda: run_demo(
        args.out, quick=args.quick, seeds=args.seeds, queries=args.queries, only=args.runs, say=_say, world_seed=args.world_seed,
        llm=args.llm, jobs=args.jobs, stage1=args.stage1, stage1_steps=args.stage1_steps))
    if isinstance(results, int):
        return results
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    trained = [name for name in results["runs"] if name not in results["references"]]
    print(f"wrote {args.out}/report.md, results.json and report.png ({len(trained)} runs)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlbridge.compare import CompareConfig
    from vlbridge.compare.run import run_compare
    from vlbridge.train.config import pydantic_problems

    path = Path(args.config)
    if not path.exists():
        raise VLBridgeError(f"comparison config not found: {path}")
    try:
        config = CompareConfig.model_validate(read_yaml(path, "comparison config", top=dict))
    except ValidationError as exc:
        problems = "\n".join(f"  - {p}" for p in pydantic_problems(exc, CompareConfig))
        raise VLBridgeError(f"comparison config {path} is invalid:\n{problems}") from None
    stopped = _stoppable("compare", config.output_dir, lambda: run_compare(config, _say))
    if isinstance(stopped, int):
        return stopped
    print((Path(config.output_dir) / "report.md").read_text(encoding="utf-8"))
    return 0
