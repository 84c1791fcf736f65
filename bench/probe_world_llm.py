"""How well a world LLM reads: greedy answers to val questions with the image's captions as text.

Why: the bridge can only help an LLM that uses the context in front of its question. All six
captions of an image (in their order) stand in for a perfect visual prompt; no context at all gives
the blind prior. The gap is what BLIP-2's connector can hope to win. Prompts are the demo's
zero-shot form, "[context] Question: {} Short answer:" (see `vlbridge.world.reading`).

    python bench/probe_world_llm.py                       # the shipped OPT and FlanT5
    python bench/probe_world_llm.py --model DIR --images 300 --questions 10 --json out.json

Prints a table (exact match, overall and per question category) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

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


def probe(folder: Path, seed: int, images: int, questions: int, batch: int) -> dict[str, Any]:
    """Accuracy with all captions and without context on `images` val images' questions."""
    from vlbridge.world.generate import make_image
    from vlbridge.world.reading import qa_accuracy

    world = WorldConfig(seed=seed, questions_per_image=questions)
    model, tokenizer = load_reader(folder)
    shown = [make_image(world, "val", i) for i in range(images)]
    start = time.perf_counter()
    scores = {name: qa_accuracy(model, tokenizer, shown, context, batch) for name, context in (("with_captions", True), ("without_context", False))}
    return {"model": str(folder), "model_type": model.config.model_type, "seed": seed, "images": images,
            "questions_per_image": questions, **scores, "seconds": round(time.perf_counter() - start, 1)}


def table(result: dict[str, Any]) -> str:
    """One row per context, one column per category."""
    lines = [f"{result['model']} ({result['model_type']}, {result['with_captions']['questions']} questions)",
             f"{'context':<16}" + "".join(f"{c:>9}" for c in COLUMNS)]
    for name in ("with_captions", "without_context"):
        lines.append(f"{name:<16}" + "".join(f"{result[name].get(c, float('nan')):>9.3f}" for c in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="an OPT or FlanT5 directory (repeatable; default: the shipped two)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--images", type=int, default=300, help="val images; every question of each is asked")
    parser.add_argument("--questions", type=int, default=5, help="questions per image (5: one of each kind, as the demo)")
    parser.add_argument("--batch", type=int, default=64, help="prompts generated at once")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = args.model or [world_dir() / "opt", world_dir() / "flan-t5"]
    results = [probe(folder, args.seed, args.images, args.questions, args.batch) for folder in folders]
    for result in results:
        print(table(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
