"""How well a world LLM reads: greedy answers to val questions with the image's captions as text.

Why: the bridge can only help an LLM that uses the context in front of its question. All the
captions of an image (in their order) stand in for a perfect visual prompt; no context at all gives
the blind prior. The gap is what BLIP-2's connector can hope to win. Prompts are the demo's
zero-shot form, "[context] Question: {} Short answer:" (see `vlbridge.world.reading`).

    python bench/probe_world_llm.py                       # the shipped OPT and FlanT5
    python bench/probe_world_llm.py --model DIR --images 300 --questions 10 --json out.json
    python bench/probe_world_llm.py --by-answer --images 200 --questions 10 --captions 6

Prints a table (exact match, overall and per question category) and a JSON line. `--by-answer`
adds the yes/no questions' accuracy by form ("above", "left of", ..., a cell, "is there") and by
right answer: a reader that answers "no" to everything scores about half on them while reading
nothing. `--captions N` puts only each image's first N captions in front (6: the describing kinds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from vlbridge.cli.argtypes import whole_number
from vlbridge.world import WorldConfig
from vlbridge.world.assets import world_dir
from vlbridge.world.language import QUESTION_KINDS

COLUMNS = ("overall", *QUESTION_KINDS)


def load_reader(folder: Path) -> tuple[Any, Any]:
    """A transformers OPT or T5 directory -> (model in fp32, eval mode; tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    family = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return family.from_pretrained(str(folder)).float().eval(), AutoTokenizer.from_pretrained(str(folder))


def probe(folder: Path, seed: int, images: int, questions: int, batch: int, captions: int | None = None,
          by_answer: bool = False) -> dict[str, Any]:
    """Accuracy with the captions (all, or the first `captions`) and without context on `images` val
    images' questions; with `by_answer`, the yes/no questions' accuracy by form and right answer."""
    from vlbridge.world.generate import make_image
    from vlbridge.world.reading import qa_accuracy

    world = WorldConfig(seed=seed, questions_per_image=questions)
    model, tokenizer = load_reader(folder)
    shown = [make_image(world, "val", i) for i in range(images)]
    if captions is not None:
        shown = [dataclasses.replace(image, captions=image.captions[:captions]) for image in shown]
    start = time.perf_counter()
    scores = {name: qa_accuracy(model, tokenizer, shown, context, batch) for name, context in (("with_captions", True), ("without_context", False))}
    extra = {"yes_no_by_answer": yes_no_by_answer(model, tokenizer, shown, batch)} if by_answer else {}
    return {"model": str(folder), "model_type": model.config.model_type, "seed": seed, "images": images,
            "questions_per_image": questions, "captions": len(shown[0].captions) if shown else 0, **scores, **extra,
            "seconds": round(time.perf_counter() - start, 1)}


def question_form(question: str) -> str:
    """"is there", one of the world's pairwise relations, or "cell" (is the A at the <cell>?)."""
    from vlbridge.world.scene import RELATIONS

    if question.startswith("is there"):
        return "is there"
    return next((relation for relation in RELATIONS if f" {relation} " in question), "cell")


def yes_no_by_answer(model: Any, tokenizer: Any, images: list[Any], batch: int) -> dict[str, dict[str, Any]]:
    """Greedy exact match of the spatial and existence questions, with captions in front, grouped
    by question form and right answer: {"above -> yes": {"questions": n, "accuracy": a}, ...}."""
    from collections import defaultdict

    from vlbridge.world.reading import greedy_answers, reading_prompts

    items = [(image, qa) for image in images for qa in image.qas if qa.answer in ("yes", "no")]
    right: dict[str, list[bool]] = defaultdict(list)
    for (_, qa), answer in zip(items, greedy_answers(model, tokenizer, reading_prompts(model, tokenizer, items), batch)):
        right[f"{question_form(qa.question)} -> {qa.answer}"].append(answer == qa.answer)
    return {key: {"questions": len(hits), "accuracy": round(sum(hits) / len(hits), 4)} for key, hits in sorted(right.items())}


def table(result: dict[str, Any]) -> str:
    """One row per context, one column per category."""
    lines = [f"{result['model']} ({result['model_type']}, {result['with_captions']['questions']} questions)",
             f"{'context':<16}" + "".join(f"{c:>9}" for c in COLUMNS)]
    for name in ("with_captions", "without_context"):
        lines.append(f"{name:<16}" + "".join(f"{result[name].get(c, float('nan')):>9.3f}" for c in COLUMNS))
    for key, cell in result.get("yes_no_by_answer", {}).items():
        lines.append(f"  {key:<22}{cell['accuracy']:>7.3f}  ({cell['questions']} questions)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="an OPT or FlanT5 directory (repeatable; default: the shipped two)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--images", type=whole_number(1), default=300, help="val images; every question of each is asked")
    most = next(m.le for m in WorldConfig.model_fields["questions_per_image"].metadata if hasattr(m, "le"))  # the world's own bound
    parser.add_argument("--questions", type=whole_number(1, most), default=5,
                        help=f"questions per image (5: one of each kind, as the demo; at most {most})")
    parser.add_argument("--batch", type=int, default=64, help="prompts generated at once")
    parser.add_argument("--captions", type=whole_number(1), default=None, help="only each image's first N captions in front (default: all)")
    parser.add_argument("--by-answer", action="store_true", help="also the yes/no questions' accuracy by form and right answer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = args.model or [world_dir() / "opt", world_dir() / "flan-t5"]
    results = [probe(folder, args.seed, args.images, args.questions, args.batch, args.captions, args.by_answer) for folder in folders]
    for result in results:
        print(table(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
