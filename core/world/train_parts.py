"""Train the world's frozen "pretrained" parts into checkpoint directories (the `world-*` presets load them).

    python -m vlbridge.world.train_parts --out plugins/world     # in the repository: the shipped files
    python -m vlbridge.world.train_parts --out /tmp/parts --quick  # seconds, for tests

Writes OUT/eva-vit-g/model.safetensors, OUT/{opt,flan-t5,bert}/ (transformers folders with their
tokenizers), all fp16, and OUT/manifest.json (sizes, data seed, script version, times and the
verification numbers). The parts train in a hidden folder in OUT and replace their old folders only
when all are done: an interrupted run leaves OUT as it was. Deterministic for a seed: one CPU thread per process (on a busy 2-core
machine that was ~10x faster than two threads fighting for the cores), seeded generators, data
drawn from the world by index; with `--jobs 2` the parts train in two processes side by side
(the encoder, OPT with BERT, and FlanT5 are three groups).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vlbridge.files.atomic import aside_name, atomic_write_text, replace_folder, staging_dir
from vlbridge.world import architectures
from vlbridge.world.assets import ENCODER_FILE, ENCODER_MODEL_TYPE, MANIFEST, PARTS
from vlbridge.world.config import WorldConfig
from vlbridge.world.text_corpus import captions_of, documents, make_tokenizer, qa_pairs, tokenizer_lines

SCRIPT_VERSION = 7  # 7: the readers learn the world language with "above", "left" and "absent" captions (9 per image)
# 5: OPT's reading documents come in two styles (train_text.READING_STYLES); "lm" ships
# 6: FlanT5's reading rounds add one caption completion per image, led by the image's other captions
EVAL_IMAGES = {"full": 300, "quick": 8}
# Captions per image of the world each part learns from. The readers (OPT, FlanT5) read the whole
# language (9: with the "above", "left" and "absent" kinds that state what questions ask); the encoder and
# BERT keep the six describing kinds they were trained on, so that a rerun reproduces them and the
# stage-1 Q-Formers built on them (vlbridge.compare.stage1_parts) stay theirs.
CAPTIONS_PER_IMAGE: dict[str, int] = {"eva-vit-g": 6, "bert": 6, "opt": 9, "flan-t5": 9}
MONITOR = {"images": 40, "every": 200}  # the readers' QA accuracy with captions, on val images, as training goes
Log = Callable[[str], None]


def _recipes(quick: bool) -> dict[str, Any]:
    from vlbridge.world.train_encoder import EncoderRecipe
    from vlbridge.world.train_text import TextRecipe

    if quick:
        return {"eva-vit-g": EncoderRecipe(steps=2, batch=8, warmup=1), "opt": TextRecipe(steps=2, batch=2, warmup=1),
                "flan-t5": TextRecipe(steps=2, batch=4, warmup=1), "bert": TextRecipe(steps=2, batch=8, warmup=1)}
    return {"eva-vit-g": EncoderRecipe(), "opt": TextRecipe(steps=1400, batch=32, lr=2e-3, warmup=100, reading="lm"),
            "flan-t5": TextRecipe(steps=1400, batch=32, lr=2e-3, warmup=50), "bert": TextRecipe(steps=150, batch=64, lr=2e-3)}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train_encoder_part(out: Path, world: WorldConfig, recipe: Any, seed: int, eval_images: int, log: Log) -> dict[str, Any]:
    """CLIP-train the encoder; verify by zero-shot retrieval on val and on the held-out split, and
    by linear probes of each object's attributes (fit on train images, scored on test images)."""
    from safetensors.torch import save_file

    from vlbridge.plugins.encoders.eva_vit_g import EvaVitGOptions
    from vlbridge.world.encoder_probe import probe_encoder
    from vlbridge.world.train_encoder import attribute_probe, retrieval, train_encoder

    encoder, clip, vocab = train_encoder(EvaVitGOptions(variant="tiny", **architectures.ENCODER), world, recipe, seed, log)
    folder = out / "eva-vit-g"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in encoder.state_dict().items()}, str(folder / ENCODER_FILE))
    config = {"model_type": ENCODER_MODEL_TYPE, **architectures.ENCODER}  # eva-vit-g reads its architecture from here
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    encoder.half().float()  # measured as shipped
    linear = probe_encoder(encoder, world, train=10 * eval_images, test=eval_images)
    checks = {split: retrieval(clip, vocab, world, split, eval_images) for split in ("val", "comp")}
    probe = attribute_probe(clip, vocab, world, "val", eval_images)
    return {"params": _params(encoder), "recipe": dataclasses.asdict(recipe), "tokens": encoder.num_tokens,
            "image_size": world.image_size, "retrieval_zero_shot": checks, "caption_vs_edited_caption_val": probe,
            "linear_probe_test": linear}


def _save_hf(model: Any, tokenizer: Any, folder: Path) -> None:
    model.half().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _reader_checks(model: Any, tokenizer: Any, world: WorldConfig, eval_images: int) -> tuple[Callable[[], Any], dict[str, Any]]:
    """A monitor for `fit` (overall accuracy with captions on a few val images) and the final
    numbers: every question of `eval_images` val images, with all captions and with none."""
    from vlbridge.world.generate import make_image
    from vlbridge.world.reading import qa_accuracy

    few = [make_image(world, "val", i) for i in range(min(MONITOR["images"], eval_images))]
    monitor = lambda: qa_accuracy(model, tokenizer, few, True)["overall"]  # noqa: E731

    def final() -> dict[str, Any]:
        images = [make_image(world, "val", i) for i in range(eval_images)]
        return {"with_captions": qa_accuracy(model, tokenizer, images, True), "without_context": qa_accuracy(model, tokenizer, images, False),
                "images": len(images), "questions_per_image": world.questions_per_image}

    return monitor, final


def train_opt_part(out: Path, world: WorldConfig, recipe: Any, seed: int, eval_images: int, log: Log) -> dict[str, Any]:
    """Language modelling and reading at once: documents of captions then answered questions."""
    from transformers import AutoTokenizer

    from vlbridge.world.train_text import build_opt, fit, padded_lm_batches, perplexity, reading_batches, reading_loss

    folder = out / "opt"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model = build_opt(tokenizer)
    val = padded_lm_batches(tokenizer, documents(world, "val", 0, eval_images))
    before = perplexity(model, val)
    monitor, final = _reader_checks(model, tokenizer, world, eval_images)
    loss_of = lambda m, b: reading_loss(m, b, recipe.reading)  # noqa: E731
    loss, curve = fit(model, reading_batches(tokenizer, world, recipe.batch, recipe.reading), recipe, "opt", log, loss_of, monitor, MONITOR["every"])
    after = perplexity(model, val)
    model.half().float()  # measured as shipped
    accuracy = final()
    _save_hf(model, tokenizer, folder)
    return {"params": _params(model), "recipe": dataclasses.asdict(recipe), "final_loss": round(loss, 4),
            "data": _reading_data(recipe.reading),
            "val_perplexity": {"before": before, "after": after}, "val_qa_accuracy_with_captions_by_step": curve,
            "val_qa_accuracy": accuracy}


def _reading_data(style: str) -> str:
    """The manifest's words for OPT's reading documents and loss in `style`."""
    from vlbridge.world.train_text import ANSWER_WEIGHT, LM_SHARE, READING_STYLES

    form = READING_STYLES[style]
    order = "all captions in order, or the scene caption first and the rest shuffled" if form["shuffle"] else "all captions in order"
    loss = (f"every token is LM loss, answer tokens weigh {ANSWER_WEIGHT}" if style == "lm" else
            f"mean on answer tokens + {LM_SHARE} x mean on the other tokens (language modelling)")
    return f"reading documents ({style!r}): {order} (none for {form['blind']:.0%}), then 1-{form['questions']} answered questions; loss: {loss}"


def train_t5_part(out: Path, world: WorldConfig, recipe: Any, seed: int, eval_images: int, log: Log) -> dict[str, Any]:
    """Reading (captions + question -> answer) for three quarters of the batches; question answering
    and caption completion (prefix-LM), some led by unrelated documents, for the rest."""
    from transformers import AutoTokenizer

    from vlbridge.world.train_text import build_t5, fit, perplexity, t5_batches, t5_pairs, t5_reading_pairs, READING_START

    folder = out / "flan-t5"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_t5(tokenizer)
    val_pairs = t5_pairs(captions_of(world, "val", 0, eval_images), qa_pairs(world, "val", 0, eval_images), [], random.Random(0), 0)
    val = t5_batches(tokenizer, val_pairs, min(32, len(val_pairs)))
    before = perplexity(model, val)
    samples = recipe.steps * recipe.batch
    reading = t5_reading_pairs(world, READING_START, max(2, samples // 4), rng, continuations=1)  # two questions, one completion per image
    images = max(2, samples // 44)  # 11 pairs per image
    captions = captions_of(world, "pretrain", 45_000_000, images)
    pairs = t5_pairs(captions, qa_pairs(world, "pretrain", 45_000_000, images), documents(world, "pretrain", 46_000_000, 200), rng, 6)
    batches = t5_batches(tokenizer, reading, recipe.batch) + t5_batches(tokenizer, pairs, recipe.batch)  # alike lengths: little padding
    rng.shuffle(batches)
    monitor, final = _reader_checks(model, tokenizer, world, eval_images)
    loss, curve = fit(model, lambda step: batches[step % len(batches)], recipe, "flan-t5", log, monitor=monitor, every=MONITOR["every"])
    after = perplexity(model, val)
    model.half().float()  # measured as shipped
    accuracy = final()
    _save_hf(model, tokenizer, folder)
    return {"params": _params(model), "recipe": dataclasses.asdict(recipe), "final_loss": round(loss, 4),
            "data": f"{len(reading)} reading pairs, {len(pairs)} question-answering and caption-completion pairs, in batches of one kind",
            "val_perplexity": {"before": before, "after": after}, "val_qa_accuracy_with_captions_by_step": curve,
            "val_qa_accuracy": accuracy}


def train_bert_part(out: Path, world: WorldConfig, recipe: Any, seed: int, eval_images: int, log: Log) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from vlbridge.world.train_text import build_bert, fit, mlm_batch, perplexity

    folder = out / "bert"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model = build_bert(tokenizer)
    length = model.config.max_position_embeddings
    val_docs = [d.removeprefix("Question: ").replace(" Short answer:", "") for d in documents(world, "val", 0, eval_images)]
    fixed = torch.Generator().manual_seed(0)
    val = [mlm_batch(tokenizer, val_docs[at: at + 64], fixed, length) for at in range(0, len(val_docs), 64)]
    before = perplexity(model, val)
    docs = [d.removeprefix("Question: ").replace(" Short answer:", "") for d in documents(world, "pretrain", 50_000_000, max(2, recipe.steps * recipe.batch // 10))]
    generator = torch.Generator().manual_seed(seed)
    loss, _ = fit(model, lambda step: mlm_batch(tokenizer, [docs[(step * recipe.batch + k) % len(docs)] for k in range(recipe.batch)], generator, length),
               recipe, "bert", log)
    after = perplexity(model, val)
    _save_hf(model, tokenizer, folder)
    return {"params": _params(model), "steps": recipe.steps, "batch": recipe.batch, "final_loss": round(loss, 4),
            "val_masked_perplexity": {"before": before, "after": after}}


TRAINERS = {"eva-vit-g": train_encoder_part, "opt": train_opt_part, "flan-t5": train_t5_part, "bert": train_bert_part}


GROUPS: tuple[tuple[str, ...], ...] = (("eva-vit-g",), ("opt", "bert"), ("flan-t5",))  # a process each, `jobs` at a time


def _train_group(out: Path, seed: int, quick: bool, parts: tuple[str, ...], log: Log = print) -> dict[str, Any]:
    """Train some parts in this process, one thread; tokenizers first for the text parts."""
    torch.set_num_threads(1)
    recipes, eval_images = _recipes(quick), EVAL_IMAGES["quick" if quick else "full"]
    for kind in [kind for kind in ("opt", "flan-t5", "bert") if kind in parts]:
        make_tokenizer(kind, tokenizer_lines(part_world(kind, seed))[: 300 if quick else None], out / kind)
    report: dict[str, Any] = {}
    for part in parts:
        began, began_cpu = time.perf_counter(), time.process_time()
        report[part] = TRAINERS[part](out, part_world(part, seed), recipes[part], seed, eval_images, log)
        report[part]["captions_per_image"] = CAPTIONS_PER_IMAGE[part]
        report[part]["train_seconds"] = round(time.perf_counter() - began, 1)  # wall clock: grows when the machine is shared
        report[part]["cpu_seconds"] = round(time.process_time() - began_cpu, 1)  # this process's CPU time (one thread)
        report[part]["bytes"] = _folder_bytes(out / part)
        log(f"{part}: {json.dumps(report[part])}")
    return report


def part_world(part: str, seed: int) -> WorldConfig:
    """The world a part learns from: the seed's, with the part's captions per image."""
    return WorldConfig(seed=seed, captions_per_image=CAPTIONS_PER_IMAGE[part])


def train_parts(out: str | Path, seed: int = 0, quick: bool = False, parts: tuple[str, ...] = PARTS,
                jobs: int = 2, log: Log = print) -> dict[str, Any]:
    """Train `parts` into `out` and write its manifest; return the manifest. With `jobs` 2 the
    groups of GROUPS train in two worker processes (two cores, one thread each); every part's
    result is the same either way."""
    out = Path(out)
    start = time.perf_counter()
    groups = [g for g in (tuple(p for p in group if p in parts) for group in GROUPS) if g]
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    stage = staging_dir(out, ".train_parts-")  # the parts train here and move into `out` together at the end:
    try:  # an interrupted run leaves the old parts whole (not a new tokenizer beside old weights) and their manifest true
        if jobs > 1 and len(groups) > 1:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            with ProcessPoolExecutor(min(jobs, len(groups)), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_train_group, stage, seed, quick, group) for group in groups]
                results = [future.result() for future in futures]
        else:
            results = [_train_group(stage, seed, quick, group, log) for group in groups]
        report = {part: {**numbers, "seed": seed, "quick": quick} for result in results for part, numbers in result.items()}
        for part in report:
            replace_folder(stage / part, out / part)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    previous = out / MANIFEST  # parts trained in an earlier run keep their entries, marked as such
    before = _previous(previous)
    earlier = {part: numbers for part, numbers in before.get("parts", {}).items() if part not in report}
    for part in [p for p in earlier if p in PARTS]:  # the top-level seed and quick become this run's: a kept part keeps its own
        earlier[part] = {"seed": before.get("seed"), "quick": before.get("quick"), **earlier[part]}
    earlier = mark_stale_stage1(earlier, retrained=set(report), out=out, log=log)
    report = {**earlier, **report}
    manifest = {
        "script": "vlbridge.world.train_parts", "script_version": SCRIPT_VERSION, "quick": quick, "seed": seed,
        "world": WorldConfig(seed=seed).model_dump(mode="json"),
        "data": "the world's 'pretrain' stream (no split image, no held-out pair)", "dtype": "fp16",
        "threads_per_process": 1, "processes": min(jobs, len(groups)), "torch": torch.__version__,
        "transformers": _transformers_version(), "wall_seconds": round(time.perf_counter() - start, 1),
        "parts_from_earlier_runs": sorted(earlier),
        "cpu_seconds": round(sum(p.get("cpu_seconds", 0.0) for p in report.values()), 1), "parts": report,
        # what vlbridge.compare.stage1_parts recorded about the stage-1 Q-Formers kept above
        **{key: value for key, value in _previous(previous).items() if key.startswith("stage1_")},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def remove_leftovers(out: Path) -> None:
    """Delete what a killed run left hidden in `out` (its staging folder, a part moved aside): the
    `finally` that removes them does not run after a SIGKILL, and they would pile up unseen."""
    for leftover in [*out.glob(".train_parts-*.tmp"), *(aside_name(out / part) for part in PARTS)]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


STAGE1_READS = ("eva-vit-g", "bert")  # what a stage-1 Q-Former is trained on top of (stage 1 runs no LLM)


def mark_stale_stage1(earlier: dict[str, Any], retrained: set[str], out: Path, log: Log) -> dict[str, Any]:
    """Stage-1 Q-Formers kept from an earlier run stop matching an encoder or BERT retrained now:
    their entries get a `stale` note (which `vlbridge.world.assets.stage1_checkpoint` refuses with)
    instead of passing for checkpoints of the new parts."""
    changed = sorted(retrained & set(STAGE1_READS))
    if not changed:
        return earlier
    marked = dict(earlier)
    for name in [n for n in earlier if n.startswith("qformer-")]:
        note = (f"trained on the {' and '.join(changed)} this run replaced; retrain it with "
                f"python -m vlbridge.compare.stage1_parts --out {out}")
        marked[name] = {**earlier[name], "stale": note}
        log(f"warning: {name} is stale: {note}")
    return marked


def _previous(manifest: Path) -> dict[str, Any]:
    return json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlbridge.world.train_parts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the parts to (the repository's plugins/world ships them)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed and the training seed")
    parser.add_argument("--quick", action="store_true", help="a few steps each: checks the script end to end in seconds")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=None, help="processes: 2 trains two groups of parts side by side (default; 1 with --quick)")
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        print(f"train_parts: error: {f'unknown parts {unknown}' if unknown else '--parts names no part'}; choose from {list(PARTS)}",
              file=sys.stderr)
        return 2
    jobs = args.jobs or (1 if args.quick else 2)
    manifest = train_parts(args.out, args.seed, args.quick, parts, jobs)
    print(f"wrote {', '.join(parts)} to {args.out} in {manifest['wall_seconds']} s ({manifest['cpu_seconds']} CPU seconds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
