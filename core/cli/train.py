"""`vlbridge train CONFIG.yaml [--resume] [--check]`: train a connector (stage 1 or 2).

Under `torchrun --nproc_per_node N` the same command runs data-parallel. The config is validated
(structure, then assembly, stage and device) before torch or any weight loads. `--check` then reads
the data's annotation files and builds the model on the meta device (vlbridge.train.dry_run) to run
the checks that need built modules, and exits.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from vlbridge.errors import VLBridgeError
from vlbridge.train.stopping import stopped_by, terminate_as_interrupt


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a connector from a training config (stage 1 or 2)",
                       description="Train the connector of an assembly as CONFIG.yaml describes; see examples/train-*.yaml.")
    p.add_argument("config", metavar="CONFIG.yaml", help="the training config")
    p.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint (starts fresh when there is none)")
    p.add_argument("--check", action="store_true", help="validate the config and its data, build the model on the meta device "
                   "(no weights read or allocated) to check widths, init_from's tensor shapes, LoRA targets, unfrozen "
                   "blocks, lr_scales and parallel settings, print the plan, then exit without training (`vlbridge "
                   "validate --train CONFIG.yaml` runs the same model checks on the real weights and counts what trains, "
                   "but reads no data file)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from vlbridge.train.config import check_config, read_config

    config, label = read_config(args.config)  # structure first: no torch, no weights
    assembly = check_config(config, label)
    if args.check:
        from vlbridge.train.dry_run import check_built

        for note in [*read_annotations(config), *check_built(config, assembly, label), *text_length_note(config)]:
            print(note)
        print(assembly.plan.describe())
        length = f"steps {config.steps}" if config.steps is not None else f"epochs {config.epochs}"
        print(f"stage {config.stage}; {length}; batch {config.batch_size} x grad_accum {config.grad_accum}; output_dir {config.output_dir}")
        print(f"fine-tuning: {config.finetune.describe()} (parameter counts: vlbridge validate --train {args.config})")
        print("valid")
        return 0
    from vlbridge.train.trainer import train

    try:
        with terminate_as_interrupt():
            result = train(config, assembly, resume=args.resume)
    except KeyboardInterrupt as exc:
        stopped, status = stopped_by(exc)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one hint from rank 0
            print(f"vlbridge train: {stopped}; {resume_hint(config.output_dir, args.config)}", file=sys.stderr, flush=True)
        return status  # the hint is the whole message: no second, bare "interrupted" from main
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        texts = f"; texts: {result.texts}" if result.texts else ""  # those cut at max_text_tokens, when any
        print(f"trained to step {result.step}; checkpoint: {result.checkpoint}; data: {result.data}{texts}")
    return 0


def resume_hint(output_dir: str, config_file: str) -> str:
    """What an interrupted run left to continue from, and the command that continues it."""
    from vlbridge.files.checkpoint_paths import latest_checkpoint

    try:
        latest = latest_checkpoint(output_dir)
    except VLBridgeError:
        latest = None
    command = f"{'torchrun ... -m vlbridge train' if 'WORLD_SIZE' in os.environ else 'vlbridge train'} {shlex.quote(config_file)}"
    if latest is None:
        return f"no checkpoint was saved yet, so a rerun starts over: {command}"
    return f"the last checkpoint is {latest}; continue from it with: {command} --resume"


def read_annotations(config) -> list[str]:
    """Read every annotation file of the training and eval data as training will (fields, types,
    ids; no image is opened), so that --check finds a file of the wrong shape. Tar shards are only
    counted: their samples are read when training streams them, and a note per such section says so
    (a bare "valid" let the user believe their images and captions were checked too)."""
    from vlbridge.data.build import read_records
    from vlbridge.data.shards import expand_shards

    notes = []
    for where, data in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        if data is None:
            continue
        if data.format == "webdataset":
            count = sum(len(expand_shards(path)) for path in data.paths)
            notes.append(f"{where}: {count} webdataset shard{'s' if count != 1 else ''} found; --check reads none of their "
                         "samples (images, captions, how many): training streams them, skipping and counting bad ones")
            continue
        records = read_records(data, train=where == "data.train", where=where)
        if where == "data.train":
            check_a_batch_fits(len(records), config.batch_size, config.drop_last)
        notes += image_file_notes(records, where)
    return notes


def image_file_notes(records: list, where: str) -> list[str]:
    """Whether the image files the records name are there (--check opens none of them): all missing is
    an error (a run would load the model and then skip every sample), some missing a note with the count."""
    from vlbridge.evaluation.readable import missing_images, shown_missing

    missing = missing_images(record.image for record in records)
    if not missing:
        return []
    total = len({record.image.path for record in records})
    if len(missing) == total:
        raise VLBridgeError(f"{where}: none of the {total} image files its annotations name is there, e.g.\n  "
                            f"{shown_missing(missing, 3)}\nset {where}.image_root to the folder the annotation paths are "
                            "relative to (without it they are read beside the annotation file)")
    return [f"{where}: {len(missing)} of {total} image files are missing (training skips and counts their samples), e.g.\n  "
            f"{shown_missing(missing, 3)}"]


def text_length_note(config) -> list[str]:
    """Both stages cut every text at max_text_tokens; --check cannot say how many they will cut (that
    takes the tokenizer, which comes with the weights), so it says where the count will be told."""
    from vlbridge.train.objectives import OBJECTIVES

    limit = OBJECTIVES[f"stage{config.stage}"].Options.model_validate(config.objective).max_text_tokens
    tokens, empty = ("LLM tokens, prompt included", ", and with the rows left with no target token") if config.stage == 2 else (
        "Q-Former tokens, [CLS] and [SEP] included", "")
    return [f"texts: stage {config.stage} cuts each at objective.max_text_tokens {limit} {tokens}; --check does not count "
            f"how many that cuts (it loads no tokenizer): training warns once with the count{empty}"]


def check_a_batch_fits(samples: int, batch_size: int, drop_last: bool) -> None:
    """With drop_last, a rank whose share of the data is smaller than one batch never steps; training
    would load every weight first and only then say so."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if drop_last and samples // world_size < batch_size:
        from vlbridge.data.records import DataError

        share = f"{samples} training samples" + (f" over {world_size} ranks ({samples // world_size} each)" if world_size > 1 else "")
        raise DataError(f"data.train: {share} make no full batch of batch_size {batch_size}, and drop_last drops the "
                        "incomplete one, so no step could run; lower batch_size, add data, or set drop_last: false")
