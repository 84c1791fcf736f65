"""The world's stage-1 Q-Former checkpoints: BLIP-2's `pretrain` checkpoints, in miniature.

    python -m vlbridge.compare.stage1_parts --out plugins/world            # the shipped ones (~20 min, 2 idle cores)
    python -m vlbridge.compare.stage1_parts --out /tmp/parts --quick       # seconds, for tests

(A sibling of `vlbridge.world.train_parts`, which trains the frozen parts these read: it lives in
`compare/` because it drives the Trainer, which the `world` room may not import.)

BLIP-2's users never run stage 1: they start stage 2 from the released stage-1 weights. The demo
does the same with these: each is the demo's own Q-Former assembly (the `world-qformer-opt` preset
with its query count) trained by vlbridge's stage-1 Trainer (ITC + ITM + ITG) on the world's
pretrain stream, read from a frozen-feature cache. The Trainer saves a checkpoint every
`recipe.every` steps; each is scored afterwards (retrieval on val images, image dependence of the
query outputs), which gives the curve the manifest records. The shipped checkpoint is the last one,
stored in fp16 like the other parts. Deterministic for a seed (one thread, seeded data order).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from vlbridge.errors import VLBridgeError
from vlbridge.world.assets import STAGE1_QUERIES
from vlbridge.world.config import WorldConfig

Log = Callable[[str], None]
PRESET = "world-qformer-opt"  # the demo's Q-Former assembly; stage 1 never runs its LLM
PRETRAIN_START = 70_000_000  # pretrain-stream indices of the Q-Former's images (the other parts read other ranges)
DEPENDENCE_IMAGES = 64  # val images the image-dependence measure spreads over (as docs/demo-findings.md section 2)


class Stage1Recipe(BaseModel):
    """How a shipped stage-1 Q-Former is trained and checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    queries: int = Field(ge=1, description="num_query_tokens (the demo's 32 and 8)")
    steps: int = Field(ge=1)
    batch: int = Field(128, ge=2, description="samples per step, each an in-batch ITC negative of the others: 128 retrieves far "
                       "better than 32 for the same samples (docs/demo-findings.md section 13)")
    lr: float = Field(2e-3, gt=0, description="peak lr (the demo's; docs/demo-findings.md section 3 measured retrieval under it)")
    warmup: int = Field(50, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    images: int = Field(6000, ge=2, description="pretrain-stream images")
    captions_per_image: int = Field(6, ge=1, le=9, description="captions of each image (6: the describing kinds, as the shipped "
                                    "checkpoints were trained before the world language gained 'above', 'left' and 'absent')")
    text_tokens: int = Field(24, ge=8, description="stage 1's text length (the demo's; the scene caption needs about 24)")
    every: int = Field(125, ge=1, description="steps between the checkpoints the curve scores")
    curve_images: int = Field(100, ge=2, description="val images each curve point retrieves among")
    final_images: int = Field(300, ge=2, description="val images the final retrieval ranks")
    retrieval_k: int = Field(4, ge=1, description="ITM re-ranks each query's top k ITC candidates (the demo's)")
    positives: Literal["image", "caption"] = Field("image", description="the stage-1 objective's `positives`: 'caption' "
                                                    "never takes an image for a negative of a caption it also has")
    twins: bool = Field(False, description="batches of scenes and their one-change twins (`write_twin_stream`): half as many "
                        "scenes, each with a twin; the shipped checkpoints were trained without (docs/demo-findings.md section 12)")


def write_pretrain_captions(folder: Path, world: WorldConfig, count: int, start: int = PRETRAIN_START) -> Path:
    """Render `count` pretrain-stream images and write their captions (LAVIS list layout)."""
    from vlbridge.files.atomic import atomic_write_text
    from vlbridge.world.generate import make_image
    from vlbridge.world.render import render_scene

    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(start, start + count):
        image = make_image(world, "pretrain", index)
        name = f"images/pretrain_{index:09d}.png"
        render_scene(image.scene, world.image_size).save(folder / name, format="PNG")
        records.append({"image": name, "caption": image.captions, "image_id": image.scene.image_id})
    path = folder / "captions_pretrain.json"
    atomic_write_text(path, json.dumps(records))
    return path


TWIN_ID_OFFSET = 1_000_000_000  # a twin's image_id: its scene's plus this (ITC and ITM tell images apart by id)


def write_twin_stream(folder: Path, world: WorldConfig, scenes: int, steps: int, batch: int, seed: int,
                      start: int = PRETRAIN_START) -> Path:
    """Render `scenes` pretrain-stream scenes and a twin of each (one thing changed: an object's
    shape, size or colour, or where two objects are), and write `steps` x `batch` (image, caption)
    records in training order: each batch holds batch/2 scenes and their twins, captioned by the same
    kind. Read with `shuffle: false`, every batch carries its own hard negatives, as the frozen
    encoder and its CLIP head were trained (`train_encoder.batch_of`): in-batch ITC with random
    negatives is solved by colours alone and never has to read shape or place."""
    import random

    from vlbridge.files.atomic import atomic_write_text
    from vlbridge.world.generate import make_image
    from vlbridge.world.render import render_scene
    from vlbridge.world.train_encoder import twin

    if batch % 2:
        raise ValueError(f"a twin batch pairs each scene with its twin; batch must be even, got {batch}")
    rng = random.Random(seed)
    allowed = world.allowed("pretrain")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(start, start + scenes):
        scene = make_image(world, "pretrain", index).scene
        other = twin(scene, rng, allowed)
        while other.objects == scene.objects:  # a place swap of two alike objects changes nothing: draw again
            other = twin(scene, rng, allowed)
        pair = []
        for member, image_id, name in ((scene, scene.image_id, f"images/pretrain_{index:09d}.png"),
                                       (other, scene.image_id + TWIN_ID_OFFSET, f"images/pretrain_{index:09d}_twin.png")):
            render_scene(member, world.image_size).save(folder / name, format="PNG")
            pair.append((member, image_id, name))
        pairs.append(pair)
    records: list[dict[str, Any]] = []
    order: list[int] = []
    half = batch // 2
    for _ in range(steps):
        if len(order) < half:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:half], order[half:]
        texts = [differing_captions(pairs[k][0][0], pairs[k][1][0], rng) for k in chosen]
        for side in (0, 1):
            records += [{"image": pairs[k][side][2], "caption": text[side], "image_id": pairs[k][side][1]}
                        for k, text in zip(chosen, texts)]
    path = folder / "captions_pretrain.json"
    atomic_write_text(path, json.dumps(records))
    return path


def differing_captions(scene: Any, other: Any, rng: Any) -> tuple[str, str]:
    """Captions of one describing kind, drawn among the kinds whose captions of the two scenes differ
    (a "total" caption of a recoloured twin is the scene's: that pair would be a false negative)."""
    from vlbridge.world.language import BASE_CAPTION_KINDS, caption

    options = [(a, b) for a, b in ((caption(scene, kind, rng), caption(other, kind, rng)) for kind in BASE_CAPTION_KINDS) if a != b]
    if not options:
        raise ValueError(f"twin scenes with identical captions of every kind: {scene} / {other}")
    return rng.choice(options)


def assembly(queries: int, parts: Path) -> dict[str, Any]:
    """The demo's Q-Former assembly with `queries` queries, reading the frozen parts in `parts`
    (the preset's "{world}" folder: the parts a stage 1 in that folder belongs with)."""
    from vlbridge.plugin.resources import read_registry

    text = json.dumps(read_registry()["presets"][PRESET]).replace("{world}", str(parts.resolve()).replace("\\", "/"))
    raw = {**json.loads(text), "name": f"world-qformer-{queries}q-stage1",
           "description": f"the world's stage-1 Q-Former ({queries} queries): BLIP-2's pretrain checkpoint in miniature"}
    raw["connector"]["options"] = {**raw["connector"].get("options", {}), "num_query_tokens": queries}
    return raw


def train_config(recipe: Stage1Recipe, data: dict[str, Any], features: str, out: Path, seed: int, parts: Path) -> dict[str, Any]:
    """The `vlbridge train` config of one stage-1 Q-Former (what `manifest.json` records as its recipe)."""
    return {"assembly": assembly(recipe.queries, parts), "stage": 1, "steps": recipe.steps, "seed": seed, "batch_size": recipe.batch,
            "data": {"train": data, "features": features}, "optimizer": {"lr": recipe.lr},
            "schedule": {"warmup_steps": recipe.warmup, "min_lr": recipe.min_lr},
            "objective": {"max_text_tokens": recipe.text_tokens, "positives": recipe.positives},
            "output_dir": str(out), "save_every": recipe.every, "log_every": recipe.every, "device": "cpu", "tensorboard": False}


@torch.no_grad()
def image_dependence(model: Any, image_embeds: torch.Tensor) -> float:
    """Spread of the query outputs across images over their spread across queries: near 0 when the
    queries ignore the image (BERT init), near 1 when the image moves them as much as the query does."""
    queries = model.connector.query_outputs(image_embeds.to(model.device)).float()
    return round(queries.std(dim=0).mean().item() / max(queries.std(dim=1).mean().item(), 1e-9), 3)


def val_groups(val: Path, images: int) -> tuple[list, str]:
    """The first `images` val images with their scene caption (true of that scene alone), and the scenes file."""
    from vlbridge.compare.config import EvalSet
    from vlbridge.compare.evaluation import retrieval_groups

    spec = EvalSet(name="val", captions=str(val / "captions_val.json"), images=str(val), scenes=str(val / "scenes_val.json"),
                   tasks=["retrieval"], retrieval_limit=images, retrieval_captions=[0])
    return retrieval_groups(spec), str(spec.scenes)


def val_scores(model: Any, val: Path, images: int, k: int) -> dict[str, Any]:
    """ITC and ITM-re-ranked R@1 both ways among the first `images` val images, by their scene caption."""
    groups, scenes = val_groups(val, images)
    return retrieval_numbers(model, groups, scenes, k)


def retrieval_numbers(model: Any, groups: list, scenes: str | None, k: int) -> dict[str, Any]:
    """R@1 (fractions) from `scene_retrieval`, without its per-item columns."""
    from vlbridge.compare.evaluation import scene_retrieval

    result = scene_retrieval(model, groups, scenes, k=k)
    return {"candidates": result["num_images"], **{f"{how}_{d}_r1": round(result[how][f"{d}_r1"] / 100, 4)
                                                   for how in ("itc", "itm") for d in ("i2t", "t2i")}}


NOT_LOSSES = ("step", "epoch", "lr", "grad_norm", "images_per_s", "skipped", "nonfinite", "split")


def _losses(record: dict[str, Any]) -> dict[str, float]:
    """The loss terms of a metrics line (loss, itc, itm, itg), rounded."""
    return {k: round(float(v), 4) for k, v in record.items() if k not in NOT_LOSSES and isinstance(v, (int, float))}


def score_checkpoints(run: Path, val: Path, recipe: Stage1Recipe, log: Log) -> list[dict[str, Any]]:
    """Each saved step's losses (metrics.jsonl), val retrieval and image dependence: the curve."""
    from vlbridge.evaluation.tasks import image_inputs
    from vlbridge.modeling import factory
    from vlbridge.train.checkpointing import checkpoint_dir

    losses = {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
              if row.get("split", "train") == "train" and "step" in row}
    groups, _ = val_groups(val, recipe.final_images)
    refs = image_inputs([g.image for g in groups[:DEPENDENCE_IMAGES]])
    curve = []
    for step in range(recipe.every, recipe.steps + 1, recipe.every):
        model = factory.load(checkpoint_dir(run, step), stage=1, device="cpu")
        model.eval()
        embeds = model.encode_images(model.pixel_values(refs))
        point = {"step": step, **_losses(losses.get(step, {})),
                 "val": val_scores(model, val, recipe.curve_images, recipe.retrieval_k), "image_dependence": image_dependence(model, embeds)}
        log(f"qformer-{recipe.queries}q step {step}: {json.dumps(point)}")
        curve.append(point)
    return curve


def ship(run_checkpoint: Path, folder: Path) -> None:
    """Copy the final checkpoint to `folder` with its connector tensors in fp16 (loading casts them
    back) and its frozen parts named relative to it ("../bert"): the parts folder can move."""
    import yaml
    from safetensors.torch import load_file, save_file

    from vlbridge.files.atomic import atomic_write_text
    from vlbridge.files.checkpoint import ASSEMBLY_FILE, META_FILE, RELATIVE_PATHS, WEIGHTS_FILE, relative_paths

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tensors = load_file(str(run_checkpoint / WEIGHTS_FILE))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE),
              metadata={"stage": "1"})
    raw = yaml.safe_load((run_checkpoint / ASSEMBLY_FILE).read_text(encoding="utf-8"))
    meta = json.loads((run_checkpoint / META_FILE).read_text(encoding="utf-8"))
    raw, relative = relative_paths(raw, folder, within=folder.parent)
    atomic_write_text(folder / ASSEMBLY_FILE, yaml.safe_dump(raw, sort_keys=False))
    atomic_write_text(folder / META_FILE, json.dumps({**meta, RELATIVE_PATHS: relative}, indent=2))


def train_stage1_part(out: Path, world: WorldConfig, recipe: Stage1Recipe, seed: int, log: Log,
                      work: Path | None = None) -> dict[str, Any]:
    """Train one stage-1 Q-Former into OUT/qformer-{queries}q; return its manifest entry."""
    from vlbridge.files.checkpoint import read_meta
    from vlbridge.modeling import factory
    from vlbridge.train.cache_build import build_cache
    from vlbridge.train.checkpointing import checkpoint_dir
    from vlbridge.train.trainer import run as train
    from vlbridge.world.generate import generate_world

    scratch = Path(tempfile.mkdtemp(prefix=f"vlbridge-qformer-{recipe.queries}q-", dir=work))
    try:
        if recipe.twins:
            captions = write_twin_stream(scratch / "pretrain", world, recipe.images // 2, recipe.steps, recipe.batch, seed)
        else:
            captions = write_pretrain_captions(scratch / "pretrain", world, recipe.images)
        val = scratch / "val"
        generate_world(val, world.model_copy(update={"train": 0, "val": recipe.final_images, "test": 0, "comp": 0}))
        data = {"format": "coco", "paths": [str(captions)], "image_root": str(scratch / "pretrain"), "num_workers": 0,
                **({"shuffle": False} if recipe.twins else {})}  # a twin stream is written in batch order
        features = scratch / "features"
        build_cache(assembly(recipe.queries, out), [data], features)
        config = train_config(recipe, data, str(features), scratch / "run", seed, out)
        log(f"qformer-{recipe.queries}q: stage 1, {recipe.steps} steps of {recipe.batch} on {recipe.images} pretrain images")
        result = train(config)
        curve = score_checkpoints(scratch / "run", val, recipe, log)
        final_dir = staged_dir(out, recipe.queries)  # moved to qformer-{queries}q with the manifest entry, when all are done
        ship(checkpoint_dir(scratch / "run", result.step), final_dir)
        model = factory.load(final_dir, stage=1, device="cpu")  # measured as shipped (fp16 weights)
        model.eval()
        final = val_scores(model, val, recipe.final_images, recipe.retrieval_k)
        recorded = {k: v for k, v in config.items() if k not in ("data", "output_dir", "device", "tensorboard")}
        return {"params": sum(p.numel() for p in model.connector.parameters()), "stage": read_meta(final_dir)["stage"],
                "recipe": recipe.model_dump(), "train_config": {**recorded, "data": _data_line(recipe, world)},
                "steps": result.step, "final_losses": _losses(result.train),
                "by_step": curve, "val_retrieval": final}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _data_line(recipe: Stage1Recipe, world: WorldConfig) -> str:
    """What the manifest says the Q-Former read."""
    if recipe.twins:
        return (f"the world's pretrain stream, indices {PRETRAIN_START}..{PRETRAIN_START + recipe.images // 2 - 1} and a "
                f"one-change twin of each, in batches of {recipe.batch // 2} pairs, one describing caption per image and step")
    return (f"the world's pretrain stream, indices {PRETRAIN_START}..{PRETRAIN_START + recipe.images - 1}, "
            f"{world.captions_per_image} captions each")


QUERIES = STAGE1_QUERIES  # the demo's query counts
FULL_STEPS = 1_500  # of 128: twice section 13's 750, which left retrieval below the encoder (findings sections 14, 15)
FULL_IMAGES = 24_000  # about 1.3 passes over the image-caption pairs at 1,500 steps of 128
FULL_EVERY = 250  # steps between the curve's points


def recipes(quick: bool, queries: tuple[int, ...] = QUERIES, steps: int | None = None, twins: bool = False) -> list[Stage1Recipe]:
    """The shipped recipes, or a few steps on a few images (`quick`: checks the path end to end)."""
    if quick:
        return [Stage1Recipe(queries=q, steps=steps or 4, batch=8, warmup=1, images=24, every=2, curve_images=8, final_images=8,
                             twins=twins) for q in queries]
    return [Stage1Recipe(queries=q, steps=steps or FULL_STEPS, images=FULL_IMAGES, every=FULL_EVERY, twins=twins) for q in queries]


def _train_one(out: Path, seed: int, recipe: Stage1Recipe) -> dict[str, Any]:
    """One Q-Former in this process, one thread (a worker of `train_stage1_parts`)."""
    import time

    torch.set_num_threads(1)
    began, began_cpu = time.perf_counter(), time.process_time()
    entry = train_stage1_part(out, WorldConfig(seed=seed, captions_per_image=recipe.captions_per_image), recipe, seed, lambda m: print(m, flush=True))
    entry["train_seconds"] = round(time.perf_counter() - began, 1)
    entry["cpu_seconds"] = round(time.process_time() - began_cpu, 1)
    entry["bytes"] = sum(f.stat().st_size for f in staged_dir(out, recipe.queries).rglob("*") if f.is_file())
    return entry


def staged_dir(out: Path, queries: int) -> Path:
    """Where a worker ships its checkpoint: hidden, beside the frozen parts (its "../bert" paths hold)."""
    return out / f".qformer-{queries}q.new"


def train_stage1_parts(out: str | Path, seed: int = 0, quick: bool = False, queries: tuple[int, ...] = QUERIES,
                       steps: int | None = None, jobs: int = 2, twins: bool = False) -> dict[str, Any]:
    """Train the stage-1 Q-Formers into `out` (one process each, up to `jobs` side by side) and add
    them to its manifest.json (the frozen parts must be there: they are what stage 1 reads)."""
    from vlbridge.files.atomic import aside_name, atomic_write_text, replace_folder
    from vlbridge.world.assets import MANIFEST, read_parts_manifest

    out = Path(out)
    read_parts_manifest(out)  # fails early, before any training, when the frozen parts are missing
    plan = recipes(quick, queries, steps, twins)
    for recipe in plan:  # what a killed run left hidden (its `finally` never ran): never shipped into, never piled up
        for leftover in (staged_dir(out, recipe.queries), aside_name(out / f"qformer-{recipe.queries}q")):
            shutil.rmtree(leftover, ignore_errors=True)
    try:  # an interrupted run leaves the old checkpoints in place, each under its own manifest entry
        if jobs > 1 and len(plan) > 1:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            with ProcessPoolExecutor(min(jobs, len(plan)), mp_context=get_context("spawn")) as pool:
                entries = list(pool.map(_train_one, [out] * len(plan), [seed] * len(plan), plan))
        else:
            entries = [_train_one(out, seed, recipe) for recipe in plan]
        for recipe in plan:
            replace_folder(staged_dir(out, recipe.queries), out / f"qformer-{recipe.queries}q")
    finally:
        for recipe in plan:
            shutil.rmtree(staged_dir(out, recipe.queries), ignore_errors=True)
    manifest = read_parts_manifest(out)  # re-read: another script may have added a part while these trained
    manifest.setdefault("parts", {}).update({f"qformer-{r.queries}q": e for r, e in zip(plan, entries)})
    manifest["stage1_script"] = "vlbridge.compare.stage1_parts"
    manifest["stage1_seed"] = seed
    manifest["stage1_quick"] = quick
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def options_problem(quick: bool, queries: list[int], steps: int | None, seed: int) -> str | None:
    """What is wrong with the command's options, checked before any image is rendered (the Trainer
    would refuse them only after the data and the feature cache were made)."""
    if steps is not None and steps < 1:
        return f"--steps must be at least 1, got {steps}"
    if seed < 0:
        return f"--seed must be at least 0, got {seed}"
    if [q for q in queries if q < 1]:
        return f"--queries must be at least 1 each, got {queries}"
    if len(set(queries)) < len(queries):
        return f"--queries names a query count twice ({queries}): both would write the same qformer-Nq folder"
    warmup = recipes(quick, (queries[0],))[0].warmup
    if steps is not None and steps <= warmup:
        return f"--steps must be above the recipe's {warmup} warm-up steps{' (--quick)' if quick else ''}, got {steps}"
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m vlbridge.compare.stage1_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the world parts folder (the repository's plugins/world ships them)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed and the training seed")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images: checks the path in seconds")
    parser.add_argument("--queries", type=int, nargs="+", default=list(QUERIES), help="query counts to train (default 32 8)")
    parser.add_argument("--steps", type=int, default=None, help=f"stage-1 steps (default {FULL_STEPS}; 4 with --quick)")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2, help="processes side by side, one thread each")
    parser.add_argument("--twins", action="store_true", help="train on batches of scenes and their one-change twins (hard "
                        "negatives, as the encoder's CLIP training drew them) instead of the plain stream")
    args = parser.parse_args(argv)
    problem = options_problem(args.quick, args.queries, args.steps, args.seed)
    if problem:
        print(f"stage1_parts: error: {problem}", file=sys.stderr)
        return 2
    try:
        manifest = train_stage1_parts(args.out, args.seed, args.quick, tuple(args.queries), args.steps, args.jobs, args.twins)
    except VLBridgeError as exc:  # a missing parts folder or manifest, say
        print(f"stage1_parts: error: {exc}", file=sys.stderr)
        return 2
    names = [f"qformer-{q}q" for q in args.queries]
    print(f"wrote {', '.join(names)} to {args.out}: " + "; ".join(
        f"{n} val R@1 ITM {manifest['parts'][n]['val_retrieval']['itm_i2t_r1']:.2f}/{manifest['parts'][n]['val_retrieval']['itm_t2i_r1']:.2f}"
        for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
