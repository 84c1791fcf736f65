"""`vlbridge demo`: BLIP-2's argument as a miniature experiment that runs offline.

Keep a pretrained image encoder and a pretrained LLM frozen (here: the world's own, trained by
`vlbridge.world.train_parts` and shipped), train only a bridge in two stages, and compare it with
bridges that skip stage 1 or pass raw patch tokens (LLaVA's linear and MLP projectors), and with
fewer queries. Every connector gets the same encoder, LLM, data and number of optimizer steps. The
no-stage-1 ablation is BLIP-2's (its Fig. 5): the same stage 2 as the Q-Former's, from the BERT
init instead of the stage-1 weights.

Stage 1 comes, as BLIP-2's users get it, from pretrained checkpoints: the world's shipped stage-1
Q-Formers (32 and 8 queries, `vlbridge.compare.stage1_parts`, 192,000 samples each in batches of 128), which also do
the retrieval. `stage1="train"` trains a short stage 1 inside the run instead (the Q-Former then
splits its steps between the stages), for a user who wants to watch both.

The headline table follows the paper's protocol: stage 2 trains on image-caption pairs only (the
bare caption after the soft visual prompt, as the world's OPT read captions), so VQA is zero-shot:
the question goes through the frozen LLM's prompt "Question: {} Short answer:", and the LLM must
read the scene from the visual prompt as it learned to read captions. A second table repeats some
runs with a supervised mix in stage 2 (the same captions plus the training questions' answers):
not BLIP-2's zero-shot setting, and labelled as such. Runs that differ only in stage 2 share one
stage 1 (trained once).

Two reference rows join every table: the blind prior (the floor: it never sees the image) and,
for retrieval, the CLIP-style encoder alone (the frozen encoder's own zero-shot retrieval through a
CLIP head trained LiT-style on it: `vlbridge.compare.encoder_alone`), which BLIP-2 says the
Q-Former beats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vlbridge.files.atomic import atomic_write_text
from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec
from vlbridge.compare.encoder_alone import ENCODER_ALONE
from vlbridge.errors import VLBridgeError
from vlbridge.files.userfiles import read_json

CAPTION_PROMPT = ""  # stage 2 learns the bare caption, so captioning asks with no prompt
VQA_PROMPT = "Question: {} Short answer:"  # BLIP-2's, and the form the world's OPT learned QA in
ZERO_SHOT, SUPERVISED = "zero-shot", "supervised"
TITLES = {
    ZERO_SHOT: "Zero-shot (the paper's protocol): stage 2 on image-caption pairs only; VQA asked through the frozen LLM's prompt",
    SUPERVISED: "Supervised mix (not zero-shot): stage 2 on captions plus the training questions' answers",
}
SUPERVISED_SUFFIX = "-sup"
BLIND = "blind prior"  # the reference row of answers guessed from the question alone
REFERENCE = "qformer-32q"  # the key comparisons set every zero-shot row against it
LLMS = ("opt", "flan-t5")  # the world's frozen LLMs: BLIP-2's two families (decoder-only, encoder-decoder)
SHIPPED, TRAIN = "shipped", "train"  # where the Q-Former's stage 1 comes from (`--stage1`)
STAGE1_MODES = (SHIPPED, TRAIN)


class DemoPlan(BaseModel):
    """What one demo costs: the world's size, the optimizer steps, and the evaluation's work."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    world: dict[str, int] = Field(description="WorldConfig sizes (train, val, test, comp, questions_per_image)")
    stage1_steps: int = Field(ge=1, description="the Q-Former's stage-1 steps (projectors get them in stage 2)")
    stage2_steps: int = Field(ge=1, description="stage-2 steps after a stage 1 trained in the run")
    shipped_stage2_steps: int = Field(ge=1, description="every run's stage-2 steps when stage 1 comes from the shipped checkpoints")
    batch: int = Field(ge=1)
    retrieval_k: int = Field(ge=1, description="ITM re-ranks each query's top k ITC candidates")
    text_tokens: int = Field(24, ge=8, description="stage 1's text length (the scene caption needs about 24)")
    supervised: tuple[str, ...] = Field(description="zero-shot runs repeated with the supervised mix in stage 2")


# FULL, measured in CPU seconds on one thread: evaluating a run on every test and compositional
# image (300 each, 1,500 questions each: the intervals' width) costs about 25 s, retrieval 12 s more
# per stage 1; a batch-32 step about 0.8 s in stage 1, 0.45 s in stage 2 (0.5 s for the projectors'
# 65 tokens). Evaluation is the floor; the optimizer steps fill the rest of 8 minutes on 2 cores,
# where two worker processes share the runs (about 6 CPU minutes each).
FULL = DemoPlan(world={"train": 1000, "val": 8, "test": 300, "comp": 300, "questions_per_image": 5},
                stage1_steps=80, stage2_steps=120, shipped_stage2_steps=200, batch=32, retrieval_k=4, supervised=("qformer-32q",))
QUICK = DemoPlan(world={"train": 192, "val": 8, "test": 32, "comp": 16, "questions_per_image": 5},
                 stage1_steps=24, stage2_steps=24, shipped_stage2_steps=48, batch=16, retrieval_k=4, supervised=("qformer-32q",))
GENERATION = {"num_beams": 1, "max_new_tokens": 30}  # greedy; 30 tokens hold a four-object scene caption (VQA: 5)


def ensure_world(directory: Path, sizes: dict[str, int], seed: int, say) -> dict[str, Any]:
    """Generate the world, or reuse one already there with the same configuration."""
    from vlbridge.world import WorldConfig, generate_world
    from vlbridge.world.generate import INCOMPLETE

    config = WorldConfig(seed=seed, **sizes)
    manifest_file = directory / "manifest.json"
    if manifest_file.is_file():
        manifest = read_json(manifest_file, "world manifest", top=dict)  # a broken one is named, not an internal error
        if manifest.get("config") == config.model_dump(mode="json") and not manifest.get(INCOMPLETE):
            say(f"reusing the world in {directory}")
            return manifest
    say(f"generating the world in {directory}")
    return generate_world(directory, config)


def refuse_other_world(out: Path, sizes: dict[str, int], seed: int) -> None:
    """A folder that holds trained runs on another world (another --world-seed, or --quick's sizes)
    is not regenerated under them: every run would restart, and the earlier results would be gone."""
    from vlbridge.world import WorldConfig

    manifest_file, runs = out / "world" / "manifest.json", out / "runs"
    if not manifest_file.is_file() or not runs.is_dir() or not any(runs.iterdir()):
        return
    held = read_json(manifest_file, "world manifest", top=dict).get("config") or {}
    wanted = WorldConfig(seed=seed, **sizes).model_dump(mode="json")
    if held != wanted:
        raise VLBridgeError(f"{out} holds the runs of a demo on {_world_words(held)}; this demo, on {_world_words(wanted)}, "
                            "would replace them. Give it its own folder with --out (by default each world gets one), "
                            f"or remove {out} to start over")


VARIANT_FILE = "demo-variant.json"  # the settings OUT's runs were made with: a demo of others refuses the folder


def demo_variant(quick: bool, world_seed: int, llm: str, stage1: str, plan: DemoPlan) -> dict[str, Any]:
    """What a demo run of a given name trains depends on besides its name: the world, the LLM, where
    stage 1 comes from and its steps. Two demos that differ here share run names (qformer-32q, linear,
    ...) but not runs."""
    return {"quick": quick, "world_seed": world_seed, "llm": llm, "stage1": stage1,
            "stage1_steps": plan.stage1_steps if stage1 == TRAIN else None}


def variant_command(variant: dict[str, Any]) -> str:
    """The `vlbridge demo` options that make `variant` (what a user reruns to resume it)."""
    words = ["vlbridge demo"] + (["--quick"] if variant.get("quick") else [])
    words += [f"--llm {variant.get('llm')}"] if variant.get("llm") != "opt" else []
    words += [f"--stage1 train --stage1-steps {variant.get('stage1_steps')}"] if variant.get("stage1") == TRAIN else []
    words += [f"--world-seed {variant.get('world_seed')}"] if variant.get("world_seed") else []
    return " ".join(words)


def claim_demo_folder(out: Path, variant: dict[str, Any], sizes: dict[str, int], world_seed: int) -> None:
    """Refuse a folder holding the runs of another demo variant, naming it; else record `variant` there.
    A run of the same name but other settings is trained afresh over the one in the folder (as a
    comparison with an edited config must be), so the second of two variants given one --out deleted
    the first's runs, one by one. A folder with runs from before the record tells its world only."""
    record, runs = out / VARIANT_FILE, out / "runs"
    if runs.is_dir() and any(runs.iterdir()):
        if not record.is_file():
            refuse_other_world(out, sizes, world_seed)
        elif (held := read_json(record, "the demo's variant record", top=dict)) == variant:
            return
        else:
            raise VLBridgeError(f"{out} holds the runs of `{variant_command(held)}`; this demo, `{variant_command(variant)}`, "
                                "trains runs of the same names with other settings and would replace them. Rerun with those "
                                "options to resume that demo, give this one its own folder with --out (without --out each "
                                f"variant gets one), or remove {out} to start over")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(variant, indent=1) + "\n")


def _world_words(config: dict[str, Any]) -> str:
    size = {QUICK.world["train"]: "the quick size", FULL.world["train"]: "the full size"}.get(config.get("train"), "another size")
    return f"world seed {config.get('seed')} at {size}"


def supervised_texts(world: Path) -> Path:
    """JSONL of the training images with explicit (input, target) pairs: ("", caption), as the
    zero-shot runs learn captions, and ("Question: ... Short answer:", answer). Stage 2 learns only
    the target, as in instruction tuning; `text` holds the whole string for readers that ignore the pair."""
    out = world / "stage2_supervised.jsonl"
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
    return {"image": image, "image_id": image_id, "text": f"{prompt} {target}".strip(), "text_input": prompt, "text_output": target}


def demo_runs(plan: DemoPlan, queries: list[int], supervised_data: dict[str, Any], llm: str = "opt", stage1: str = SHIPPED) -> list[RunSpec]:
    """The zero-shot runs, then the supervised repeats (same stage 1, other stage-2 data); every
    run bridges the same frozen `llm` (the `world-<connector>-<llm>` presets). With `stage1`
    "shipped" every run trains the same stage-2 steps and the Q-Formers start from the shipped
    stage-1 checkpoints; with "train" the Q-Formers train `plan.stage1_steps` of stage 1 first."""
    if llm not in LLMS:
        raise VLBridgeError(f"unknown demo LLM {llm!r}; choose from {list(LLMS)}")
    if stage1 not in STAGE1_MODES:
        raise VLBridgeError(f"unknown stage-1 source {stage1!r}; choose from {list(STAGE1_MODES)}")
    qformer = f"world-qformer-{llm}"
    if stage1 == SHIPPED:
        s2 = projector_steps = plan.shipped_stage2_steps
    else:
        s2, projector_steps = plan.stage2_steps, plan.stage1_steps + plan.stage2_steps
    start = {q: _stage1_start(q, stage1, plan) for q in {32, *queries}}
    q32 = {"num_query_tokens": 32}
    runs = [RunSpec(name="qformer-32q", assembly=qformer, connector_options=q32, stage2_steps=s2, **start[32]),
            RunSpec(name="qformer-32q-no-stage1", assembly=qformer, connector_options=q32, stage2_steps=s2)]
    runs += [RunSpec(name=f"qformer-{q}q", assembly=qformer, connector_options={"num_query_tokens": q}, stage2_steps=s2, **start[q])
             for q in queries if q != 32]
    runs += [RunSpec(name="linear", assembly=f"world-linear-{llm}", stage2_steps=projector_steps),
             RunSpec(name="mlp", assembly=f"world-mlp-{llm}", stage2_steps=projector_steps)]
    runs = [r.model_copy(update={"group": ZERO_SHOT}) for r in runs]
    by_name = {r.name: r for r in runs}
    runs += [by_name[name].model_copy(update={"name": name + SUPERVISED_SUFFIX, "group": SUPERVISED, "stage2_data": supervised_data})
             for name in plan.supervised if name in by_name]
    return runs


def _stage1_start(queries: int, stage1: str, plan: DemoPlan) -> dict[str, Any]:
    """A Q-Former run's stage-1 fields: the shipped checkpoint to start from, or the steps to train."""
    if stage1 == TRAIN:
        return {"stage1_steps": plan.stage1_steps}
    from vlbridge.world.assets import stage1_checkpoint

    return {"init_from": str(stage1_checkpoint(queries))}


def demo_evals(world: Path, plan: DemoPlan) -> list[EvalSet]:
    """Every image and question of the test and compositional splits; retrieval by the scene caption."""
    return [EvalSet(name=split, captions=str(world / f"captions_{split}.json"), questions=str(world / f"questions_{split}.json"),
                    annotations=str(world / f"annotations_{split}.json"), images=str(world),
                    image_pattern="images/world_{split}_{image_id:07d}.png", scenes=str(world / f"scenes_{split}.json"),
                    retrieval_k=plan.retrieval_k, retrieval_captions=[0],
                    tasks=["caption", "vqa", "retrieval"] if split == "test" else ["vqa"])
            for split in ("test", "comp")]


def default_jobs() -> int:
    """Worker processes for the demo: one per core this process may use, at most 2 (the budget's machine)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


def demo_config(out: Path, quick: bool, seeds: list[int], queries: list[int], only: list[str] | None = None,
                llm: str = "opt", jobs: int | None = None, stage1: str = SHIPPED,
                stage1_steps: int | None = None) -> tuple[CompareConfig, DemoPlan]:
    """The comparison the demo runs (see the module docstring); `stage1_steps` (with `stage1`
    "train" only) replaces the plan's stage-1 steps."""
    plan = QUICK if quick else FULL
    if len(set(queries)) != len(queries):  # two runs of one name: the comparison would refuse them
        raise VLBridgeError(f"--queries: give each query count once, got {queries}")
    _check_shipped_queries(queries, stage1)
    if stage1_steps is not None:
        if stage1 != TRAIN:
            raise VLBridgeError(f"--stage1-steps {stage1_steps} sets the steps of a stage 1 trained in the run; add --stage1 train "
                                "(the default, --stage1 shipped, starts stage 2 from the shipped stage-1 checkpoints)")
        if stage1_steps < 1:
            raise VLBridgeError(f"--stage1-steps must be at least 1, got {stage1_steps}")
        plan = plan.model_copy(update={"stage1_steps": stage1_steps})
    world = out / "world"
    captions = {"format": "coco", "paths": [str(world / "captions_train.json")], "image_root": str(world)}
    supervised = {"format": "jsonl", "paths": [str(world / "stage2_supervised.jsonl")], "image_root": str(world), "clean_text": False}
    runs = demo_runs(plan, queries, supervised, llm, stage1)
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise VLBridgeError(f"unknown demo run(s) {unknown}; choose from {[r.name for r in runs]}")
        runs = [r for r in runs if r.name in only]
    config = CompareConfig(
        name="vlbridge demo: a miniature BLIP-2 experiment" + (" (quick)" if quick else ""), runs=runs,
        stage1_data=captions, stage2_data=captions, evals=demo_evals(world, plan), seeds=seeds, batch_size=plan.batch,
        stage1_objective={"max_text_tokens": plan.text_tokens}, stage2_objective={"loss_average": "samples"}, lr=2e-3,
        warmup_steps=max(1, plan.stage1_steps // 10), features=True, caption_prompt=CAPTION_PROMPT, vqa_prompt=VQA_PROMPT,
        generation=GENERATION, output_dir=str(out), device="cpu", threads=1, jobs=jobs or default_jobs(),
    )
    return config, plan


def _check_shipped_queries(queries: list[int], stage1: str) -> None:
    """Every query count at once, with the flag that makes the others possible: the checkpoint
    lookup names one missing count at a time, and not the option the user gave."""
    from vlbridge.world.assets import STAGE1_QUERIES

    missing = [q for q in queries if q not in STAGE1_QUERIES]
    if stage1 == SHIPPED and missing:
        raise VLBridgeError(f"--queries {' '.join(map(str, missing))}: the shipped stage-1 Q-Formers have "
                            f"{' and '.join(map(str, STAGE1_QUERIES))} queries only; add --stage1 train to train a stage 1 "
                            "for each query count in the run, or keep to the shipped counts")


def stage1_notes(plan: DemoPlan, stage1: str, world_test: int) -> list[str]:
    """Where stage 1 came from, the budget it leaves, and whose retrieval the table shows."""
    common = ("Training reads a frozen-feature cache (no image augmentation); stage 2 averages its loss per sample; "
              "the no-stage-1 ablation trains the same stage 2 from the BERT init (BLIP-2's Fig. 5: stage 1 is the only difference).")
    retrieval = (f"Retrieval: the run's stage-1 model (BLIP-2's retrieval model) ranks the {world_test} test images and their "
                 "'scene' captions (each states every object with its size, colour, shape and cell); R@1 by ITC, and by ITM "
                 f"re-ranking ITC's top {plan.retrieval_k} (the rule for a right caption: below). Runs without stage 1 have no "
                 "trained ITC/ITM heads: not scored.")
    if stage1 == SHIPPED:
        return [
            "Stage 1: the shipped stage-1 Q-Former checkpoints (`--stage1 shipped`, the default; plugins/world/qformer-32q and "
            "qformer-8q, trained by `python -m vlbridge.compare.stage1_parts` on 192,000 samples each of the world's pretrain "
            "stream; recipe and curve in plugins/world/manifest.json), as BLIP-2's users start from its pretrain checkpoints. "
            "The Q-Former rows' retrieval is theirs.",
            f"Budget: batch {plan.batch}; every run trains the same {plan.shipped_stage2_steps} stage-2 steps (the Q-Formers from "
            f"their stage-1 checkpoint, the ablation from the BERT init, the projectors from scratch). {common}", retrieval]
    s1, s2 = plan.stage1_steps, plan.stage2_steps
    return [
        f"Stage 1: trained inside this run (`--stage1 train`, {s1} steps, `--stage1-steps`), on the training images' captions.",
        f"Budget: batch {plan.batch}; the Q-Former spends {s1} optimizer steps in stage 1 and {s2} in stage 2; the linear and "
        f"MLP projectors get the same {s1 + s2} steps, all in stage 2; the ablation gets the same {s2} stage-2 steps. {common}",
        retrieval]


def demo_notes(config: CompareConfig, plan: DemoPlan, world_seed: int = 0, llm: str = "opt", stage1: str = SHIPPED) -> list[str]:
    """What the reader needs to judge the tables: parts, protocol, budget, metrics, statistics."""
    world = plan.world
    from vlbridge.world import WorldConfig

    references = WorldConfig(seed=world_seed, **world).captions_per_image  # the world make_world generates
    reader = "OPT" if llm == "opt" else "FlanT5 (encoder-decoder; the visual prompt and the question go to its encoder)"
    origin, budget, retrieval = stage1_notes(plan, stage1, world["test"])
    return [
        f"Frozen parts: the world's EVA-style ViT (trained contrastively on the world's captions); its {reader}, trained on "
        "the world's text only (captions as documents, then answered questions); a BERT init for the Q-Former; shipped with vlbridge "
        "(the world's parts may still change, and with them these numbers).",
        f"World: seed {world_seed} (`--world-seed`). The frozen parts are the same for every seed: they were trained on "
        "seed 0's pretrain stream, never on a split image, and never on a held-out colour+shape pair.",
        origin,
        f"Protocol: the zero-shot stage 2 (and a stage 1 trained in the run) trains on the {world['train']} training images' "
        f"captions; VQA asks '{VQA_PROMPT}' after the visual prompt, never trained on in the zero-shot table. The supervised "
        "table's stage 2 adds the training questions with their answers (its runs share the zero-shot runs' stage 1).",
        f"{budget} Peak lr {config.lr:g} for every run.",
        f"Evaluation: every test image ({world['test']}, {world['questions_per_image']} questions each) and every compositional "
        f"image ({world['comp']}: colour+shape pairs never seen in training). VQA: official VQAv2 accuracy, greedy, at most 5 "
        f"new tokens. Captioning: CIDEr-D (pycocoevalcap's scale: 1.0 is not 1%) against the {references} references per test image, "
        "greedy, at most 30 new tokens, no prompt. One torch thread: on a shared 2-core machine, small models run faster so.",
        retrieval,
        "blind prior: answers every question with the commonest training answer of its type, gives every image the commonest "
        "training caption, and ranks at random (its retrieval value is the exact expectation, so it has no interval and no "
        "marks); it never sees the image: the floor to beat.",
        f"{ENCODER_ALONE}: the frozen encoder retrieving by itself, as the CLIP-style model under BLIP-2's Q-Former would "
        "(ITC only: the cosine of its [CLS] embedding and a caption's; no ITM), on the same test images, 'scene' captions and "
        "rule as the Q-Former rows; its CLIP head was trained LiT-style on the frozen, shipped vision tower "
        "(`python -m vlbridge.world.clip_head`; recipe and val R@1 in plugins/world/manifest.json). BLIP-2's claim: the "
        "Q-Former retrieves better than it; the key comparisons 'R@1 i2t vs R@1 i2t ITC' (and t2i) test it as stated, "
        "the Q-Former's ITM re-ranking against this row's ITC.",
    ]


DEMO_RERUN = ("rerun the demo with --runs, --seeds and --queries naming them too (or without those flags for the default "
              "runs and seed); results stored under the same settings are reused, not retrained")


def run_demo(out: str | Path, quick: bool = False, seeds: list[int] | None = None, queries: list[int] | None = None,
             only: list[str] | None = None, say=print, world_seed: int = 0, llm: str = "opt", jobs: int | None = None,
             stage1: str = SHIPPED, stage1_steps: int | None = None) -> dict[str, Any]:
    """Generate (or reuse) the world of `world_seed`, train and score every run (in `jobs` processes,
    default: one per core up to 2), write the report. Worker processes are spawned: a script that
    calls this with `jobs` > 1 needs Python's `if __name__ == "__main__":` guard."""
    from vlbridge.compare.baselines import blind_row
    from vlbridge.compare.encoder_alone import encoder_alone_row
    from vlbridge.compare.run import run_compare

    out = Path(out)
    config, plan = demo_config(out, quick, seeds or [0], queries or [8, 32], only, llm, jobs, stage1, stage1_steps)
    claim_demo_folder(out, demo_variant(quick, world_seed, llm, stage1, plan), plan.world, world_seed)
    world = out / "world"
    ensure_world(world, plan.world, world_seed, say)
    supervised_texts(world)

    def references() -> dict[str, dict[str, Any]]:  # run_compare calls it after its preflight has checked the images
        return {BLIND: blind_row(world / "annotations_train.json", config.evals, world / "captions_train.json"),
                ENCODER_ALONE: encoder_alone_row(config.evals)}

    names = [r.name for r in config.runs]
    key_pairs = [(REFERENCE, other) for other in names + [BLIND, ENCODER_ALONE]
                 if other != REFERENCE and not other.endswith(SUPERVISED_SUFFIX)]
    key_pairs += [(name, name.removesuffix(SUPERVISED_SUFFIX)) for name in names if name.endswith(SUPERVISED_SUFFIX)]
    return run_compare(config, say, demo_notes(config, plan, world_seed, llm, stage1), progress_label="demo", reference_rows=references,
                       key_pairs=key_pairs, titles=TITLES, rerun_hint=DEMO_RERUN)
