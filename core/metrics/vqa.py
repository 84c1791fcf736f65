"""VQAv2 accuracy (Antol et al. 2015; the official GT-Vision-Lab/VQA evaluation), per question:

    acc = mean over j of min(1, #{k != j : gt_k == prediction} / 3)

i.e. the average over the 10 leave-one-out subsets of 9 human answers of min(#matches / 3, 1).
Overall and per-type accuracies are 100 x the mean over questions, rounded to 2 decimals as the
official tool prints them.

Which strings are compared depends on the normalisation variant (they give different numbers), so
every result names its variant:

- ``official``: the current official code (a013f00, 2021): when the human answers are not all the same,
  the answers and the prediction get punctuation and digit/article normalisation; when all agree,
  raw strings are compared ("Yes" against ten "yes" scores 0).
- ``lavis``: the official code before 2021 (a4f1afd), which LAVIS and BLIP-2 used: the prediction is
  always fully normalised; human answers only get punctuation handling, and only when not all the same.
- ``simple``: lower-case, strip and collapse whitespace on both sides, always.
Tabs and newlines become spaces and ends are stripped first (for human answers in ``official`` only).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

from vlbridge.errors import VLBridgeError
from vlbridge.metrics.vqa_normalize import clean_whitespace, normalize_official, normalize_simple, process_punctuation

VARIANTS = {
    "official": "official VQA evaluation, current (GT-Vision-Lab/VQA a013f00, 2021): normalise both sides unless all human answers agree",
    "lavis": "official VQA evaluation before 2021 (a4f1afd), as LAVIS/BLIP-2: prediction always normalised, answers punctuation-only",
    "simple": "lower-case, strip and collapse whitespace on both sides",
}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise VLBridgeError(f"unknown VQA answer normalisation {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def normalize_pair(prediction: str, answers: Sequence[str], variant: str = "official") -> tuple[str, list[str]]:
    """The prediction and human answers exactly as the chosen variant compares them."""
    check_variant(variant)
    prediction = clean_whitespace(prediction)
    if variant == "simple":
        return normalize_simple(prediction), [normalize_simple(a) for a in answers]
    disagree = len(set(answers if variant == "lavis" else map(clean_whitespace, answers))) > 1
    if variant == "lavis":
        return normalize_official(prediction), [process_punctuation(a) if disagree else a for a in answers]
    answers = [clean_whitespace(a) for a in answers]
    if not disagree:
        return prediction, answers
    return normalize_official(prediction), [normalize_official(a) for a in answers]


def question_accuracy(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """Accuracy of one prediction against its human answers, in [0, 1]."""
    if not answers:
        raise VLBridgeError("VQA accuracy needs at least one human answer per question")
    prediction, answers = normalize_pair(prediction, answers, variant)
    matches = sum(1 for a in answers if a == prediction)
    # leaving out answer j removes one match exactly when answer j itself matches
    per_subset = [min(1.0, (matches - (a == prediction)) / 3) for a in answers]
    return sum(per_subset) / len(per_subset)


@dataclass(frozen=True)
class VQAItem:
    """One scored question: what the evaluation needs from a record and a prediction."""

    question_id: Hashable
    prediction: str
    answers: Sequence[str]
    answer_type: str | None = None
    question_type: str | None = None


def _percent(values: list[float]) -> float:
    return round(100.0 * sum(values) / len(values), 2)


def vqa_accuracy(items: Sequence[VQAItem], variant: str = "official", per_question: bool = False) -> dict:
    """Overall, per-answer-type and per-question-type accuracy (percent); with `per_question`, also
    each question's accuracy in [0, 1] under "per_question"."""
    check_variant(variant)
    if not items:
        raise VLBridgeError("VQA accuracy: no questions to score")
    scores: dict[Hashable, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for item in items:
        if item.question_id in scores:
            raise VLBridgeError(f"VQA accuracy: question_id {item.question_id!r} appears twice")
        acc = question_accuracy(item.prediction, item.answers, variant)
        scores[item.question_id] = acc
        if item.answer_type is not None:
            by_answer_type[item.answer_type].append(acc)
        if item.question_type is not None:
            by_question_type[item.question_type].append(acc)
    result = {
        "overall": _percent(list(scores.values())),
        "per_answer_type": {k: _percent(v) for k, v in sorted(by_answer_type.items())},
        "per_question_type": {k: _percent(v) for k, v in sorted(by_question_type.items())},
        "normalization": variant,
        "normalization_rule": VARIANTS[variant],
        "num_questions": len(items),
    }
    if per_question:
        result["per_question"] = scores
    return result


def items_from_mappings(predictions: Mapping[Hashable, str], annotations: Mapping[Hashable, Mapping]) -> list[VQAItem]:
    """Join {question_id: answer} with {question_id: {"answers", "answer_type"?, "question_type"?}}."""
    missing = [q for q in annotations if q not in predictions]
    extra = [q for q in predictions if q not in annotations]
    if missing or extra:
        raise VLBridgeError(f"VQA accuracy: predictions and annotations must cover the same questions; "
                            f"{len(missing)} without a prediction (e.g. {missing[:3]}), {len(extra)} without annotations (e.g. {extra[:3]})")
    return [VQAItem(q, predictions[q], list(a["answers"]), a.get("answer_type"), a.get("question_type")) for q, a in annotations.items()]
