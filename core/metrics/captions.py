"""All caption metrics in one call, the way the COCO caption evaluation runs them: tokenise the
candidates and the references with the same tokenizer, then BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
on the tokenised text. SPICE is not offered: it needs a CoreNLP download (no offline use).

Scores are on the reference code's scale (BLEU/METEOR/ROUGE-L in [0, 1], CIDEr-D in [0, 10]);
papers print them x100. CIDEr-D's IDF comes from the images scored together: score a whole split
at once, never in pieces.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

from vlbridge.errors import VLBridgeError
from vlbridge.metrics.bleu import bleu
from vlbridge.metrics.cider import cider_d
from vlbridge.metrics.meteor import meteor as meteor_score
from vlbridge.metrics.rouge import rouge_l
from vlbridge.metrics.tokenize import tokenize_captions

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SCALE_NOTE = "BLEU, METEOR, ROUGE_L in [0, 1] and CIDEr (CIDEr-D) in [0, 10], as pycocoevalcap reports them; papers print x100"


def check_ids(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    """Exactly one prediction for every image with references, and none for other images."""
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise VLBridgeError(f"caption metrics need one prediction per image with references: {len(missing)} images lack "
                            f"a prediction (e.g. {missing[:3]}), {len(extra)} predictions have no references (e.g. {extra[:3]})")
    if not references:
        raise VLBridgeError("caption metrics: no images to score")


def score_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                   tokenizer: str = "auto", meteor: bool = True, per_image: bool = False) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of {image id: caption} against {image id: [references]}.

    :param tokenizer: "auto" (Java PTB when available, else the Python approximation), "java-ptb",
        "python-ptb-approx" or "none" (already tokenised). The one used is named in the result.
    :param meteor: try METEOR (needs pycocoevalcap and Java; ~7 s). When it cannot run, METEOR is
        None and "notes" says why.
    :param per_image: also return {"per_image": {id: {"Bleu_4", "ROUGE_L", "CIDEr", ...}}}.
    """
    check_ids(predictions, references)
    ids = list(references)
    for key in ids:
        if isinstance(references[key], str) or not references[key]:
            raise VLBridgeError(f"image {key!r}: references must be a non-empty list of strings")
    tokenised_refs, used = tokenize_captions({k: list(references[k]) for k in ids}, tokenizer)
    tokenised_preds, _ = tokenize_captions({k: [predictions[k]] for k in ids}, used)
    candidates = [tokenised_preds[k][0] for k in ids]
    refs = [tokenised_refs[k] for k in ids]
    bleus, bleu_each = bleu(candidates, refs)
    rouge, rouge_each = rouge_l(candidates, refs)
    cider, cider_each = cider_d(candidates, refs)
    result: dict[str, Any] = {f"Bleu_{n + 1}": bleus[n] for n in range(4)}
    notes: list[str] = []
    result["METEOR"] = None
    if meteor:
        result["METEOR"], reason = meteor_score(candidates, refs)
        notes += [reason] if reason else []
    else:
        notes.append("METEOR not requested")
    result.update({"ROUGE_L": rouge, "CIDEr": cider, "num_images": len(ids), "tokenizer": used, "scale": SCALE_NOTE, "notes": notes})
    if per_image:
        result["per_image"] = {k: {**{f"Bleu_{n + 1}": bleu_each[i][n] for n in range(4)}, "ROUGE_L": rouge_each[i],
                                   "CIDEr": cider_each[i]} for i, k in enumerate(ids)}
    return result
