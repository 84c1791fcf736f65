"""`vlbridge demo`: BLIP-2's argument as a miniature experiment that runs offline.

Keep a pretrained image encoder and a pretrained LLM frozen (here: the world's own, trained by
`vlbridge.world.train_parts` and shipped), train only a bridge in two stages, and compare it with
bridges that skip stage 1 or pass raw patch tokens (LLaVA's linear and MLP projectors), and with
fewer queries. Every connector gets the same encoder, LLM, data and number of optimizer steps (the
Q-Former splits its steps between stage 1 and stage 2). The no-stage-1 ablation is BLIP-2's: the
same stage 2 as the Q-Former's, from the BERT init instead of the stage-1 weights.

Stage 2 trains on the world's captions and question-answer texts ("Caption: ..." and
"Question: ... Short answer: ..."), so at test time "Caption:" asks for a caption and the VQA prompt
for an answer: the frozen LLM is steered by the soft visual prompt, as in BLIP-2's instructed use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec
from vlbridge.atomic import atomic_write_text
from vlbridge.errors import VLBridgeError

CAPTION_PROMPT = "Caption:"
VQA_PROMPT = "Question: {} Short answer:"
FULL = {"world": {"train": 3000, "val": 100, "test": 300, "comp": 200}, "steps": (130, 250), "limit": 300, "retrieval": 100,
        "k": 8, "batch": 32, "text_tokens": 24}
QUICK = {"world": {"train": 256, "val": 8, "test": 32, "comp": 16}, "steps": (30, 30), "limit": 32, "retrieval": 32,
         "k": 8, "batch": 16, "text_tokens": 24}


def ensure_world(directory: Path, sizes: dict[str, int], seed: int, say) -> dict[str, Any]:
    """Generate the world, or reuse one already there with the same configuration."""
    from vlbridge.world import WorldConfig, generate_world

    config = WorldConfig(seed=seed, **sizes)
    manifest_file = directory / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if manifest.get("config") == config.model_dump(mode="json"):
            say(f"reusing the world in {directory}")
            return manifest
    say(f"generating the world in {directory}")
    return generate_world(directory, config)


def stage2_texts(world: Path) -> Path:
    """JSONL of the training images with explicit (input, target) pairs: ("Caption:", caption) and
    ("Question: ... Short answer:", answer). Stage 2 learns only the target, as in instruction
    tuning; `text` holds the whole string for readers that ignore the pair."""
    out = world / "stage2_train.jsonl"
    captions = json.loads((world / "captions_train.json").read_text(encoding="utf-8"))
    questions = json.loads((world / "questions_train.json").read_text(encoding="utf-8"))["questions"]
    answers = {a["question_id"]: a["multiple_choice_answer"] for a in
               json.loads((world / "annotations_train.json").read_text(encoding="utf-8"))["annotations"]}
    image_of = {c["image_id"]: c["image"] for c in captions}
    lines = []
    for record in captions:
        texts = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        lines += [_pair(record["image"], record["image_id"], CAPTION_PROMPT, t) for t in texts]
    for q in questions:
        lines.append(_pair(image_of[q["image_id"]], q["image_id"], VQA_PROMPT.format(q["question"]), answers[q["question_id"]]))
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    if not out.is_file() or out.read_text(encoding="utf-8") != text:  # unchanged: keep its mtime (results key on it)
        atomic_write_text(out, text)
    return out


def _pair(image: str, image_id: int, prompt: str, target: str) -> dict[str, Any]:
    return {"image": image, "image_id": image_id, "text": f"{prompt} {target}", "text_input": prompt, "text_output": target}


def demo_config(out: Path, quick: bool, seeds: list[int], queries: list[int], only: list[str] | None = None) -> tuple[CompareConfig, dict]:
    """The comparison the demo runs (see the module docstring)."""
    plan = QUICK if quick else FULL
    world = out / "world"
    s1, s2 = plan["steps"]
    q32 = {"num_query_tokens": 32}
    runs = [RunSpec(name="qformer-32q", assembly="world-qformer-opt", connector_options=q32, stage1_steps=s1, stage2_steps=s2),
            RunSpec(name="qformer-32q-no-stage1", assembly="world-qformer-opt", connector_options=q32, stage2_steps=s2)]
    runs += [RunSpec(name=f"qformer-{q}q", assembly="world-qformer-opt", connector_options={"num_query_tokens": q},
                     stage1_steps=s1, stage2_steps=s2) for q in queries if q != 32]
    runs += [RunSpec(name="linear", assembly="world-linear-opt", stage2_steps=s1 + s2),
             RunSpec(name="mlp", assembly="world-mlp-opt", stage2_steps=s1 + s2)]
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise VLBridgeError(f"unknown demo run(s) {unknown}; choose from {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in only]
    evals = [EvalSet(name=split, captions=str(world / f"captions_{split}.json"), questions=str(world / f"questions_{split}.json"),
                     annotations=str(world / f"annotations_{split}.json"), images=str(world), image_pattern="images/world_{split}_{image_id:07d}.png",
                     scenes=str(world / f"scenes_{split}.json"), limit=plan["limit"],
                     retrieval_limit=plan["retrieval"], retrieval_k=plan["k"],
                     tasks=["caption", "vqa", "retrieval"] if split == "test" else ["vqa"])
             for split in ("test", "comp")]
    config = CompareConfig(
        name="vlbridge demo: a miniature BLIP-2 experiment" + (" (quick)" if quick else ""), runs=runs,
        stage1_data={"format": "coco", "paths": [str(world / "captions_train.json")], "image_root": str(world)},
        stage2_data={"format": "jsonl", "paths": [str(world / "stage2_train.jsonl")], "image_root": str(world), "clean_text": False},
        evals=evals, seeds=seeds, batch_size=plan["batch"], stage1_objective={"max_text_tokens": plan["text_tokens"]},
        stage2_objective={"loss_average": "samples"}, lr=2e-3, warmup_steps=max(1, s1 // 10), features=True,
        caption_prompt=CAPTION_PROMPT, vqa_prompt=VQA_PROMPT, output_dir=str(out), device="cpu",
    )
    return config, plan


def run_demo(out: str | Path, quick: bool = False, seeds: list[int] | None = None, queries: list[int] | None = None,
             only: list[str] | None = None, say=print) -> dict[str, Any]:
    from vlbridge.compare.baselines import blind_row
    from vlbridge.compare.runner import run_compare

    out = Path(out)
    config, plan = demo_config(out, quick, seeds or [0], queries or [8, 32], only)
    ensure_world(out / "world", plan["world"], 0, say)
    stage2_texts(out / "world")
    notes = [
        "Frozen parts: the world's EVA-style ViT (trained contrastively on the world's captions), OPT (trained on the world's text only), BERT init for the Q-Former; shipped with vlbridge.",
        f"Budget: batch {plan['batch']}; the Q-Former spends {plan['steps'][0]} optimizer steps in stage 1 (ITC+ITM+ITG) and {plan['steps'][1]} in stage 2; "
        f"the linear and MLP projectors get the same {sum(plan['steps'])} steps, all in stage 2; the no-stage-1 ablation gets the same {plan['steps'][1]} stage-2 steps and starts from the BERT init (BLIP-2's ablation: stage 1 is the only difference).",
        f"Training reads a frozen-feature cache (the encoder is frozen): no image augmentation. Peak lr {config.lr:g} for every run; stage 2 averages its loss per sample, so one-word answers weigh as much as captions.",
        "VQA: official VQAv2 accuracy; comp = compositional split (colour+shape pairs never seen in training). "
        f"Each split scores at most {plan['limit']} questions: one score's standard error is about {50 / math.sqrt(plan['limit']):.1f} points "
        f"(at 50% accuracy), so a difference under about {100 * math.sqrt(2) / math.sqrt(plan['limit']):.0f} points between two rows is within noise; "
        "the per-type columns are noisier still.",
        f"Retrieval: the run's stage-1 model (BLIP-2's retrieval model), R@1 among {plan['retrieval']} test images by ITC and re-ranked by ITM (top {plan['k']}); a caption of an identical scene counts as right. Runs without stage 1 have no trained ITC/ITM heads: not scored.",
        "CIDEr-D/BLEU-4 on the test split; generation is greedy.",
        "blind prior: answers every question with the commonest training answer of its type, gives every image the commonest training caption, and ranks at random; it never sees the image (the floor to beat).",
    ]
    blind = {"blind prior": blind_row(out / "world" / "annotations_train.json", config.evals, out / "world" / "captions_train.json")}
    return run_compare(config, say, notes, progress_label="demo", reference_rows=blind)
