"""Everything a comparison would refuse later, said before anything is cached or trained.

A comparison trains each run through the ordinary trainer, whose config checks would otherwise
speak only when that run's turn came, minutes into the comparison and naming a training config the
user never wrote. Here every run's training configs (one per stage it trains) are checked as the
trainer will check them, and every evaluation split's files against its tasks, all at once. Every
image a split scores is decoded once here too: a bad one met in the evaluation stopped the comparison
after the runs it had trained (the quick demo's 48 distinct images take about 30 ms, on top of the
import of the decoder, which training needs anyway).
"""

from __future__ import annotations

from pathlib import Path

from vlbridge.compare.config import CompareConfig, EvalSet
from vlbridge.data.records import DataError
from vlbridge.data.vqa import check_pattern
from vlbridge.errors import AssemblyError, UnreadableImagesError, VLBridgeError
from vlbridge.evaluation.readable import UnreadableImage, image_key, shown_unreadable, unreadable_images
from vlbridge.evaluation.scenes import read_scenes
from vlbridge.files.checkpoint import read_meta

# A training config's keys, as the comparison config spells them (for the messages).
_KEYS = "(keys as a training config names them: optimizer.lr is lr, objective is stageN_objective, data.train is stageN_data)"


def preflight(config: CompareConfig) -> None:
    """Raise one VLBridgeError listing every problem of the runs and evaluation splits; an
    UnreadableImagesError (whose `images` holds every one) when evaluation images are among them."""
    problems = [p for run_index, run in enumerate(config.runs) for p in _run_problems(config, run_index)]
    bad: list[UnreadableImage] = []
    for index, split in enumerate(config.evals):
        split_problems = eval_problems(split, f"evals.{index}")
        if not split_problems:  # its files name the images, so they come first
            split_problems, found = image_problems(config, split, f"evals.{index}")
            bad += found
        problems += split_problems
    problems += generation_problems(config)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        message = f"the comparison cannot run as configured ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{listed}"
        raise UnreadableImagesError(message, bad) if bad else VLBridgeError(message)


def _run_problems(config: CompareConfig, index: int) -> list[str]:
    from vlbridge.compare.runner import resolve_assembly, train_config_of
    from vlbridge.train.config import TrainConfigError, check_config, read_config

    run = config.runs[index]
    where = f"runs.{index} ({run.name})"
    if run.checkpoint is not None:
        try:
            stage = read_meta(Path(run.checkpoint).expanduser())["stage"]
        except VLBridgeError as exc:
            return [f"{where}.checkpoint: {exc}"]
        texts = sorted({task for split in config.evals for task in _tasks_run(split)} & {"caption", "vqa", "lmms-eval"})
        if stage == 1 and texts:
            return [f"{where}.checkpoint: {run.checkpoint!r} is a stage-1 checkpoint: it has no trained projection into an LLM, "
                    f"so it cannot be scored on {' and '.join(texts)}; evaluate it on retrieval only, or train its stage 2"]
        return []
    try:
        assembly = resolve_assembly(run)
    except AssemblyError as exc:
        return [f"{where}.assembly: {p}" for p in exc.problems]
    problems = []
    scratch = Path(config.output_dir) / "preflight"  # named, never written
    for stage, steps in ((1, run.stage1_steps), (2, run.stage2_steps)):
        if not steps:
            continue
        init_from = run.init_from if stage == 2 else None
        raw = train_config_of(config, run, assembly, stage, steps, config.seeds[0], scratch, init_from, None)
        try:
            check_config(read_config(raw)[0], f"{where} stage {stage}")
        except TrainConfigError as exc:
            problems += [f"{where}, stage {stage}: {p} {_KEYS}" for p in exc.problems]
    return problems


# The files each task reads; the evaluation runs a task where the split gives the first of them.
TASK_FILES = {"caption": ("captions",), "retrieval": ("captions",), "vqa": ("questions", "annotations")}


def _tasks_run(split: EvalSet) -> list[str]:
    """What a split scores: each of its tasks whose files it gives (as the evaluation decides), and lmms-eval."""
    ran = [task for task in split.tasks if getattr(split, TASK_FILES[task][0])]
    return ran + (["lmms-eval"] if split.lmms_eval is not None else [])


def eval_problems(split: EvalSet, where: str) -> list[str]:
    """The split's files exist, and each task it names has the files it reads."""
    problems = []
    for key in ("captions", "questions", "annotations", "scenes"):
        value = getattr(split, key)
        if value is not None and not Path(value).expanduser().is_file():
            problems.append(f"{where}.{key}: file not found: {value}")
        elif key == "scenes" and value is not None:  # read only when retrieval is scored, after every run has trained
            try:
                read_scenes(value)
            except VLBridgeError as exc:
                problems.append(f"{where}.scenes: {exc}")
    if split.images is not None and not Path(split.images).expanduser().is_dir():
        problems.append(f"{where}.images: {split.images!r} is not a directory")
    if split.image_pattern is not None:
        try:
            check_pattern(split.image_pattern, "split", f"{where}.questions")
        except DataError as exc:
            problems.append(f"{where}.image_pattern: {exc}")
    if not _tasks_run(split):  # every run would be trained for a split that scores nothing (an empty table, as evals: [])
        problems.append(f"{where}: gives no captions, questions or lmms_eval, so none of its tasks ({', '.join(split.tasks)}) "
                        "would score anything; add captions (caption, retrieval) and/or questions with annotations (vqa)")
    asked = split.tasks if "tasks" in split.model_fields_set else []  # by default, a task runs where its files are given
    for task in asked:
        missing = [key for key in TASK_FILES[task] if getattr(split, key) is None]
        if missing:
            problems.append(f"{where}.tasks: {task} reads {' and '.join(missing)}, which the split does not give; add "
                            f"{', '.join(missing)} or drop {task}")
    return problems


# No skip option, unlike `vlbridge eval --skip-unreadable`: a comparison's tables, intervals and paired tests set runs
# against each other image by image, and results are reused across resumes; each must cover one fixed set.
NO_SKIP = ("replace or remove them (the evaluation would stop on them after the runs had trained; a comparison "
           "scores every run on the same whole set, so it leaves no image out)")


def image_problems(config: CompareConfig, split: EvalSet, where: str) -> tuple[list[str], list[UnreadableImage]]:
    """The problem naming the split's images that are missing or do not decode (each decoded once, as the
    evaluation would: `vlbridge.evaluation.readable`), and those images."""
    from vlbridge.compare.evaluation import scored_records

    retrieves = any(run.stage1_steps or run.init_from is not None for run in config.runs)  # as runner.stage1_source
    try:
        records = scored_records(split, retrieves)
    except VLBridgeError as exc:
        return [f"{where} ({split.name}): {exc}"], []
    found = unreadable_images(records)
    if not found:
        return [], []
    total = len({image_key(record.image) for record in records})
    problem = f"{where} ({split.name}): {len(found)} of its {total} images cannot be read; {NO_SKIP}:\n      "
    return [problem + shown_unreadable(found, indent="      ")], found


def generation_problems(config: CompareConfig) -> list[str]:
    """The generation settings every caption and answer will use."""
    from vlbridge.modeling.inference import caption_options

    try:
        caption_options(dict(config.generation))
    except VLBridgeError as exc:
        return [f"generation: {str(exc).removeprefix('bad generation settings: ')}"]
    return []
