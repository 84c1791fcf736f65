"""Reference rows for a comparison table: what a model that never looks at the image would score.

VQA: the "per Q-type prior" of the VQA paper (Antol et al., 2015): answer every question with the
most common training answer of its question type ("how many" -> "2"). Captioning: the commonest
training caption for every image. Retrieval: the expected R@1 of a random ranking. A trained bridge is only worth its table row if it clearly beats these.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from vlbridge.compare.config import EvalSet


def question_type_prior(train_annotations: str | Path) -> dict[str, str]:
    """question_type -> its most common answer in a VQAv2-style annotations file."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for annotation in json.loads(Path(train_annotations).read_text(encoding="utf-8"))["annotations"]:
        counts[annotation.get("question_type") or ""][annotation["multiple_choice_answer"]] += 1
    return {qtype: counter.most_common(1)[0][0] for qtype, counter in counts.items()}


def prior_vqa(prior: dict[str, str], spec: EvalSet) -> dict[str, Any]:
    """VQA metrics (official accuracy) of answering with the prior on an evaluation split."""
    from vlbridge.evaluate import load_vqa_records, score_vqa_predictions

    pattern = {"image_pattern": spec.image_pattern} if spec.image_pattern else {}
    records = load_vqa_records(spec.questions, spec.annotations, spec.images, spec.limit, **pattern)
    fallback = Counter(prior.values()).most_common(1)[0][0]
    predictions = [{"question_id": r.question_id, "answer": prior.get(r.question_type or "", fallback)} for r in records]
    return score_vqa_predictions(predictions, records)


def chance_retrieval(spec: EvalSet) -> dict[str, Any]:
    """Expected R@1 (percent) of a random ranking, with a caption of an identical scene counted right."""
    from vlbridge.compare.evaluation import scene_keys
    from vlbridge.evaluate import load_caption_groups

    groups = load_caption_groups(spec.captions, spec.images, spec.retrieval_limit or spec.limit)
    keys = scene_keys(groups, spec.scenes)
    captions = [len(g.captions) for g in groups]
    per_key_images, per_key_texts = Counter(keys), Counter()
    for key, count in zip(keys, captions):
        per_key_texts[key] += count
    texts, images = sum(captions), len(groups)
    i2t = sum(per_key_texts[k] / texts for k in keys) / images
    t2i = sum(per_key_images[k] / images * c for k, c in zip(keys, captions)) / texts
    return {"itm": {"i2t_r1": 100 * i2t, "t2i_r1": 100 * t2i}, "itc": {"i2t_r1": 100 * i2t, "t2i_r1": 100 * t2i}}


def commonest_caption(train_captions: str | Path) -> str:
    """The caption written most often in a LAVIS/Karpathy-style caption file."""
    counts: Counter = Counter()
    for record in json.loads(Path(train_captions).read_text(encoding="utf-8")):
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        counts.update(captions)
    return counts.most_common(1)[0][0]


def prior_captions(caption: str, spec: EvalSet) -> dict[str, Any]:
    """Caption metrics of giving every image of a split the same caption (METEOR off: needs Java)."""
    from vlbridge.evaluate import load_caption_groups, score_caption_predictions

    groups = load_caption_groups(spec.captions, spec.images, spec.limit)
    return score_caption_predictions([{"image_id": g.image_id, "caption": caption} for g in groups], groups, meteor=False)


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
