"""`vlbridge eval`: run a model over a caption, VQA or retrieval set; write predictions.json and
metrics.json (atomically) and print a short table. Files are read and checked before the model loads."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from vlbridge.cli.argtypes import non_negative_int
from vlbridge.cli.model_source import add_random_weights_argument, check_model_source, open_model
from vlbridge.cli.output import print_json, print_table
from vlbridge.errors import VLBridgeError

TASKS = ("caption", "vqa", "retrieval")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: captions (COCO metrics), VQA accuracy or retrieval recall",
                       description="Run a model over an evaluation set and score it. Caption and retrieval data: a COCO "
                                   "Karpathy / Flickr30k caption JSON; VQA: VQAv2 questions (+ --annotations) or LAVIS's list.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--assembly", "-a", metavar="PRESET_OR_YAML", help="assembly YAML or preset name")
    source.add_argument("--checkpoint", "-c", metavar="DIR", help="a vlbridge checkpoint directory")
    p.add_argument("--weights", metavar="PATH", help="weights for --assembly: a checkpoint dir (its connector, and the encoder "
                   "tensors and LoRA adapters its run fine-tuned) or a connector .safetensors")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_random_weights_argument(p)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, metavar="FILE", help="caption JSON, or VQA questions JSON")
    p.add_argument("--images", metavar="DIR", help="folder the data's image paths are relative to (default: the data file's folder)")
    p.add_argument("--split", help="with Karpathy's dataset_{coco,flickr30k}.json (all splits in one file): which one, e.g. test")
    p.add_argument("--annotations", metavar="FILE", help="VQAv2 annotations JSON (vqa only; omit for a test split)")
    p.add_argument("--image-pattern", metavar="PATTERN", help="VQA image file name, default COCO_{split}_{image_id:012d}.jpg")
    p.add_argument("--out", metavar="DIR", help="write predictions.json and metrics.json here")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images (caption, retrieval) or questions (vqa)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="default 16")
    p.add_argument("--prompt", help="caption prompt (e.g. 'a photo of') or VQA template with {} (default 'Question: {} Short answer:')")
    p.add_argument("--num-beams", type=int, help="beam width (default: the model's, 5)")
    p.add_argument("--max-new-tokens", type=int, help="default: 30 for captions, 10 for answers")
    p.add_argument("--min-new-tokens", type=int, help="default 1 (BLIP-2's COCO captions used 8)")
    p.add_argument("--tokenizer", default=None, choices=("auto", "java-ptb", "python-ptb-approx", "none"),
                   help="caption tokenizer (default auto: Java PTB when pycocoevalcap and Java are present)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process: slow)")
    p.add_argument("--vqa-normalize", default=None, choices=("official", "lavis", "simple"),
                   help="VQA answer normalisation (default official; lavis = the pre-2021 tool BLIP-2 used)")
    p.add_argument("--k", type=int, default=None, help="retrieval: ITC shortlist re-ranked by ITM (default 128)")
    p.add_argument("--retrieval-captions", type=non_negative_int, nargs="+", metavar="POSITION",
                   help="retrieval: rank only these captions of each image, by position (a world's 'scene' caption: 0); default all")
    p.add_argument("--scenes", metavar="FILE", help="retrieval: a generated world's scenes JSON; a caption then counts as right for "
                   "every image of an identical scene, as `vlbridge compare` scores (default: its own image only, as BLIP-2)")
    p.add_argument("--skip-unreadable", action="store_true", help="leave out images that are missing or do not decode, "
                   "and evaluate the rest; metrics.json records the ids left out (default: one error naming every such "
                   "image, before the model loads). A metric over the rest is not comparable with the whole set's")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_eval)


def _check_arguments(args: argparse.Namespace) -> None:
    if args.annotations and args.task != "vqa":
        raise VLBridgeError(f"--annotations is for --task vqa; a {args.task} file carries its own captions")
    if args.split and args.task == "vqa":
        raise VLBridgeError("--split is for caption and retrieval data in Karpathy's all-splits layout; a VQAv2 file holds one split")
    if args.image_pattern and args.task != "vqa":
        raise VLBridgeError("--image-pattern is for --task vqa (official VQAv2 files name no image path)")
    if args.images and not Path(args.images).expanduser().is_dir():
        raise VLBridgeError(f"--images {args.images!r} is not a directory")
    for name in ("limit", "batch_size", "num_beams", "max_new_tokens", "k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise VLBridgeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    unused = [flag for flag, dest, tasks in _TASK_FLAGS if args.task not in tasks and getattr(args, dest) is not None]
    if unused:
        raise VLBridgeError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to --task {args.task}; drop "
                            f"{'it' if len(unused) == 1 else 'them'}")
    if args.task == "retrieval" and args.limit is not None and args.limit < 2:
        from vlbridge.evaluation.tasks import TOO_FEW_TO_RETRIEVE

        raise VLBridgeError(f"--limit {args.limit}: {TOO_FEW_TO_RETRIEVE}; give 2 or more")
    if args.out:  # said now, not after the whole evaluation has run
        out = Path(args.out).expanduser()
        blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise VLBridgeError(f"--out {args.out!r}: {str(blocking)!r} is a file; give a folder (new or existing) for "
                                "predictions.json and metrics.json")


# Flags that only some tasks read (flag, its dest, the tasks; None when not given: EvalOptions holds the defaults):
# given to another task they would be ignored. --no-meteor is not among them: skipping a slow metric is a no-op
# where there is none.
_TASK_FLAGS = (
    ("--prompt", "prompt", ("caption", "vqa")),
    ("--num-beams", "num_beams", ("caption", "vqa")),
    ("--max-new-tokens", "max_new_tokens", ("caption", "vqa")),
    ("--min-new-tokens", "min_new_tokens", ("caption", "vqa")),
    ("--tokenizer", "tokenizer", ("caption",)),
    ("--vqa-normalize", "vqa_normalize", ("vqa",)),
    ("--k", "k", ("retrieval",)),
    ("--retrieval-captions", "retrieval_captions", ("retrieval",)),
    ("--scenes", "scenes", ("retrieval",)),
)


def _read_data(args: argparse.Namespace) -> list:
    from vlbridge.evaluation import tasks as evaluate

    if args.task == "vqa":
        pattern = args.image_pattern or evaluate.layout_image_pattern(args.data, args.images)
        if pattern and not args.image_pattern:
            print(f"vlbridge eval: image file names from the manifest.json beside the data: {pattern}", file=sys.stderr)
        return evaluate.load_vqa_records(args.data, args.annotations, args.images, args.limit,
                                         image_pattern=pattern or evaluate.DEFAULT_IMAGE_PATTERN)
    return evaluate.load_caption_groups(args.data, args.images, args.limit, split=args.split)


def _image_hint(args: argparse.Namespace) -> str | None:
    """For VQA, the option that names the image files (official VQAv2 files only give image ids)."""
    if args.task != "vqa":
        return None
    from vlbridge.data.vqa import DEFAULT_IMAGE_PATTERN

    return (f"VQAv2 questions give image ids only: point --images at the image folder and --image-pattern at the file "
            f"names in it (now {args.image_pattern or DEFAULT_IMAGE_PATTERN!r}, COCO's; a generated world's is in its manifest.json).")


def _unit(task: str) -> str:
    return "questions" if task == "vqa" else "images"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    generation = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens),
                                    ("min_new_tokens", args.min_new_tokens)) if v is not None}
    given = {k: v for k, v in (("tokenizer", args.tokenizer), ("vqa_normalization", args.vqa_normalize), ("k", args.k),
                               ("retrieval_captions", args.retrieval_captions), ("scenes", args.scenes))
             if v is not None}  # unset: EvalOptions' defaults
    return {"batch_size": args.batch_size, "prompt": args.prompt, "generation": generation, "meteor": not args.no_meteor,
            "skip_unreadable": args.skip_unreadable, **given}


def _progress(quiet: bool):
    if quiet:
        return None
    return lambda done, total: print(f"  {done}/{total}", file=sys.stderr, flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    import vlbridge

    _check_arguments(args)
    source = check_model_source(args)  # the assembly name before torch, then checkpoint and device
    from vlbridge.evaluation import tasks as evaluate

    opts = evaluate.options(_options(args))  # bad options fail before the data and the model load
    records = _read_data(args)
    if not args.quiet:
        print(f"vlbridge eval: decoding each image of the {len(records)} {_unit(args.task)} once, to find any unreadable one "
              "before the model loads", file=sys.stderr, flush=True)
    records = evaluate.screen_images(records, opts.skip_unreadable, hint=_image_hint(args))  # run() decodes no image twice
    if args.task == "retrieval":  # what screening left, the captions picked and the scenes file, checked before the model loads
        evaluate.check_retrievable(records)
        evaluate.retrieval_targets(records.records, opts)
    started = time.monotonic()
    model = open_model(source)
    run = {"caption": evaluate.run_captions, "vqa": evaluate.run_vqa, "retrieval": evaluate.run_retrieval}[args.task]
    result = run(model, records, opts, progress=_progress(args.quiet))
    settings = {"run": {"assembly": args.assembly, "checkpoint": args.checkpoint, "weights": args.weights, "data": args.data,
                        "split": args.split, "annotations": args.annotations, "images": args.images, "limit": args.limit,
                        "options": opts.model_dump(), "seconds": round(time.monotonic() - started, 2),
                        "vlbridge_version": vlbridge.__version__}}
    if args.limit and args.task == "caption":
        result.metrics.setdefault("notes", []).append("--limit: CIDEr-D's IDF comes from this subset only; not comparable with the full split")
    if args.out:
        written = evaluate.write_results(args.out, result, settings)
        print(f"wrote {written[0]} and {written[1]}", file=sys.stderr)
    if args.json:
        print_json({**result.metrics, **settings})
    else:
        show_table(result.metrics)
    return 0


def show_table(metrics: dict[str, Any]) -> None:
    """A few lines a person reads: the headline numbers and what they were computed with."""
    task = metrics["task"]
    if task == "caption":
        names = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
        print_table([[_fmt(metrics[n], 4) for n in names]], list(names))
        print(f"{metrics['num_images']} images; tokenizer: {metrics['tokenizer']}; {metrics['scale']}")
    elif task == "vqa":
        types = metrics.get("per_answer_type", {})
        print_table([[_fmt(metrics["overall"]), *(_fmt(v) for v in types.values())]], ["overall", *types])
        print(f"{metrics['num_questions']} questions; VQA accuracy (percent); normalisation: {metrics['normalization']}")
    else:
        names = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean")
        rows = [[source, *(_fmt(metrics[source][n]) for n in names)] for source in ("itc", "itm")]
        print_table(rows, ["scores", *names])
        print(f"{metrics['num_images']} images, {metrics['num_texts']} texts; recall in percent; ITM re-ranks each query's ITC top {metrics['k']}")
    for note in metrics.get("notes", []):
        print(f"note: {note}")


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
