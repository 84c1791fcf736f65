"""The "CLIP-style encoder alone" reference row: the frozen world encoder's own zero-shot retrieval.

BLIP-2 claims that its Q-Former retrieves better than the CLIP-style model whose vision tower it
reads. The world encoder's CLIP head was not shipped, so it retrieves here through a head trained
LiT-style on the frozen, shipped vision tower (`vlbridge.world.clip_head`); it ranks exactly the
images and captions the Q-Former rows rank (`retrieval_groups`), by cosine similarity of [CLS] and
caption embeddings (ITC: a CLIP model has no ITM), scored by the same scene-level rule with per-query
hits, so the report gives it intervals and pairs it with the Q-Former rows image by image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlbridge.compare.config import EvalSet

ENCODER_ALONE = "CLIP-style encoder alone"  # the row's name in the demo's tables
IMAGE_CHUNK = 100


def encoder_alone_row(evals: list[EvalSet], root: str | Path | None = None) -> dict[str, Any]:
    """One result in the shape of a trained run's, holding retrieval on each split that scores it;
    `root` is the world parts folder (default: the shipped one)."""
    from vlbridge.world.clip_head import load_clip_head

    model, vocab = load_clip_head(root)
    out: dict[str, Any] = {}
    for spec in evals:
        out[spec.name] = {}
        if spec.captions and "retrieval" in spec.tasks:
            out[spec.name]["retrieval"] = encoder_retrieval(model, vocab, spec)
    return {"seed": None, "eval": out}


def encoder_retrieval(model, vocab, spec: EvalSet) -> dict[str, Any]:
    """R@1/5/10 both ways by the CLIP head's cosine similarity, with the Q-Former rows' scene rule
    and per-query hits (under "itc")."""
    import torch

    from vlbridge.compare.evaluation import retrieval_groups, score_retrieval
    from vlbridge.data import flatten_groups
    from vlbridge.evaluation.readable import check_images
    from vlbridge.evaluation.tasks import image_inputs
    from vlbridge.parts.images import to_pixel_batch

    groups = retrieval_groups(spec)
    check_images([g.image for g in groups])
    images = image_inputs([g.image for g in groups])
    texts = flatten_groups(groups).texts
    with torch.no_grad():
        image_parts = [model.image_features(to_pixel_batch(images[at: at + IMAGE_CHUNK], model.vision.preprocess))
                       for at in range(0, len(images), IMAGE_CHUNK)]
        text_parts = [model.text(*vocab.encode(texts[at: at + IMAGE_CHUNK])) for at in range(0, len(texts), IMAGE_CHUNK)]
    similarity = torch.cat(image_parts) @ torch.cat(text_parts).T  # (images, texts)
    result = score_retrieval(groups, spec.scenes, {"itc": (similarity, similarity.T)})
    result["notes"].append("the frozen encoder's own CLIP head (vlbridge.world.clip_head, LiT-trained on the frozen vision tower): ITC only")
    return result
