"""Reference rows for a comparison table: what a model that never looks at the image would score.

VQA: the "per Q-type prior" of the VQA paper (Antol et al., 2015): answer every question with the
most common training answer of its question type ("how many" -> "2"). Captioning: the commonest
training caption for every image. Retrieval: the expected R@1 of a random ranking. A trained bridge is only worth its table row if it clearly beats these.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from vlbridge.compare.config import EvalSet
from vlbridge.data.jsonio import require_list
from vlbridge.files.userfiles import read_json


def question_type_prior(train_annotations: str | Path) -> dict[str, str]:
    """question_type -> its most common answer in a VQAv2-style annotations file."""
    counts: dict[str, Counter] = defaultdict(Counter)
    data = read_json(train_annotations, "VQA annotations file", top=dict)
    for annotation in require_list(data, "annotations", train_annotations, "VQA annotations file"):
        counts[annotation.get("question_type") or ""][annotation["multiple_choice_answer"]] += 1
    return {qtype: counter.most_common(1)[0][0] for qtype, counter in counts.items()}


def prior_vqa(prior: dict[str, str], spec: EvalSet) -> dict[str, Any]:
    """VQA metrics (official accuracy, per-question items) of answering with the prior on an evaluation split."""
    from vlbridge.compare.evaluation import question_categories, vqa_records, vqa_scores

    records = vqa_records(spec)
    fallback = Counter(prior.values()).most_common(1)[0][0]
    predictions = [{"question_id": r.question_id, "answer": prior.get(r.question_type or "", fallback)} for r in records]
    return vqa_scores(predictions, records, question_categories(spec.annotations))


def chance_retrieval(spec: EvalSet) -> dict[str, Any]:
    """Expected R@1 (percent) of a random ranking, with a caption of an identical scene counted right.

    It is an exact expectation, not a sample, so it has no interval and no per-query items: a paired
    bootstrap against a model's 0/1 hits would call a model with no hit among few queries
    "significantly below chance" when a random ranker misses them all as often."""
    from vlbridge.compare.evaluation import retrieval_groups
    from vlbridge.evaluation.scenes import SCENE_RULE, scene_keys

    groups = retrieval_groups(spec)
    keys = scene_keys(groups, spec.scenes)
    captions = [len(g.captions) for g in groups]
    per_key_images, per_key_texts = Counter(keys), Counter()
    for key, count in zip(keys, captions):
        per_key_texts[key] += count
    texts, images = sum(captions), len(groups)
    i2t = sum(per_key_texts[k] / texts for k in keys) / images
    t2i = sum(per_key_images[k] / images * c for k, c in zip(keys, captions)) / texts
    recall = {"i2t_r1": 100 * i2t, "t2i_r1": 100 * t2i}
    return {"itm": dict(recall), "itc": dict(recall), "rule": SCENE_RULE, "num_images": images, "num_texts": texts,
            "distinct_scenes": len(per_key_images)}


def commonest_caption(train_captions: str | Path) -> str:
    """The caption written most often in a LAVIS/Karpathy-style caption file."""
    counts: Counter = Counter()
    for record in read_json(train_captions, "caption file", top=list):
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        counts.update(captions)
    return counts.most_common(1)[0][0]


def prior_captions(caption: str, spec: EvalSet) -> dict[str, Any]:
    """Caption metrics (per-image items) of giving every image of a split the same caption."""
    from vlbridge.compare.evaluation import caption_scores
    from vlbridge.evaluation.tasks import load_caption_groups

    groups = load_caption_groups(spec.captions, spec.images, spec.limit)
    return caption_scores([{"image_id": g.image_id, "caption": caption} for g in groups], groups)


def blind_row(train_annotations: str | Path, evals: list[EvalSet], train_captions: str | Path | None = None) -> dict[str, Any]:
    """One result in the shape of a trained run's, holding only what a blind model can score."""
    prior = question_type_prior(train_annotations)
    caption = commonest_caption(train_captions) if train_captions else None
    out: dict[str, Any] = {}
    for spec in evals:
        out[spec.name] = {}
        if caption is not None and spec.captions and "caption" in spec.tasks:
            out[spec.name]["caption"] = prior_captions(caption, spec)
        if spec.questions and "vqa" in spec.tasks:
            out[spec.name]["vqa"] = prior_vqa(prior, spec)
        if spec.captions and "retrieval" in spec.tasks:
            out[spec.name]["retrieval"] = chance_retrieval(spec)
    return {"seed": None, "eval": out}
