"""BLIP-2's training losses as pure functions on tensors.

Stage 1 (the Q-Former alone): image-text contrastive (`itc_loss`), image-text matching on hard
negatives (`sample_hard_negatives`, `itm_loss`) and image-grounded text generation (`itg_loss`).
Stage 2 for encoder-decoder LLMs: the prefix-LM split of a caption (`prefix_lm_split`).

Image ids say which samples show the same image: captions of one image are positives of each
other, never negatives, in ITC targets and in hard-negative sampling alike. `caption_positives`
widens that to every image that has the text among its own captions (a caption true of several
images); a `Positives` pair of masks carries either rule into both losses. ITC compares this
rank's samples with everyone's (gathered without gradient for the other ranks' rows, as BLIP-2).
Losses are computed in fp32 whatever the dtype of the inputs (autocast-safe).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, TypeVar

import torch
import torch.nn.functional as F

from vlbridge.errors import VLBridgeError
from vlbridge.train.distributed import all_gather_no_grad

IGNORE_INDEX = -100  # label value that cross-entropy skips (padding, unmatched ITM pairs)
DEFAULT_TEMP_RANGE = (0.001, 0.5)  # BLIP-1/ALBEF's range for the learned ITC temperature


# -- ITC ------------------------------------------------------------------------------------------

def check_image_ids(image_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Image ids must be one integer per sample (string ids broke LAVIS stage 1, LAVIS #629)."""
    if not isinstance(image_ids, torch.Tensor) or image_ids.is_floating_point() or image_ids.dtype == torch.bool:
        raise VLBridgeError(f"image ids must be an integer tensor (one per sample, e.g. the batch's image_index), "
                            f"got {type(image_ids).__name__} {getattr(image_ids, 'dtype', '')}")
    if image_ids.shape != (batch_size,):
        raise VLBridgeError(f"expected {batch_size} image ids (one per sample), got shape {tuple(image_ids.shape)}")
    return image_ids


def positive_mask(image_ids: torch.Tensor, all_image_ids: torch.Tensor) -> torch.Tensor:
    """(B,) local ids, (N,) gathered ids -> (B, N) True where both samples show the same image."""
    return image_ids[:, None] == all_image_ids.to(image_ids.device)[None, :]


class Positives(NamedTuple):
    """Which pairs of the gathered batch match, (B, N) bool each: `i2t[b, n]` whether text n is
    true of local image b, `t2i[b, n]` whether local text b is true of image n."""

    i2t: torch.Tensor
    t2i: torch.Tensor


def image_positives(image_ids: torch.Tensor, all_image_ids: torch.Tensor) -> Positives:
    """BLIP-2's rule: a pair matches when both samples show the same image."""
    same = positive_mask(image_ids, all_image_ids)
    return Positives(same, same)


NO_CAPTION = -1  # padding of a caption-key row (text keys are non-negative)


def caption_positives(image_ids: torch.Tensor, text_keys: torch.Tensor, caption_keys: torch.Tensor, all_image_ids: torch.Tensor,
                      all_text_keys: torch.Tensor, all_caption_keys: torch.Tensor) -> Positives:
    """The same image, or a text that is one of the image's own captions.

    text_keys (B,) and all_text_keys (N,): one non-negative key per sample's text; caption_keys
    (B, K) and all_caption_keys (N, K'): the keys of every caption of the sample's image, padded
    with NO_CAPTION. A caption written for several images ("a picture of two shapes", or the same
    sentence for two photos) is then never drawn as their negative nor pushed away from them."""
    same = positive_mask(image_ids, all_image_ids)
    i2t = (all_text_keys.to(caption_keys.device)[None, :, None] == caption_keys[:, None, :]).any(dim=2)  # (B, N)
    t2i = (text_keys[:, None, None] == all_caption_keys.to(text_keys.device)[None, :, :]).any(dim=2)  # (B, N)
    return Positives(same | i2t, same | t2i)


def check_positives(positives: Positives, rows: int, columns: int) -> Positives:
    """Both masks must be (B, N) booleans."""
    for name, mask in zip(("i2t", "t2i"), positives):
        if mask.dtype != torch.bool or mask.shape != (rows, columns):
            raise VLBridgeError(f"positives.{name} must be a ({rows}, {columns}) bool mask over the gathered batch, "
                                f"got {mask.dtype} {tuple(mask.shape)}")
    return positives


def clamp_temperature(temp: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    """The temperature used in the forward, kept in `bounds`; gradients pass straight through.

    BLIP-2 does not clamp its learned temperature. A large step can still push it to 0 or below,
    where the logits blow up or flip sign, so the value used is clamped; the gradient is the
    unclamped one (straight-through), so the parameter can come back instead of sticking at a
    bound with zero gradient. `bounds=None` uses the temperature as it is.
    """
    if bounds is None:
        return temp
    low, high = bounds
    return temp + (temp.detach().clamp(low, high) - temp.detach())


def itc_similarities(image_feats: torch.Tensor, text_feats: torch.Tensor, all_image_feats: torch.Tensor,
                     all_text_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities, best query per pair: sim_i2t (B, N) local images vs all texts,
    sim_t2i (B, N) local texts vs all images. Features are L2-normalised already."""
    sim_i2t = torch.einsum("bqe,ne->bqn", image_feats, all_text_feats).amax(dim=1)  # (B, Q, N) -> (B, N)
    sim_t2i = torch.einsum("be,nqe->bnq", text_feats, all_image_feats).amax(dim=2)  # (B, N, Q) -> (B, N)
    return sim_i2t, sim_t2i


def soft_targets(positives: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(B, N) bool -> (B, N) target distribution: mass 1 - eps spread evenly over the row's
    positives, eps spread evenly over all N columns (torch's label smoothing when there is one positive)."""
    pos = positives.float()
    spread = pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (1.0 - label_smoothing) * spread + label_smoothing / positives.shape[1]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets[j] * log_softmax(logits)[j]."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor | float, image_ids: torch.Tensor,
             label_smoothing: float = 0.1, temp_range: tuple[float, float] | None = DEFAULT_TEMP_RANGE,
             positives: Positives | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLIP-2's image-text contrastive loss over the batch of every rank.

    image_feats (B, Q, E) and text_feats (B, E) are L2-normalised; image_ids (B,) int. Returns the
    loss (mean of both directions) and the temperature-scaled similarities sim_i2t, sim_t2i (B, N),
    N = the gathered batch. Captions of the same image share the positive mass of a row; with all
    ids distinct this is exactly CE on the diagonal with label smoothing (BLIP-2's plain branch).
    `positives` (default: `image_positives` of the ids) replaces which pairs share a row's mass.
    """
    image_ids = check_image_ids(image_ids, image_feats.shape[0]).to(image_feats.device)
    if text_feats.shape[0] != image_feats.shape[0]:
        raise VLBridgeError(f"itc_loss: {image_feats.shape[0]} images but {text_feats.shape[0]} texts")
    all_image_feats = all_gather_no_grad(image_feats, keep_local=True)  # (N, Q, E)
    all_text_feats = all_gather_no_grad(text_feats, keep_local=True)  # (N, E)
    all_ids = all_gather_no_grad(image_ids)  # (N,)
    temp = clamp_temperature(torch.as_tensor(temp, device=image_feats.device), temp_range)
    sim_i2t, sim_t2i = itc_similarities(image_feats.float(), text_feats.float(), all_image_feats.float(), all_text_feats.float())
    sim_i2t, sim_t2i = sim_i2t / temp, sim_t2i / temp
    positives = check_positives(positives or image_positives(image_ids, all_ids), *sim_i2t.shape)
    loss = (soft_cross_entropy(sim_i2t, soft_targets(positives.i2t, label_smoothing))
            + soft_cross_entropy(sim_t2i, soft_targets(positives.t2i, label_smoothing))) / 2
    return loss, sim_i2t, sim_t2i


# -- ITM ------------------------------------------------------------------------------------------

class HardNegatives(NamedTuple):
    """Indices into the gathered batch: a negative image for each local text and a negative text
    for each local image. -1 (and False in the mask) where the row has no negative to draw."""

    images: torch.Tensor  # (B,) int64
    texts: torch.Tensor  # (B,) int64
    has_image: torch.Tensor  # (B,) bool
    has_text: torch.Tensor  # (B,) bool


def negative_weights(sim: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) similarities and positives -> (B, N) sampling weights over negatives, (B,) has-any.

    Softmax of the similarities with the positives excluded. NaN similarities get no weight and
    +inf is treated as the largest float. A row whose non-positive entries are all NaN/-inf falls
    back to uniform over its non-positives; a row with no non-positive at all has no negative
    (its weights are a dummy uniform row and has-any is False).
    """
    logits = torch.nan_to_num(sim.detach().float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    logits = logits.masked_fill(positives, float("-inf"))
    weights = torch.softmax(logits, dim=1)  # rows of only -inf give NaN
    usable = torch.isfinite(weights).all(dim=1) & (weights.sum(dim=1) > 0)
    candidates = (~positives).float()
    has_any = candidates.sum(dim=1) > 0
    uniform = torch.where(has_any[:, None], candidates, torch.ones_like(candidates))
    uniform = uniform / uniform.sum(dim=1, keepdim=True)
    weights = torch.where(usable[:, None], torch.nan_to_num(weights, nan=0.0), uniform)
    return weights, has_any


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_ids: torch.Tensor,
                          all_image_ids: torch.Tensor | None = None, generator: torch.Generator | None = None,
                          positives: Positives | None = None) -> HardNegatives:
    """Draw one hard negative per local sample from the softmaxed ITC similarities (BLIP-2's ITM).

    sim_i2t, sim_t2i: (B, N) from `itc_loss`; image_ids (B,); all_image_ids (N,) the gathered ids
    (default: gathered here). Samples of the same image (or, with `positives`, any matching pair)
    are never drawn. Never raises on inf/NaN
    similarities (LAVIS #107); see `negative_weights` for the fallbacks.
    """
    image_ids = check_image_ids(image_ids, sim_i2t.shape[0]).to(sim_i2t.device)
    if all_image_ids is None:
        all_image_ids = all_gather_no_grad(image_ids)
    if sim_i2t.shape != sim_t2i.shape or sim_i2t.shape[1] != all_image_ids.shape[0]:
        raise VLBridgeError(f"sample_hard_negatives: sim_i2t {tuple(sim_i2t.shape)}, sim_t2i {tuple(sim_t2i.shape)} "
                            f"and {all_image_ids.shape[0]} gathered image ids do not fit (B, N), (B, N), (N,)")
    positives = check_positives(positives or image_positives(image_ids, all_image_ids), *sim_i2t.shape)
    with torch.no_grad():
        image_weights, has_image = negative_weights(sim_t2i, positives.t2i)  # each text's row over all images
        text_weights, has_text = negative_weights(sim_i2t, positives.i2t)  # each image's row over all texts
        images = draw(image_weights, generator)
        texts = draw(text_weights, generator)
    return HardNegatives(images.masked_fill(~has_image, -1), texts.masked_fill(~has_text, -1), has_image, has_text)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) non-negative weights -> (B,) one column per row, on the generator's device if one is given
    (a CPU generator may drive sampling for CUDA similarities)."""
    device = weights.device if generator is None else generator.device
    return torch.multinomial(weights.to(device), 1, generator=generator).squeeze(1).to(weights.device)


def itm_labels(batch_size: int, negative_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(3B,) labels: 1 for the B positive pairs, 0 for the 2B negatives, IGNORE_INDEX for masked-out negatives."""
    labels = torch.cat([torch.ones(batch_size, dtype=torch.long, device=device),
                        torch.zeros(2 * batch_size, dtype=torch.long, device=device)])
    if negative_mask is not None:
        if negative_mask.shape != (2 * batch_size,):
            raise VLBridgeError(f"itm negative_mask must have shape ({2 * batch_size},), got {tuple(negative_mask.shape)}")
        labels[batch_size:] = labels[batch_size:].masked_fill(~negative_mask.to(device).bool(), IGNORE_INDEX)
    return labels


def itm_loss(itm_logits: torch.Tensor, batch_size: int, negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CE of the match head on 3B pairs laid out as [(img, txt) x B; (neg_img, txt) x B; (img, neg_txt) x B].

    itm_logits (3B, 2), class 1 = match (already averaged over the queries). `negative_mask` (2B,)
    drops negative pairs that have no real negative (see `HardNegatives`) from the mean.
    """
    if itm_logits.shape != (3 * batch_size, 2):
        raise VLBridgeError(f"itm_logits must have shape ({3 * batch_size}, 2) for batch size {batch_size}, "
                            f"got {tuple(itm_logits.shape)}")
    labels = itm_labels(batch_size, negative_mask, itm_logits.device)
    return F.cross_entropy(itm_logits.float(), labels, ignore_index=IGNORE_INDEX)


# -- ITG ------------------------------------------------------------------------------------------

def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token CE of the Q-Former's text decoder, mean over the real target tokens.

    logits (B, T, V) from ids (B, T) that start with [DEC]: position t predicts token t + 1, so the
    first token is never a target and the last logit predicts nothing. Padding (mask 0) is ignored;
    [SEP] is a target and acts as the end token. Label smoothing 0.1 as in BLIP-2.
    """
    if logits.shape[:2] != input_ids.shape:
        raise VLBridgeError(f"itg_loss: logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask.eq(0), IGNORE_INDEX)
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


# -- LM loss averaged per sample (stage 2) --------------------------------------------------------

def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's mean CE over its labelled tokens (labels aligned with the
    logits, -100 skipped); samples without a labelled token are left out of the mean.

    The token mean (BLIP-2's) lets a long caption outweigh a one-word answer in a mixed batch; this
    weighs every sample the same."""
    if logits.shape[:2] != labels.shape:
        raise VLBridgeError(f"per_sample_lm_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    token_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    counts = labels.ne(IGNORE_INDEX).sum(dim=1)  # (B,)
    has_target = counts > 0
    if not has_target.any():
        raise VLBridgeError("per_sample_lm_loss: no labelled token in the batch")
    per_sample = token_loss.sum(dim=1)[has_target] / counts[has_target]
    return per_sample.mean()


def no_target_loss(logits: torch.Tensor) -> torch.Tensor:
    """The loss of a batch with no labelled token: 0 over 0 items, not the NaN a mean over nothing
    gives. It stays on the logits' graph, so a backward still reaches every tensor that made them
    (under DDP every rank must, each step) with zero gradients."""
    return logits[:, :1, :1].float().sum() * 0.0


# -- prefix LM (stage 2, encoder-decoder) ---------------------------------------------------------

Unit = TypeVar("Unit")


def split_point(length: int, generator: torch.Generator | None = None) -> int:
    """Where to cut a sequence of `length` units: uniform in [1, length // 2]; 0 when length < 2,
    so that the target is never empty and never shorter than the prefix."""
    if length < 2:
        return 0
    return int(torch.randint(1, length // 2 + 1, (1,), generator=generator).item())


def prefix_lm_split(texts: Sequence[str] | Sequence[Sequence[Unit]], generator: torch.Generator | None = None,
                    ) -> list[tuple[str, str]] | list[tuple[list[Unit], list[Unit]]]:
    """BLIP-2's prefix LM for FlanT5: split each caption into (encoder prefix, decoder target).

    Strings are split in words (whitespace), so both halves are plain text that the LLM's tokenizer
    reads as usual (and appends its </s>); token lists (e.g. ids) are split in tokens. The cut is
    uniform from 1 to the middle (`split_point`), the paper's rule as the LAVIS maintainers state
    it (LAVIS #139); a text of fewer than 2 units keeps an empty prefix and is all target.
    """
    pairs: list = []
    for text in texts:
        units = text.split() if isinstance(text, str) else list(text)
        cut = split_point(len(units), generator)
        if isinstance(text, str):
            pairs.append((" ".join(units[:cut]), " ".join(units[cut:])))
        else:
            pairs.append((units[:cut], units[cut:]))
    return pairs
