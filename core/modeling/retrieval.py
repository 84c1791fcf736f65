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
HOST = torch.device("cpu")  # where retrieval keeps what it holds per image and per pair (LAVIS keeps its ViT outputs there)
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


def tokenize_texts(model: RunningModel, texts: str | Sequence[str], limit: int | None = MAX_TEXT_TOKENS,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask, padded to the longest text and cut at `limit` tokens (retrieval: LAVIS's 35; None:
    only where the Q-Former runs out of positions, as LAVIS's feature extractor, which cuts nothing),
    on `device` (default: the model's; retrieval keeps them on the host)."""
    texts = text_list(texts)
    qformer = _qformer(model)
    limits = [n for n in (limit, getattr(qformer, "max_text_positions", None)) if n is not None]
    longest = min(limits) if limits else None
    encoded = qformer.tokenizer(list(texts), padding=True, truncation=longest is not None, max_length=longest, return_tensors="pt")
    device = model.device if device is None else device
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


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
    captions in one pass need tens of GB of activations. What is kept for every image (its encoder
    outputs: 19 GB for COCO's 5k at BLIP-2's 364 px) and every pair (the score matrices) stays in host
    memory, as in LAVIS, and a re-rank chunk's pairs go to the device when it runs; the scores come
    back on the CPU."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise VLBridgeError(f"k (the ITM shortlist per query) must be a whole number of at least 1, got {k!r}")
    batch_size, texts = checked_batch_size(batch_size), text_list(texts)
    items = as_image_list(images)
    if not items:
        raise VLBridgeError("no images given; pass at least one PIL image, path or tensor")
    qformer = _qformer(model)
    with evaluating(model):
        image_embeds, image_proj = _image_side(model, qformer, items, batch_size)
        ids, mask = tokenize_texts(model, texts, device=HOST)
        text_proj = _text_features(model, qformer, ids, mask, batch_size)
        itc = _itc(model, image_proj, text_proj, batch_size)
        i2t = _rerank(model, itc, image_embeds, ids, mask, k, batch_size, images_are_rows=True)
        t2i = _rerank(model, itc.t(), image_embeds, ids, mask, k, batch_size, images_are_rows=False)
    return RetrievalResult(itc=itc, i2t=i2t, t2i=t2i)


def _kept(store: torch.Tensor | None, rows: int, start: int, chunk: torch.Tensor) -> torch.Tensor:
    """`chunk` copied to rows start... of a host tensor of `rows` rows, made at the first chunk (a
    list of chunks and a cat would need twice the host memory)."""
    if store is None:
        store = torch.empty((rows, *chunk.shape[1:]), dtype=chunk.dtype, device=HOST)
    store[start:start + len(chunk)].copy_(chunk)
    return store


def _image_side(model: RunningModel, qformer: Any, items: list, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs (Ni, N, W) and normalised query features (Ni, Q, E), both in host memory,
    from one device pass per chunk of images."""
    embeds = proj = None
    for start in range(0, len(items), batch_size):
        chunk = model.encode_images(model.pixel_values(items[start:start + batch_size]))  # (b, N, W)
        embeds = _kept(embeds, len(items), start, chunk)
        proj = _kept(proj, len(items), start, F.normalize(qformer.vision_proj(qformer.query_outputs(chunk)), dim=-1))  # (b, Q, E)
    return embeds, proj


def _text_features(model: RunningModel, qformer: Any, ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(Nt, E) normalised [CLS] ITC features, on the device: every image chunk's ITC needs all of
    them, and they are small (COCO's 25k captions: 26 MB at E = 256 in fp32)."""
    device = model.device
    return torch.cat([F.normalize(qformer.text_proj(qformer.text_outputs(chunk_ids.to(device), chunk_mask.to(device))[:, 0]), dim=-1)
                      for chunk_ids, chunk_mask in zip(ids.split(batch_size), mask.split(batch_size))])


def _itc(model: RunningModel, image_proj: torch.Tensor, text_proj: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(Ni, Nt) ITC scores (each image's best query) in host memory, a chunk of images at a time:
    for all at once the (Ni, Q, Nt) product alone is 16 GB for COCO-5k."""
    itc = None
    for start in range(0, len(image_proj), batch_size):
        chunk = image_proj[start:start + batch_size].to(model.device)  # (b, Q, E)
        itc = _kept(itc, len(image_proj), start, torch.einsum("iqe,te->iqt", chunk, text_proj).max(dim=1).values)  # (b, Nt)
    return itc


def _rerank(model, sims: torch.Tensor, image_embeds, ids, mask, k: int, batch_size: int, images_are_rows: bool) -> torch.Tensor:
    """ITM + ITC for each row's ITC top k, UNRANKED elsewhere. Everything passed in is in host memory;
    each chunk's encoder outputs and token ids go to the device for its ITM pass."""
    device = model.device
    scores = torch.full_like(sims, UNRANKED)
    top = min(k, sims.shape[1])
    for row in range(sims.shape[0]):
        top_sims, cols = sims[row].topk(top)
        if images_are_rows:
            row_image = image_embeds[row].to(device)  # (N, W), once for all its chunks
        else:
            row_ids, row_mask = ids[row].to(device), mask[row].to(device)
        for start in range(0, top, batch_size):
            chunk = cols[start:start + batch_size]
            if images_are_rows:
                pair_images, pair_ids, pair_mask = row_image.expand(len(chunk), -1, -1), ids[chunk].to(device), mask[chunk].to(device)
            else:
                pair_images, pair_ids, pair_mask = image_embeds[chunk].to(device), row_ids.expand(len(chunk), -1), row_mask.expand(len(chunk), -1)
            scores[row, chunk] = itm_scores(model, pair_images, pair_ids, pair_mask).to(HOST) + top_sims[start:start + batch_size]
    return scores
