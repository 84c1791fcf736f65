"""Evaluating one trained model on one EvalSet: captions, VQA and (Q-Former) retrieval, each with
its per-item scores, which the report's confidence intervals and significance tests resample.

Per-item scores (columns of equal length under "items"):
- VQA: each question's VQAv2 accuracy in [0, 1], with its image, question type and category;
- captions: each image's CIDEr-D; the split's CIDEr-D is their mean (the document frequencies come
  from the whole split, so an item's score depends on the others' references, not on their captions);
- retrieval: hit@1 (1 or 0) of each image query (i2t) and each text query (t2i), by ITC and by ITM.

Retrieval on the world counts a retrieved caption as right when it is true of the query image:
written for it, or for an image of an identical scene (the same objects with the same sizes,
colours, shapes and grid cells; only the jitter inside a cell differs, which no caption states).
With `retrieval_captions: [0]` only the "scene" caption of each image is retrieved; it states every
object with its size, colour, shape and cell, so it is true of exactly those images and the rule
is exact. Other caption kinds can be true of other scenes too, which the rule does not credit.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from vlbridge.compare.config import CompareConfig, EvalSet
from vlbridge.errors import VLBridgeError
from vlbridge.evaluation.scenes import SCENE_RULE, scene_keys
from vlbridge.files.userfiles import read_json
from vlbridge.modeling.prompts import template_problem

Say = Callable[[str], None]


class EncodedImages:
    """Frozen-encoder outputs of evaluation images, computed once and shared by every question about
    an image and by every run with the same encoder (it is frozen: its outputs do not depend on the run)."""

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size
        self.store: dict[str, Any] = {}

    def __call__(self, model, refs: Sequence) -> Any:
        """(len(refs), T, W) encoder outputs on the CPU, in the order of `refs`."""
        import torch

        from vlbridge.evaluation.tasks import image_inputs

        names = [ref.path or ref.name for ref in refs]
        todo = {name: ref for name, ref in zip(names, refs) if name not in self.store}
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            embeds = model.encode_images(model.pixel_values(image_inputs([ref for _, ref in chunk]))).cpu()
            self.store.update({name: embeds[i] for i, (name, _) in enumerate(chunk)})
        return torch.stack([self.store[name] for name in names])


def _generate(model, encoded: EncodedImages, refs: Sequence, prompts: list[str], options, batch_size: int = 16, chunk: int = 256) -> list[str]:
    """One generation per (image, prompt), from cached encoder outputs, a chunk of embeddings at a time."""
    from vlbridge.modeling.inference import generate_batched

    out: list[str] = []
    for start in range(0, len(prompts), chunk):
        embeds = encoded(model, refs[start:start + chunk])
        out += generate_batched(model, None, prompts[start:start + chunk], options, batch_size, image_embeds=embeds)
    return out


def evaluate_set(config: CompareConfig, model, spec: EvalSet, say: Say, encoded: EncodedImages | None = None) -> dict[str, Any]:
    """Captioning, VQA and lmms-eval tasks ("lmms:<task>") with the trained (stage-2) model (retrieval
    is the stage-1 model's: see `retrieval_set`). `encoded` holds encoder outputs other runs computed already."""
    from vlbridge.evaluation import tasks as ev
    from vlbridge.evaluation.readable import check_images
    from vlbridge.modeling.inference import answer_options, caption_options

    encoded = encoded if encoded is not None else EncodedImages()
    out: dict[str, Any] = {}
    if spec.captions and "caption" in spec.tasks:
        say(f"  {spec.name}: captioning")
        groups = ev.load_caption_groups(spec.captions, spec.images, spec.limit)
        refs = [g.image for g in groups]
        check_images(refs)
        captions = _generate(model, encoded, refs, [config.caption_prompt] * len(refs), caption_options(dict(config.generation)))
        out["caption"] = caption_scores([{"image_id": g.image_id, "caption": c} for g, c in zip(groups, captions)], groups)
    if spec.questions and "vqa" in spec.tasks:
        say(f"  {spec.name}: VQA")
        records = vqa_records(spec)
        refs = [r.image for r in records]
        check_images(refs)
        problem = template_problem(config.vqa_prompt, "vqa_prompt")
        if problem:
            raise VLBridgeError(problem)
        options = answer_options(model, {**config.generation, "max_new_tokens": config.vqa_max_new_tokens})
        answers = _generate(model, encoded, refs, [config.vqa_prompt.format(r.question) for r in records], options)
        predictions = [{"question_id": r.question_id, "answer": a} for r, a in zip(records, answers)]
        out["vqa"] = vqa_scores(predictions, records, question_categories(spec.annotations))
    if spec.lmms_eval is not None:
        from vlbridge.lmms.tasks import score_tasks

        say(f"  {spec.name}: lmms-eval tasks")
        out.update(score_tasks(model, spec.lmms_eval, say))
    return out


def retrieval_set(model, spec: EvalSet, say: Say) -> dict[str, Any]:
    """Retrieval with a stage-1 model (BLIP-2's retrieval model: ITC/ITM heads and the text side)."""
    say(f"  {spec.name}: retrieval (stage-1 model)")
    return scene_retrieval(model, retrieval_groups(spec), spec.scenes, k=spec.retrieval_k)


# -- reading -----------------------------------------------------------------------------------------
def vqa_records(spec: EvalSet) -> list:
    from vlbridge.evaluation.tasks import load_vqa_records

    pattern = {"image_pattern": spec.image_pattern} if spec.image_pattern else {}
    return load_vqa_records(spec.questions, spec.annotations, spec.images, spec.limit, **pattern)


def scored_records(spec: EvalSet, retrieval: bool) -> list:
    """The records of every image the split's tasks read, as `evaluate_set` and (when `retrieval`: some
    run has a stage 1 to retrieve with) `retrieval_set` read them; the preflight checks their images."""
    from vlbridge.evaluation.tasks import load_caption_groups

    records = load_caption_groups(spec.captions, spec.images, spec.limit) if spec.captions and "caption" in spec.tasks else []
    records += vqa_records(spec) if spec.questions and "vqa" in spec.tasks else []
    return records + (retrieval_groups(spec) if retrieval and spec.captions and "retrieval" in spec.tasks else [])


def question_categories(annotations: str | None) -> dict[Any, str]:
    """question_id -> the annotation's "category" (the world's question kind), where it has one."""
    if not annotations:
        return {}
    data = read_json(annotations, "VQA annotations file", top=dict)
    return {a["question_id"]: a["category"] for a in data.get("annotations", []) if isinstance(a, dict) and "category" in a}


def retrieval_groups(spec: EvalSet) -> list:
    """The split's images with the captions retrieval uses (all, or those at `retrieval_captions`)."""
    from vlbridge.evaluation.tasks import load_caption_groups, select_captions

    groups = load_caption_groups(spec.captions, spec.images, spec.retrieval_limit or spec.limit)
    return select_captions(groups, spec.retrieval_captions, where=f"{spec.name}: ")


# -- scoring with per-item columns ------------------------------------------------------------------
def caption_scores(predictions: Sequence[dict], groups: Sequence) -> dict[str, Any]:
    """Caption metrics (METEOR off: needs Java) and each image's CIDEr-D under "items"."""
    from vlbridge.metrics.captions import score_captions

    by_id = {p["image_id"]: p["caption"] for p in predictions}
    metrics = score_captions(by_id, {g.image_id: list(g.captions) for g in groups}, meteor=False, per_image=True)
    per_image = metrics.pop("per_image")
    ids = list(per_image)
    metrics["items"] = {"image_id": ids, "CIDEr": [per_image[i]["CIDEr"] for i in ids], "caption": [by_id[i] for i in ids]}
    return {"task": "caption", **metrics}


def vqa_scores(predictions: Sequence[dict], records: Sequence, categories: dict[Any, str]) -> dict[str, Any]:
    """VQAv2 accuracy (official normalisation) and each question's accuracy under "items"."""
    from vlbridge.metrics.vqa import VQAItem, vqa_accuracy

    answers = {p["question_id"]: p["answer"] for p in predictions}
    missing = [r.question_id for r in records if r.question_id not in answers]
    if missing:
        raise VLBridgeError(f"no answer for {len(missing)} questions (e.g. {missing[:3]})")
    items = [VQAItem(r.question_id, answers[r.question_id], r.answers, r.answer_type, r.question_type) for r in records]
    metrics = vqa_accuracy(items, "official", per_question=True)
    accuracy = metrics.pop("per_question")
    metrics["items"] = {
        "question_id": [r.question_id for r in records], "image_id": [r.image_id for r in records],
        "question_type": [r.question_type for r in records], "category": [categories.get(r.question_id) for r in records],
        "answer": [answers[r.question_id] for r in records], "accuracy": [accuracy[r.question_id] for r in records],
    }
    return {"task": "vqa", **metrics}


def text_keys(groups: list) -> list[str]:
    """"image_id:j" of every retrieved text (its j-th retrieved caption), in flatten_groups order."""
    return [f"{g.image_id}:{j}" for g in groups for j in range(len(g.captions))]


def scene_retrieval(model, groups: list, scenes_file: str | None, k: int = 16) -> dict[str, Any]:
    """Recall@1/5/10 both ways from ITC and from ITM re-ranking, with scene-level correctness, and
    each query's hit@1 under "items"."""
    from vlbridge.data import flatten_groups
    from vlbridge.evaluation.tasks import image_inputs

    result = model.retrieve(image_inputs([g.image for g in groups]), flatten_groups(groups).texts, k=k)
    return score_retrieval(groups, scenes_file, {"itc": (result.itc, result.itc.t()), "itm": (result.i2t, result.t2i, result.itc)})


def score_retrieval(groups: list, scenes_file: str | None, heads: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """`scene_retrieval`'s scores from similarity matrices: per head ("itc", "itm"), (images x texts,
    texts x images) in `flatten_groups` order, and for a re-ranked head a third, images x texts matrix
    that orders what it ties (ITC: the -100 pairs outside the ITM shortlist); a model with one head
    (a CLIP model: ITC) gives one."""
    from vlbridge.data import flatten_groups
    from vlbridge.metrics.retrieval import query_ranks, recall_at_k, right_items

    flat = flatten_groups(groups)
    keys = scene_keys(groups, scenes_file)
    image_pos, text_pos = right_items(flat.img2txt, flat.txt2img, keys)
    out: dict[str, Any] = {"num_images": len(groups), "num_texts": len(flat.texts), "distinct_scenes": len(set(keys)),
                           "rule": SCENE_RULE, "notes": [f"percent; {SCENE_RULE}"]}
    i2t_items: dict[str, list] = {"image_id": [g.image_id for g in groups]}
    t2i_items: dict[str, list] = {"text_key": text_keys(groups), "image_id": [groups[i].image_id for i in flat.txt2img]}
    for name, (i2t, t2i, *rest) in heads.items():
        tiebreak = rest[0].float().cpu().numpy() if rest else None
        i2t_ranks = query_ranks(i2t.float().cpu().numpy(), image_pos, tiebreak)
        t2i_ranks = query_ranks(t2i.float().cpu().numpy(), text_pos, None if tiebreak is None else tiebreak.T)
        i2t_r, t2i_r = recall_at_k(i2t_ranks), recall_at_k(t2i_ranks)
        out[name] = {**{f"i2t_r{k_}": v for k_, v in i2t_r.items()}, **{f"t2i_r{k_}": v for k_, v in t2i_r.items()}}
        i2t_items[f"{name}_hit1"] = [int(r == 0) for r in i2t_ranks]
        t2i_items[f"{name}_hit1"] = [int(r == 0) for r in t2i_ranks]
    out["items"] = {"i2t": i2t_items, "t2i": t2i_items}
    return out
