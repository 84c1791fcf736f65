"""vlbridge.evaluation.tasks: run a model over an evaluation set and score it with vlbridge.metrics.

Three tasks, each as `run_*` (predictions and metrics) and `evaluate_*` (the metrics dict only):

- captions: one caption per image, scored against all its references (BLEU, METEOR, ROUGE-L, CIDEr-D);
  predictions in the COCO results format, [{"image_id", "caption"}];
- VQA: one answer per question, VQAv2 accuracy; predictions in the VQA results format,
  [{"question_id", "answer"}];
- retrieval: every image against every caption (Q-Former assemblies), Recall@1/5/10 both ways, from
  the ITC scores and from the ITM re-ranked ones.

All predictions are gathered first and scored once: CIDEr-D's IDF depends on the whole set. Every image
is decoded once before the model runs (vlbridge.evaluation.readable): bad ones are one error naming them
all, or with `skip_unreadable` are left out and listed under the metrics' `left_out`. `run_*` also take
a `Screening` (what `screen_images` returns) in place of the records, for a caller that checked first.
`load_caption_groups` / `load_vqa_records` read the files; `write_results` saves both JSON files
atomically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Hashable, Sequence

from pydantic import ConfigDict, Field

from vlbridge.files.atomic import atomic_write_text
from vlbridge.data import CaptionGroup, ImageQuestion, ImageRef, ImageText, group_captions, read_coco_captions, read_vqa
from vlbridge.data.vqa import DEFAULT_IMAGE_PATTERN
from vlbridge.errors import VLBridgeError
from vlbridge.evaluation.readable import Screening, left_out_note, screen_images, shown_unreadable
from vlbridge.metrics.captions import score_captions
from vlbridge.metrics.vqa import VQAItem, check_variant, vqa_accuracy
from vlbridge.files.config_fields import PathText, StrictNumbers

TASKS = ("caption", "vqa", "retrieval")
PREDICTIONS_FILE, METRICS_FILE = "predictions.json", "metrics.json"
TOP_SHOWN = 10  # retrieval predictions keep each query's best 10
LAYOUT_MANIFEST = "manifest.json"  # a generated world's (vlbridge.world.generate.MANIFEST)
Progress = Callable[[int, int], None]


class EvalOptions(StrictNumbers):
    """How to run and score an evaluation; generation settings go to model.caption / model.answer."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    prompt: str | None = Field(None, description="caption prompt (e.g. 'a photo of'), or the VQA template with {}")
    generation: dict[str, Any] = Field(default_factory=dict, description="num_beams, max_new_tokens, ...")
    tokenizer: str = Field("auto", description="caption tokenizer: auto, java-ptb, python-ptb-approx, none")
    meteor: bool = Field(True, description="compute METEOR when pycocoevalcap and Java are present")
    vqa_normalization: str = Field("official", description="official, lavis or simple")
    k: int = Field(128, ge=1, description="retrieval: ITC shortlist re-ranked by ITM, per query")
    retrieval_captions: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1, description=(
        "retrieval: rank only these captions of each image, by position (a world's 'scene' caption: [0]); default: all"))
    scenes: PathText | None = Field(None, description=(
        "retrieval: a generated world's scenes JSON; a caption then counts as right for every image of an identical "
        "scene (vlbridge compare's rule, vlbridge.evaluation.scenes); default: its own image only, as BLIP-2 scores"))
    skip_unreadable: bool = Field(False, description=(
        "leave out images that are missing or do not decode (default: one error naming them all, before the model "
        "runs); the metrics then record the ids left out and cover the rest only"))


@dataclass
class Evaluation:
    """What a run produced: the predictions file's content and the metrics."""

    task: str
    predictions: Any
    metrics: dict[str, Any]


def options(value: EvalOptions | dict[str, Any] | None = None, **overrides: Any) -> EvalOptions:
    """EvalOptions from an instance, a dict and/or keywords; bad values are a VLBridgeError."""
    base = value.model_dump() if isinstance(value, EvalOptions) else dict(value or {})
    try:
        return EvalOptions(**{**base, **overrides})
    except Exception as exc:
        raise VLBridgeError(f"bad evaluation options: {exc}") from exc


# -- reading the evaluation sets --------------------------------------------------------------------
def load_caption_groups(data: str | Path, images: str | Path | None = None, limit: int | None = None,
                        split: str | None = None) -> list[CaptionGroup]:
    """A COCO/Flickr30k caption file (LAVIS, official COCO or Karpathy layout) as one group per image;
    `split` picks the images of Karpathy's all-splits files (dataset_coco.json: "test")."""
    groups = group_captions(read_coco_captions(data, image_root=images, split=split), f"caption file {str(data)!r}")
    return _limited(groups, limit, "images")


def load_vqa_records(data: str | Path, annotations: str | Path | None = None, images: str | Path | None = None,
                     limit: int | None = None, image_pattern: str = DEFAULT_IMAGE_PATTERN) -> list[ImageQuestion]:
    """VQAv2 questions (+ annotations), or LAVIS's list with answers inline, one record per question."""
    records = read_vqa(data, annotations, image_root=images, image_pattern=image_pattern)
    return _limited(records, limit, "questions")


def select_captions(groups: Sequence[CaptionGroup], positions: Sequence[int] | None, where: str = "") -> list[CaptionGroup]:
    """The groups with only their captions at `positions` (None: all of them); an image with none
    there is an error (`where` says whose)."""
    if positions is None:
        return list(groups)
    if not positions or len(set(positions)) != len(positions) or any(p < 0 for p in positions):
        raise VLBridgeError(f"{where}caption positions {list(positions)}: give one or more positions from 0, "
                            "each once (a repeated position would count its caption twice)")
    chosen = []
    for g in groups:
        captions = [g.captions[p] for p in positions if p < len(g.captions)]
        if not captions:
            raise VLBridgeError(f"{where}image {g.image_id!r} has {len(g.captions)} captions, none at positions {list(positions)}")
        chosen.append(dataclasses.replace(g, captions=captions))
    return chosen


def _limited(items: list, limit: int | None, what: str) -> list:
    if limit is not None and limit < 1:
        raise VLBridgeError(f"limit must be at least 1, got {limit}")
    if not items:
        raise VLBridgeError(f"the evaluation set holds no {what}")
    return items[:limit] if limit is not None else items


def _as_groups(records: Sequence[CaptionGroup] | Sequence[ImageText]) -> list[CaptionGroup]:
    if records and all(isinstance(r, ImageText) for r in records):
        return group_captions(records)
    if not all(isinstance(r, CaptionGroup) for r in records):
        raise VLBridgeError("give caption records as vlbridge.data ImageText pairs or CaptionGroups")
    if not records:
        raise VLBridgeError("no caption records to evaluate")
    return list(records)


def layout_image_pattern(data: str | Path, images: str | Path | None = None) -> str | None:
    """The VQA image file pattern a dataset's own manifest.json declares (as `vlbridge world generate`
    writes it beside its questions), looked for beside `data` and in `images`; None when there is none.
    Official VQAv2 files name no image path, so without this a generated world's images are looked
    for under COCO's names."""
    for folder in (Path(data).expanduser().parent, *([Path(images).expanduser()] if images else [])):
        manifest = folder / LAYOUT_MANIFEST
        if not manifest.is_file():
            continue
        try:
            pattern = json.loads(manifest.read_text(encoding="utf-8")).get("image_pattern")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue  # not a layout manifest (e.g. another tool's file): the default applies
        if isinstance(pattern, str) and "{image_id" in pattern:
            return pattern
    return None


def image_inputs(refs: Sequence[ImageRef]) -> list[Any]:
    """What model.caption / answer / retrieve take: paths as they are, in-memory bytes (tar members) decoded with PIL."""
    if all(ref.path is not None for ref in refs):
        return [ref.path for ref in refs]
    from vlbridge.data.transforms import open_image

    return [ref.path if ref.path is not None else open_image(ref) for ref in refs]


_image_inputs = image_inputs  # the earlier private name, which vlbridge.compare imports


def _screened(records: Screening | Sequence[Any], opts: EvalOptions, prepare: Callable[[Any], list] = list) -> Screening:
    """The `prepare`d records with every image checked (`screen_images`), unless a caller checked them already."""
    if isinstance(records, Screening):
        return dataclasses.replace(records, records=prepare(records.records))
    return screen_images(prepare(records), opts.skip_unreadable)


def _with_left_out(metrics: dict[str, Any], screening: Screening, unit: str, kept: int) -> dict[str, Any]:
    """The metrics, plus which images were left out and a note that they cover the rest only."""
    record = screening.note(unit)
    if record is not None:
        metrics["left_out"] = record
        metrics.setdefault("notes", []).append(left_out_note(screening, unit, kept))
    return metrics


def _in_batches(items: Sequence[Any], batch_size: int, run: Callable[[Sequence[Any]], list], progress: Progress | None) -> list:
    out: list = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        results = run(chunk)
        if len(results) != len(chunk):
            raise VLBridgeError(f"the model returned {len(results)} outputs for {len(chunk)} inputs; evaluation needs "
                                "exactly one per input (leave num_return_sequences at 1)")
        out.extend(results)
        if progress is not None:
            progress(len(out), len(items))
    return out


# -- captions --------------------------------------------------------------------------------------
def run_captions(model, records: Sequence[CaptionGroup] | Sequence[ImageText], opts: EvalOptions | dict | None = None,
                 progress: Progress | None = None, **overrides: Any) -> Evaluation:
    """Caption every image, then score against its references; predictions in COCO results format."""
    opts = options(opts, **overrides)
    screening = _screened(records, opts, _as_groups)
    groups = screening.records
    images = image_inputs([g.image for g in groups])
    captions = _in_batches(images, opts.batch_size, lambda chunk: model.caption(
        list(chunk), prompt=opts.prompt, batch_size=opts.batch_size, **opts.generation), progress)
    predictions = [{"image_id": g.image_id, "caption": c} for g, c in zip(groups, captions)]
    metrics = score_caption_predictions(predictions, groups, tokenizer=opts.tokenizer, meteor=opts.meteor)
    return Evaluation("caption", predictions, _with_left_out(metrics, screening, "images", len(groups)))


def score_caption_predictions(predictions: Sequence[dict], groups: Sequence[CaptionGroup], *, tokenizer: str = "auto",
                              meteor: bool = True) -> dict[str, Any]:
    """Caption metrics of COCO-format predictions against the groups' references."""
    by_id: dict[Hashable, str] = {}
    for p in predictions:
        if p["image_id"] in by_id:
            raise VLBridgeError(f"two predictions for image_id {p['image_id']!r}; give one caption per image")
        by_id[p["image_id"]] = p["caption"]
    references = {g.image_id: list(g.captions) for g in groups}
    return {"task": "caption", **score_captions(by_id, references, tokenizer=tokenizer, meteor=meteor)}


def evaluate_captions(model, records, opts: EvalOptions | dict | None = None, **overrides: Any) -> dict[str, Any]:
    """The caption metrics dict (see `run_captions`)."""
    return run_captions(model, records, opts, **overrides).metrics


# -- VQA -------------------------------------------------------------------------------------------
def run_vqa(model, records: Sequence[ImageQuestion], opts: EvalOptions | dict | None = None,
            progress: Progress | None = None, **overrides: Any) -> Evaluation:
    """Answer every question, then VQAv2 accuracy; predictions in VQA results format."""
    opts = options(opts, **overrides)
    check_variant(opts.vqa_normalization)
    if not records:
        raise VLBridgeError("no VQA questions to evaluate")
    screening = _screened(records, opts)
    records = screening.records
    prompt = {"prompt": opts.prompt} if opts.prompt is not None else {}
    pairs = list(zip(image_inputs([r.image for r in records]), [r.question for r in records]))
    answers = _in_batches(pairs, opts.batch_size, lambda chunk: model.answer(
        [p[0] for p in chunk], [p[1] for p in chunk], batch_size=opts.batch_size, **prompt, **opts.generation), progress)
    predictions = [{"question_id": r.question_id, "answer": a} for r, a in zip(records, answers)]
    metrics = score_vqa_predictions(predictions, records, opts.vqa_normalization)
    return Evaluation("vqa", predictions, _with_left_out(metrics, screening, "questions", len(records)))


def score_vqa_predictions(predictions: Sequence[dict], records: Sequence[ImageQuestion], variant: str = "official") -> dict[str, Any]:
    """VQA accuracy of results-format predictions; without human answers (a test split), counts only."""
    answered = [r for r in records if r.answers]
    if not answered:
        return {"task": "vqa", "overall": None, "num_questions": len(records), "normalization": variant,
                "notes": ["no human answers in the data (a test split?): predictions only"]}
    if len(answered) != len(records):
        raise VLBridgeError(f"{len(records) - len(answered)} of {len(records)} questions have no human answers; "
                            "score a split whose questions all have answers")
    by_id = {p["question_id"]: p["answer"] for p in predictions}
    missing = [r.question_id for r in records if r.question_id not in by_id]
    if missing or len(by_id) != len(predictions):
        raise VLBridgeError(f"predictions must hold one answer per question: {len(missing)} missing (e.g. {missing[:3]}), "
                            f"{len(predictions) - len(by_id)} duplicated")
    items = [VQAItem(r.question_id, by_id[r.question_id], r.answers, r.answer_type, r.question_type) for r in records]
    return {"task": "vqa", **vqa_accuracy(items, variant)}


def evaluate_vqa(model, records, opts: EvalOptions | dict | None = None, **overrides: Any) -> dict[str, Any]:
    """The VQA metrics dict (see `run_vqa`)."""
    return run_vqa(model, records, opts, **overrides).metrics


# -- retrieval -------------------------------------------------------------------------------------
def retrieval_targets(records: Sequence[CaptionGroup] | Sequence[ImageText], opts: EvalOptions) -> tuple[list[CaptionGroup], list[Hashable] | None]:
    """The groups with the captions retrieval ranks (`retrieval_captions`) and, with `scenes`, each
    image's scene key (identical scenes share one); cheap, so callers check their files with it before
    the model loads."""
    from vlbridge.evaluation.scenes import scene_keys

    groups = select_captions(_as_groups(records), opts.retrieval_captions, where="retrieval_captions: ")
    return groups, scene_keys(groups, opts.scenes) if opts.scenes else None


TOO_FEW_TO_RETRIEVE = "retrieval among fewer than 2 images always finds the right one"


def check_retrievable(screening: Screening) -> None:
    """Refuse to retrieve among fewer than 2 images, which scores 100% whatever the model; said with how
    many images `skip_unreadable` left out, when it left out the rest."""
    kept = len(screening.records)
    if kept >= 2:
        return
    if not screening.left_out:
        raise VLBridgeError(f"{TOO_FEW_TO_RETRIEVE}: the set holds {kept}; give 2 or more")
    raise VLBridgeError(f"{TOO_FEW_TO_RETRIEVE}: {kept} image(s) left after --skip-unreadable (skip_unreadable) left out {len(screening.left_out)} "
                        f"unreadable one(s):\n  {shown_unreadable(screening.left_out)}\nReplace them, or evaluate a set "
                        "with 2 or more readable images")


def run_retrieval(model, records: Sequence[CaptionGroup] | Sequence[ImageText], opts: EvalOptions | dict | None = None,
                  progress: Progress | None = None, **overrides: Any) -> Evaluation:
    """Score every image against every caption (ITC, then ITM re-ranking of the top k) and report R@K
    for both score sets; predictions hold each query's rank and best 10. With `scenes`, a caption
    is right for every image of an identical scene, as `vlbridge compare` scores a world's retrieval."""
    from vlbridge.data import flatten_groups
    from vlbridge.evaluation.scenes import SCENE_RULE
    from vlbridge.metrics.retrieval import retrieval_recall

    opts = options(opts, **overrides)
    screening = _screened(records, opts, _as_groups)
    check_retrievable(screening)
    groups, keys = retrieval_targets(screening.records, opts)
    flat = flatten_groups(groups)
    result = model.retrieve(image_inputs([g.image for g in groups]), flat.texts, k=opts.k, batch_size=opts.batch_size)
    if progress is not None:
        progress(len(groups), len(groups))
    itc = retrieval_recall(result.itc, flat.img2txt, flat.txt2img, with_ranks=True, image_keys=keys)
    itm = retrieval_recall(result.i2t, flat.img2txt, flat.txt2img, t2i=result.t2i, tiebreak=result.itc, with_ranks=True,
                           image_keys=keys)
    predictions = _retrieval_predictions(groups, flat, result, itc, itm)
    metrics = {"task": "retrieval", "itc": _public(itc), "itm": _public(itm), "k": opts.k,
               "num_images": len(groups), "num_texts": len(flat.texts),
               "notes": ["percent; i2t = image->text (LAVIS txt_r), t2i = text->image (LAVIS img_r); "
                         "itm = ITM + ITC on each query's ITC top k, as BLIP-2 reports"]}
    if keys is not None:
        metrics.update(rule=SCENE_RULE, distinct_scenes=len(set(keys)))
        metrics["notes"].append(f"{opts.scenes}: {SCENE_RULE}")
    return Evaluation("retrieval", predictions, _with_left_out(metrics, screening, "images", len(groups)))


def _public(recall: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recall.items() if not k.endswith("_ranks")}


def _retrieval_predictions(groups, flat, result, itc: dict, itm: dict) -> dict[str, list[dict]]:
    image_rows = [{"image_id": g.image_id, "texts": flat.img2txt[i], "rank": itm["i2t_ranks"][i], "rank_itc": itc["i2t_ranks"][i],
                   "top": result.texts_for_image(i, TOP_SHOWN)} for i, g in enumerate(groups)]
    text_rows = [{"text": t, "text_index": j, "image_id": groups[flat.txt2img[j]].image_id, "rank": itm["t2i_ranks"][j],
                  "rank_itc": itc["t2i_ranks"][j], "top": [groups[i].image_id for i in result.images_for_text(j, TOP_SHOWN)]}
                 for j, t in enumerate(flat.texts)]
    return {"image_to_text": image_rows, "text_to_image": text_rows}


def evaluate_retrieval(model, records, opts: EvalOptions | dict | None = None, **overrides: Any) -> dict[str, Any]:
    """The retrieval metrics dict (see `run_retrieval`)."""
    return run_retrieval(model, records, opts, **overrides).metrics


# -- saving ----------------------------------------------------------------------------------------
def write_results(out_dir: str | Path, evaluation: Evaluation, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """predictions.json and metrics.json (the metrics plus `extra`, e.g. the run's settings), each atomically."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise VLBridgeError(f"output {str(out)!r} exists and is not a directory")
    metrics = {**evaluation.metrics, **(extra or {})}
    predictions = atomic_write_text(out / PREDICTIONS_FILE, json.dumps(evaluation.predictions, indent=1, default=str) + "\n")
    metrics_path = atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2, default=str) + "\n")
    return predictions, metrics_path
