"""`vlbridge caption`, `vlbridge ask`, `vlbridge retrieve`: run a built model on images."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vlbridge.cli.argtypes import non_negative_int, positive_int
from vlbridge.cli.model_source import add_random_weights_argument, check_model_source, open_model
from vlbridge.cli.output import print_json, print_table
from vlbridge.errors import VLBridgeError
from vlbridge.files.image_urls import url_problem
from vlbridge.files.userfiles import not_a_file


def _model_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--assembly", "-a", metavar="PRESET_OR_YAML", help="assembly YAML or preset name")
    source.add_argument("--checkpoint", "-c", metavar="DIR", help="a vlbridge checkpoint directory (model.save / vlbridge import)")
    p.add_argument("--weights", metavar="PATH", help="weights for --assembly: a checkpoint dir (its connector, and the encoder "
                   "tensors and LoRA adapters its run fine-tuned) or a connector .safetensors")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_random_weights_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")


DEFAULT_BEAMS = 5  # BLIP-2's captioning beam width


def _generation_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--num-beams", type=positive_int, default=None, help=f"beam width (default {DEFAULT_BEAMS}; not with --sample)")
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--min-new-tokens", type=non_negative_int, default=1, help="default 1")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--sample", action="store_true", help="sample (top-p) instead of beam search")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("caption", help="caption images")
    _model_arguments(c)
    _generation_arguments(c, 30)
    c.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.set_defaults(func=cmd_caption)
    q = sub.add_parser("ask", help="answer a question about each image (zero-shot VQA)")
    _model_arguments(q)
    _generation_arguments(q, 10)
    q.add_argument("--question", "-q", required=True, action="append", help="the question (once, or once per image)")
    q.add_argument("--prompt", default="Question: {} Short answer:", help="template; {} is the question")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.set_defaults(func=cmd_ask)
    r = sub.add_parser("retrieve", help="rank texts for images and images for texts (ITC, then ITM re-rank)")
    _model_arguments(r)
    r.add_argument("--text", "-t", action="append", required=True, help="a candidate text (repeat)")
    r.add_argument("--k", type=positive_int, default=128, help="ITC shortlist re-ranked by ITM (default 128)")
    r.add_argument("--top", type=positive_int, default=3, help="results shown per query")
    r.add_argument("images", nargs="+", metavar="IMAGE")
    r.set_defaults(func=cmd_retrieve)


def _load_model(args: argparse.Namespace):
    source = check_model_source(args)  # -a/-c/--weights, the assembly name before torch, then checkpoint and device
    args.images = [os.path.expanduser(image) for image in args.images]  # a quoted '~/x.jpg', as --checkpoint reads it
    for image in args.images:
        if problem := url_problem(image):
            raise VLBridgeError(problem)
        if Path(image).is_dir():
            raise VLBridgeError(f"{image} is a directory; give image files (a shell glob such as {Path(image) / '*.jpg'} lists them)")
        problem = not_a_file(Path(image))
        if problem:
            raise VLBridgeError(f"image {image} {problem}")  # "not found" would misname a device or a link to nothing
    return open_model(source)


def _generation(args: argparse.Namespace) -> dict:
    if args.sample and args.num_beams not in (None, 1):
        raise VLBridgeError(f"--sample draws one continuation instead of a beam search, so --num-beams {args.num_beams} would be "
                            "ignored; give one of them")
    beams = DEFAULT_BEAMS if args.num_beams is None else args.num_beams
    return {"num_beams": 1 if args.sample else beams, "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.min_new_tokens, "repetition_penalty": args.repetition_penalty, "do_sample": args.sample}


def cmd_caption(args: argparse.Namespace) -> int:
    model = _load_model(args)
    captions = model.caption(args.images, prompt=args.prompt, **_generation(args))
    _show([{"image": i, "caption": c} for i, c in zip(args.images, captions)], args.json, ["image", "caption"])
    return 0


def _no_blank(values: list[str], flag: str, what: str) -> None:
    blank = [i + 1 for i, value in enumerate(values) if not value.strip()]
    if blank:
        raise VLBridgeError(f"{flag}: {what} {', '.join(map(str, blank))} is empty; give the text itself")


def cmd_ask(args: argparse.Namespace) -> int:
    _no_blank(args.question, "--question/-q", "question")
    questions = args.question[0] if len(args.question) == 1 else args.question
    model = _load_model(args)
    answers = model.answer(args.images, questions, prompt=args.prompt, **_generation(args))
    asked = questions if isinstance(questions, list) else [questions] * len(args.images)
    _show([{"image": i, "question": q, "answer": a} for i, q, a in zip(args.images, asked, answers)], args.json, ["image", "question", "answer"])
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    _no_blank(args.text, "--text/-t", "text")
    model = _load_model(args)
    result = model.retrieve(args.images, args.text, k=args.k)
    rows = [{"image": image, "texts": [args.text[t] for t in result.texts_for_image(i, args.top)]} for i, image in enumerate(args.images)]
    rows += [{"text": text, "images": [args.images[j] for j in result.images_for_text(t, args.top)]} for t, text in enumerate(args.text)]
    if args.json:
        print_json({"image_to_text": rows[:len(args.images)], "text_to_image": rows[len(args.images):],
                    "itc": result.itc.tolist(), "i2t": result.i2t.tolist(), "t2i": result.t2i.tolist()})
    else:
        for row in rows:
            query = row.get("image") or row.get("text")
            print(f"{query} -> " + " | ".join(row.get("texts") or row.get("images")))
    return 0


def _show(rows: list[dict], as_json: bool, columns: list[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_table([[str(r[c]) for c in columns] for r in rows], [c.upper() for c in columns])
