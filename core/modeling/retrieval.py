"""Features and image-text retrieval for Q-Former assemblies, as in BLIP-2: ITC similarity (the best
of the query tokens) shortlists the top k, then the ITM head re-ranks them, in both directions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlbridge.plugin.contract import describe, missing
from vlbridge.errors import VLBridgeError
from vlbridge.modeling.running import RunningModel, checked_batch_size, evaluating
from vlbridge.parts.images import as_image_list


MAX_TEXT_TOKENS = 35  # LAVIS tokenises retrieval texts to 35 tokens
UNRANKED = -100.0  # LAVIS's score for a pair outside the ITM shortlist
FEATURE_MODES = ("image", "text", "multimodal")
# What features and retrieval call on the connector (the Q-Former's; docs/writing-plugins.md, section 5).
RETRIEVAL_INTERFACE = ("tokenizer", "query_tokens", "query_outputs", "vision_proj", "text_outputs", "text_proj",
                       "multimodal_outputs", "itm_head")


@dataclass
class Features:
    """What `model.features` returns; fields not computed for the mode are None."""

    image_embeds: torch.Tensor | None = None  # (B, Q, H) query outputs
    image_embeds_proj: torch.Tensor | None = None  # (B, Q, E) normalised ITC features
    text_embeds: torch.Tensor | None = None  # (B, T, H)
    text_embeds_proj: torch.Tensor | None = None  # (B, T, E) normalised; [:, 0] is the [CLS] feature
    multimodal_embeds: torch.Tensor | None = None  # (B, Q, H) queries after attending to the text


@dataclass
class RetrievalResult:
    """Scores between every image and every text. `itc` is the raw cosine (no temperature); `i2t` and
    `t2i` are ITM + ITC for the top-k shortlist and -100 elsewhere, as in LAVIS."""

    itc: torch.Tensor  # (Ni, Nt)
    i2t: torch.Tensor  # (Ni, Nt)
    t2i: torch.Tensor  # (Nt, Ni)

    def texts_for_image(self, i: int, top: int = 5) -> list[int]:
        """The `top` texts for image i: the re-ranked shortlist first, then the others by ITC."""
        return _ranked(self.i2t[i], self.itc[i], top)

    def images_for_text(self, t: int, top: int = 5) -> list[int]:
        """The `top` images for text t: the re-ranked shortlist first, then the others by ITC."""
        return _ranked(self.t2i[t], self.itc[:, t], top)


def _ranked(reranked: torch.Tensor, itc: torch.Tensor, top: int) -> list[int]:
    """Indices by re-ranked score within the shortlist, then by ITC outside it (where the -100
    placeholders all tie and topk would order them arbitrarily)."""
    listed = reranked != UNRANKED
    inside = torch.nonzero(listed).flatten()
    outside = torch.nonzero(~listed).flatten()
    order = torch.cat([inside[reranked[inside].argsort(descending=True, stable=True)],
                       outside[itc[outside].argsort(descending=True, stable=True)]])
    return order[:max(top, 0)].tolist()


def _qformer(model: RunningModel):
    connector = model.connector
    absent = missing(connector, RETRIEVAL_INTERFACE)
    if absent:
        raise VLBridgeError(f"features and retrieval need a Q-Former connector; this assembly uses {describe(model.plan.connector)}, "
                            f"whose module lacks {', '.join(absent)}")
    return connector


def text_list(texts: str | Sequence[str]) -> list[str]:
    """One string is one text (not a sequence of characters); an empty list or a non-string is refused."""
    if not isinstance(texts, str) and (isinstance(texts, (bytes, dict, set)) or not isinstance(texts, Sequence)):
        raise VLBridgeError(f"texts must be a string or a list of strings, got a {type(texts).__name__}"
                            + ("; a set has no order to map results back to" if isinstance(texts, set) else ""))
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise VLBridgeError("no texts given; pass at least one string")
    wrong = [t for t in items if not isinstance(t, str)]
    if wrong:
        raise VLBridgeError(f"texts must be strings, got a {type(wrong[0]).__name__} ({wrong[0]!r:.40})")
    return items


def tokenize_texts(model: RunningModel, texts: str | Sequence[str], limit: int | None = MAX_TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask, padded to the longest text and cut at `limit` tokens (retrieval: LAVIS's 35; None:
    only where the Q-Former runs out of positions, as LAVIS's feature extractor, which cuts nothing)."""
    texts = text_list(texts)
    qformer = _qformer(model)
    limits = [n for n in (limit, getattr(qformer, "max_text_positions", None)) if n is not None]
    longest = min(limits) if limits else None
    encoded = qformer.tokenizer(list(texts), padding=True, truncation=longest is not None, max_length=longest, return_tensors="pt")
    return encoded["input_ids"].to(model.device), encoded["attention_mask"].to(model.device)


@torch.no_grad()
def features(model: RunningModel, images: Any = None, texts: str | Sequence[str] | None = None, mode: str = "image") -> Features:
    """BLIP-2's feature extractor: image (query outputs), text, or multimodal (queries that saw the text)."""
    if mode not in FEATURE_MODES:
        raise VLBridgeError(f"mode must be one of {FEATURE_MODES}, got {mode!r}")
    qformer = _qformer(model)
    if mode in ("image", "multimodal") and images is None:
        hint = "; for the texts' features alone pass mode='text'" if texts is not None and mode == "image" else ""
        raise VLBridgeError(f"mode {mode!r} needs images{hint}")
    if mode in ("text", "multimodal") and texts is None:
        raise VLBridgeError(f"mode {mode!r} needs texts")
    with evaluating(model):  # features of a model left in train mode are still deterministic
        return _features(model, qformer, images, texts, mode)


def _features(model: RunningModel, qformer: Any, images: Any, texts: str | Sequence[str] | None, mode: str) -> Features:
    out = Features()
    if mode in ("image", "multimodal"):
        image_embeds = model.encode_images(model.pixel_values(images))
    if mode == "image":
        out.image_embeds = qformer.query_outputs(image_embeds)
        out.image_embeds_proj = F.normalize(qformer.vision_proj(out.image_embeds), dim=-1)
    elif mode == "text":
        ids, mask = tokenize_texts(model, texts, limit=None)
        out.text_embeds = qformer.text_outputs(ids, mask)
        out.text_embeds_proj = F.normalize(qformer.text_proj(out.text_embeds), dim=-1)
    else:
        ids, mask = tokenize_texts(model, texts, limit=None)
        if ids.shape[0] != image_embeds.shape[0]:
            raise VLBridgeError(f"multimodal features pair images and texts one to one; got {image_embeds.shape[0]} images and {ids.shape[0]} texts")
        num_queries = qformer.query_tokens.shape[1]
        out.multimodal_embeds = qformer.multimodal_outputs(ids, mask, image_embeds)[:, :num_queries]
    return out


def itm_scores(model: RunningModel, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positive-class ITM logit, averaged over the queries, for aligned (image, text) pairs."""
    qformer = _qformer(model)
    num_queries = qformer.query_tokens.shape[1]
    joint = qformer.multimodal_outputs(ids, mask, image_embeds)[:, :num_queries]  # (B, Q, H)
    return qformer.itm_head(joint).mean(dim=1)[:, 1]


@torch.no_grad()
def retrieve(model: RunningModel, images: Any, texts: str | Sequence[str], k: int = 128, batch_size: int = 64) -> RetrievalResult:
    """ITC over everything, then ITM re-ranking of each row's top k, image->text and text->image.
    Every Q-Former pass takes at most `batch_size` images or texts: all of COCO's 5k images and 25k
    captions in one pass need tens of GB of activations."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise VLBridgeError(f"k (the ITM shortlist per query) must be a whole number of at least 1, got {k!r}")
    batch_size, texts = checked_batch_size(batch_size), text_list(texts)
    items = as_image_list(images)
    if not items:
        raise VLBridgeError("no images given; pass at least one PIL image, path or tensor")
    qformer = _qformer(model)
    with evaluating(model):
        image_embeds = torch.cat([model.encode_images(model.pixel_values(items[i:i + batch_size]))
                                  for i in range(0, len(items), batch_size)])
        image_proj = torch.cat([F.normalize(qformer.vision_proj(qformer.query_outputs(chunk)), dim=-1)
                                for chunk in image_embeds.split(batch_size)])  # (Ni, Q, E)
        ids, mask = tokenize_texts(model, texts)
        text_proj = torch.cat([F.normalize(qformer.text_proj(qformer.text_outputs(chunk_ids, chunk_mask)[:, 0]), dim=-1)
                               for chunk_ids, chunk_mask in zip(ids.split(batch_size), mask.split(batch_size))])  # (Nt, E)
        itc = torch.einsum("iqe,te->iqt", image_proj, text_proj).max(dim=1).values  # (Ni, Nt)
        i2t = _rerank(model, itc, image_embeds, ids, mask, k, batch_size, images_are_rows=True)
        t2i = _rerank(model, itc.t(), image_embeds, ids, mask, k, batch_size, images_are_rows=False)
    return RetrievalResult(itc=itc, i2t=i2t, t2i=t2i)


def _rerank(model, sims: torch.Tensor, image_embeds, ids, mask, k: int, batch_size: int, images_are_rows: bool) -> torch.Tensor:
    scores = torch.full_like(sims, UNRANKED)
    top = min(k, sims.shape[1])
    for row in range(sims.shape[0]):
        top_sims, cols = sims[row].topk(top)
        for start in range(0, top, batch_size):
            chunk = cols[start:start + batch_size]
            if images_are_rows:
                pair_images, pair_ids, pair_mask = image_embeds[row].expand(len(chunk), -1, -1), ids[chunk], mask[chunk]
            else:
                pair_images, pair_ids, pair_mask = image_embeds[chunk], ids[row].expand(len(chunk), -1), mask[row].expand(len(chunk), -1)
            scores[row, chunk] = itm_scores(model, pair_images, pair_ids, pair_mask) + top_sims[start:start + batch_size]
    return scores
