"""Stage objectives: what the trainer calls, `objective(model, batch) -> dict[str, Tensor]`.

The dict holds "loss" (the total to backpropagate) and each component detached ("itc", "itm",
"itg" in stage 1; "lm" in stage 2). Objectives are model-agnostic: they use only the VLBridgeModel
and connector interfaces (docs/architecture.md), so any connector with a stage 2 trains with
`Stage2Objective` on the same loss and tokenisation (Q-Former, linear and MLP compared on equal
footing), and any connector with the Q-Former's stage-1 interface trains with `Stage1Objective`.

Batches are the data layer's dicts: `text` (list[str]), `image_index` (int64, same image => same
index on every rank), and `pixel_values` or, from the frozen-feature cache, `image_embeds`
(B, N, W). Stage 1 with `positives: caption` also reads `image_captions` (each sample's image's
captions); stage 2 reads optional `text_input` / `text_output` pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

import torch
from pydantic import ConfigDict, Field, ValidationError

from vlbridge.errors import PluginError, VLBridgeError
from vlbridge.files.config_fields import StrictNumbers
from vlbridge.modeling.connector_protocol import STAGE1_INTERFACE, Stage1Calls
from vlbridge.modeling.llm_output import aligned_labels, lm_loss, logits_of, prompt_lengths
from vlbridge.modeling.prompts import format_prompts
from vlbridge.plugin.contract import describe, returned_tensor, tokenized
from vlbridge.train.distributed import all_gather_no_grad, all_gather_with_grad, is_distributed
from vlbridge.train.losses import (DEFAULT_TEMP_RANGE, IGNORE_INDEX, Positives, caption_positives, itc_loss, itg_loss, itm_loss,
                                   no_target_loss, per_sample_lm_loss, prefix_lm_split, sample_hard_negatives)
from vlbridge.train.text_cuts import SETTING, TextCuts, cut_rows

if TYPE_CHECKING:
    from vlbridge.modeling.model import VLBridgeModel

Losses = dict[str, torch.Tensor]


# -- shared pieces --------------------------------------------------------------------------------

class ObjectiveOptions(StrictNumbers):
    """Base of the objectives' options: unknown names are errors."""

    model_config = ConfigDict(extra="forbid")


class Objective:
    """Base class. Subclasses set `name`, `stage`, `Options`, and implement `supports` and `__call__`."""

    name: ClassVar[str]
    stage: ClassVar[int]
    connectors: ClassVar[str]  # which connector kinds, in words (for listings and errors)
    Options: ClassVar[type[ObjectiveOptions]]

    def __init__(self, generator: torch.Generator | None = None, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except ValidationError as exc:
            raise VLBridgeError(f"objective {self.name!r}: bad options: {exc}") from exc
        self.generator = generator  # for sampling (hard negatives, prefix split); None = torch's global RNG

    def supports(self, model: "VLBridgeModel") -> str | None:
        """None if this objective can train the model as it is, else the reason it cannot."""
        raise NotImplementedError

    def check(self, model: "VLBridgeModel") -> None:
        """Raise VLBridgeError naming the reason when the model does not fit this objective."""
        reason = self.supports(model)
        if reason is not None:
            raise VLBridgeError(f"objective {self.name!r} cannot train this model: {reason}")

    def __call__(self, model: "VLBridgeModel", batch: Mapping[str, Any]) -> Losses:
        raise NotImplementedError

    @property
    def starts(self) -> bool:
        """Whether `start` has set-up to do (the Trainer reads a first batch for it only then)."""
        return False

    def start(self, model: "VLBridgeModel", batch: Mapping[str, Any]) -> str | None:
        """Called once by the Trainer before a fresh run's first step (never on resume), with the
        run's first batch, when `starts`: one-time set-up of the model; returns a line to log, or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


def total(**parts: torch.Tensor) -> Losses:
    """{"loss": sum of the parts, each part detached} (the unweighted sum, as BLIP-2)."""
    loss = sum(parts.values())
    return {"loss": loss, **{name: value.detach() for name, value in parts.items()}}


LOSS_ITEMS = "loss_items"  # optional key: how many items (tokens or samples) "loss" is the mean of


def mean_over_items(losses: Losses, items: torch.Tensor) -> Losses:
    """Mark `losses` as means over `items` items, so that the trainer can weigh micro-batches and
    ranks by their item counts: a global batch split over processes or accumulation steps then
    trains exactly as one batch would (the mean over all its items, not a mean of means)."""
    return {**losses, LOSS_ITEMS: items.detach().to(torch.float32)}


def batch_texts(batch: Mapping[str, Any], key: str = "text") -> list[str]:
    texts = batch.get(key)
    if texts is None:
        raise VLBridgeError(f"the batch has no {key!r} (keys: {sorted(batch)}); captions must come as a list of strings")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise VLBridgeError("empty batch: every sample was skipped; the trainer should skip batches with len(batch['index']) == 0")
    if not all(isinstance(text, str) for text in texts):
        raise VLBridgeError(f"batch[{key!r}] must hold strings, got {sorted({type(t).__name__ for t in texts})}")
    return texts


def batch_image_embeds(model: "VLBridgeModel", batch: Mapping[str, Any]) -> torch.Tensor:
    """(B, N, W) frozen encoder tokens: the cached `image_embeds` if present, else the encoder's."""
    embeds = batch.get("image_embeds")
    if embeds is None:
        if batch.get("pixel_values") is None:
            raise VLBridgeError(f"the batch needs pixel_values or cached image_embeds (keys: {sorted(batch)})")
        return model.encode_images(batch["pixel_values"].to(model.device))
    expected = model.plan.encoder_out
    if embeds.dim() != 3 or tuple(embeds.shape[1:]) != (expected.num_tokens, expected.width):
        raise VLBridgeError(f"cached image_embeds have shape {tuple(embeds.shape)} but encoder {model.plan.encoder.name!r} "
                            f"gives (batch, {expected.num_tokens}, {expected.width}); was the cache built with another encoder?")
    return embeds.to(model.device, torch.float32)


def batch_image_ids(batch: Mapping[str, Any], size: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 image indices: captions with the same index are never each other's negatives."""
    ids = batch.get("image_index")
    if ids is None:
        raise VLBridgeError("the batch has no 'image_index' (the data layer's stable int per image); stage 1 needs it "
                            "so that captions of the same image are not treated as negatives")
    if not isinstance(ids, torch.Tensor):
        if any(isinstance(i, str) for i in ids):
            raise VLBridgeError("image_index must be integers, not strings (string ids crashed LAVIS stage 1, #629)")
        ids = torch.as_tensor(list(ids))
    if ids.shape != (size,) or ids.is_floating_point():
        raise VLBridgeError(f"image_index must be {size} integers (one per text), got {ids.dtype} of shape {tuple(ids.shape)}")
    return ids.to(device, torch.long)


def join_text(left: str, right: str) -> str:
    """Concatenate two texts with one space between them unless either side already has one."""
    if not left or not right or left[-1].isspace() or right[0].isspace():
        return left + right
    return f"{left} {right}"


# -- stage 1 --------------------------------------------------------------------------------------

STAGE1_ROOM = "the Q-Former's connector option max_text_positions (BERT: 512) must hold it"  # bounds a raised limit


class Stage1Options(ObjectiveOptions):
    max_text_tokens: int = Field(32, ge=2, description="Q-Former text length (BLIP-2: 32), [CLS] and [SEP] included")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of ITC and ITG (BLIP-2: 0.1)")
    temp_range: tuple[float, float] | None = Field(DEFAULT_TEMP_RANGE, description="bounds on the ITC temperature's value (straight-through); none = unclamped, as BLIP-2")
    positives: Literal["image", "caption"] = Field(
        "image", description="which in-batch pairs match (ITC's targets, never an ITM negative): 'image' = captions of the same "
        "image (BLIP-2); 'caption' = also every image that has the text among its own captions, so a caption written for "
        "several images is not their negative (reads the batch's `image_captions`: JSON/JSONL datasets and feature caches "
        "give every caption of the image, tar streams those of the pair's own sample, its text members)")


class Stage1Objective(Objective):
    """BLIP-2 stage 1: ITC + ITM (hard negatives) + ITG on the Q-Former alone; loss = their sum.

    Image ids come from `batch["image_index"]`. Texts are padded to `max_text_tokens` (as LAVIS), so
    every rank's token tensors have the same shape for the gather. As in LAVIS, ITG's text reads the
    ITC query pass's self-attention keys/values (no second query pass). ln_vision and the
    cross-attention K/V of the batch's images are computed once (`image_context`) and indexed by
    ITC, ITM and ITG; only other ranks' hard-negative images get their own.
    """

    name = "stage1"
    stage = 1
    connectors = "a connector with the Q-Former's stage-1 interface (qformer)"
    Options = Stage1Options

    def __init__(self, generator: torch.Generator | None = None, **options: Any) -> None:
        super().__init__(generator, **options)
        limit = self.options.max_text_tokens
        self.text_cuts = {phase: TextCuts(limit, room=STAGE1_ROOM) for phase in ("train", "eval")}  # by the model's mode

    def supports(self, model: "VLBridgeModel") -> str | None:
        connector = model.connector
        missing = [attr for attr in STAGE1_INTERFACE if getattr(connector, attr, None) is None]
        if 1 not in model.plan.stages or missing:
            return (f"connector {model.plan.connector.name!r} has no stage 1 (stages {list(model.plan.stages)}; "
                    f"missing {missing or 'nothing'}); stage 1 needs a Q-Former with its text side")
        if model.stage != 1:
            return f"the model is set to stage {model.stage}; build it with stage=1 or call model.set_stage(1)"
        return None

    def __call__(self, model: "VLBridgeModel", batch: Mapping[str, Any]) -> Losses:
        self.check(model)
        qformer = Stage1Calls(model.connector, describe(model.plan.connector))  # its answers checked where they arrive
        texts = batch_texts(batch)
        image_embeds = batch_image_embeds(model, batch)  # (B, N, W)
        if image_embeds.shape[0] != len(texts):
            raise VLBridgeError(f"stage 1 needs one text per image: {image_embeds.shape[0]} images, {len(texts)} texts")
        image_ids = batch_image_ids(batch, len(texts), model.device)  # (B,)
        positives = self.positives(batch, texts, image_ids)  # None: same image only
        ids, mask, cut = self.tokenize(qformer, texts, model.device)  # (B, T), (B,)
        self.text_cuts["train" if model.training else "eval"].add(cut, torch.zeros_like(cut))  # [SEP] is always a target
        image = qformer.image_context(image_embeds)  # cross-attention K/V, shared by the three losses
        query_out, query_kv = qformer.query_outputs(image, return_layer_kv=True)  # (B, Q, W), per-layer K/V for ITG
        itc, sim_i2t, sim_t2i = self.itc(qformer, query_out, ids, mask, image_ids, positives)
        itm = self.itm(qformer, image_embeds, image, ids, mask, image_ids, sim_i2t, sim_t2i, positives)
        itg = self.itg(qformer, query_kv, ids, mask)
        return total(itc=itc, itm=itm, itg=itg)

    def tokenize(self, qformer: Any, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[CLS] text [SEP] [PAD]..., (B, max_text_tokens), truncated on the right, and (B,) which texts
        that cut. One pass at limit + 1 tells the cut rows (one token more than the limit); a row that
        ends in padding there is the same tokens with one pad more, so it is trimmed. Only the others
        (the cut rows: cut at the limit they keep their closing [SEP]) are tokenised again."""
        limit = self.options.max_text_tokens
        ids, mask = self.padded_tokens(qformer, list(texts), limit + 1)  # (B, limit + 1)
        cut = mask.sum(dim=1) > limit  # (B,)
        rows = mask[:, limit].nonzero().flatten().tolist()  # the cut ones (every row, were the padding on the left)
        ids, mask = ids[:, :limit].clone(), mask[:, :limit].clone()
        if rows:
            ids[rows], mask[rows] = self.padded_tokens(qformer, [texts[i] for i in rows], limit)
        return ids.to(device), mask.to(device), cut  # the flags stay on the host: counting them syncs no device

    @staticmethod
    def padded_tokens(qformer: Any, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The Q-Former tokenizer's ids and mask of `texts`, padded and truncated to `length`, checked."""
        encoded = qformer.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        who, what = getattr(qformer, "who", "the connector"), f"tokenizer(texts, ..., max_length={length}, return_tensors='pt')"
        if not isinstance(encoded, Mapping) or not {"input_ids", "attention_mask"} <= set(encoded):
            raise PluginError(f"{who}: {what} returned a {type(encoded).__name__}; it must return a mapping with input_ids and "
                              "attention_mask (docs/writing-plugins.md, 5.3)")
        ids, mask = (returned_tensor(who, f"{what}[{key!r}]", encoded[key], (len(texts), length), f"padded {key}")
                     for key in ("input_ids", "attention_mask"))
        return ids, mask

    def positives(self, batch: Mapping[str, Any], texts: Sequence[str], image_ids: torch.Tensor) -> Positives | None:
        """The matching pairs under `positives: caption` (from the batch's `image_captions`); None under 'image'."""
        if self.options.positives == "image":
            return None
        captions = batch.get("image_captions")
        if captions is None:
            raise VLBridgeError("objective option positives: caption needs batch['image_captions'] (each sample's image's "
                                "captions, as vlbridge's datasets give them); this batch has none: build it with "
                                "vlbridge.data or use positives: image (BLIP-2's rule)")
        if len(captions) != len(texts):
            raise VLBridgeError(f"batch['image_captions'] has {len(captions)} rows for {len(texts)} texts")
        from vlbridge.train.caption_keys import gathered_caption_keys

        keys, rows, all_keys, all_rows = gathered_caption_keys(texts, captions, image_ids.device)
        return caption_positives(image_ids, keys, rows, all_gather_no_grad(image_ids), all_keys, all_rows)

    def itc(self, qformer: Any, query_out: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            image_ids: torch.Tensor, positives: Positives | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_feats = qformer.image_features_of(query_out)  # (B, Q, E)
        text_feats = qformer.text_features(ids, mask)  # (B, E)
        return itc_loss(image_feats, text_feats, qformer.temp, image_ids, self.options.label_smoothing, self.options.temp_range,
                        positives)

    def itm(self, qformer: Any, image_embeds: torch.Tensor, image: Any, ids: torch.Tensor, mask: torch.Tensor,
            image_ids: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positives: Positives | None = None) -> torch.Tensor:
        """3B pairs: (img, txt) positive, (hard-negative img, txt), (img, hard-negative txt)."""
        batch = ids.shape[0]
        all_ids, all_mask = all_gather_no_grad(ids), all_gather_no_grad(mask)  # (N, T)
        negatives = sample_hard_negatives(sim_i2t, sim_t2i, image_ids, all_gather_no_grad(image_ids), self.generator, positives)
        neg_rows = negatives.images.clamp_min(0)  # rows without a negative are placeholders, ignored below
        neg_texts = negatives.texts.clamp_min(0)
        pair_ids = torch.cat([ids, ids, all_ids[neg_texts]])  # (3B, T)
        pair_mask = torch.cat([mask, mask, all_mask[neg_texts]])
        logits = qformer.itm_logits(pair_ids, pair_mask, self.pair_images(qformer, image_embeds, image, neg_rows))  # (3B, 2)
        return itm_loss(logits, batch, torch.cat([negatives.has_image, negatives.has_text]))

    @staticmethod
    def pair_images(qformer: Any, image_embeds: torch.Tensor, image: Any, neg_rows: torch.Tensor) -> Any:
        """The ITM pairs' images [img ; negative img ; img] as indexed K/V of the local images; under
        DDP, negatives index all ranks' images, so only those B get K/V of their own."""
        local = torch.arange(image_embeds.shape[0], device=neg_rows.device)
        if not is_distributed():
            return image.select(torch.cat([local, neg_rows, local]))
        neg_images = qformer.image_context(all_gather_with_grad(image_embeds)[neg_rows])  # (B, Nv, W) -> K/V
        return type(image).cat([image, neg_images, image])

    def itg(self, qformer: Any, query_kv: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Captioning from the queries: [CLS] becomes [DEC], each token predicts the next; the
        text reads the ITC query pass's K/V in every layer (LAVIS's past_key_values)."""
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = qformer.tokenizer.bos_token_id  # [DEC]
        logits = qformer.itg_logits_from_queries(query_kv, decoder_ids, mask)  # (B, T, V)
        return itg_loss(logits, decoder_ids, mask, self.options.label_smoothing)


# -- stage 2 --------------------------------------------------------------------------------------

class Stage2Options(ObjectiveOptions):
    prompt: str = Field("", description="text before every caption (e.g. 'a photo of'); never a target")
    max_text_tokens: int = Field(32, ge=2, description="LLM text length (BLIP-2: 32), special tokens included")
    loss_average: Literal["tokens", "samples"] = Field("tokens", description=(
        "tokens: the mean over every target token of the batch (BLIP-2/LAVIS); samples: each sample's mean, "
        "then the mean over samples, so a one-word answer weighs as much as a long caption in a mixed batch"))
    soft_prompt_norm: Literal["init", "llm", "vocabulary"] = Field("init", description=(
        "init: the connector's output layer as initialised (LAVIS); llm: before a fresh run's first step, scale that "
        "layer so the soft prompt's mean token norm on the first batch equals the LLM's embeddings' for the batch's "
        "text; vocabulary: the same, to the mean over the LLM's whole vocabulary (vlbridge.train.soft_prompt_scale)"))


class Stage2Objective(Objective):
    """BLIP-2 stage 2: the connector's output is a soft prompt for the frozen LLM; loss = its LM loss.

    Decoder-only (OPT): prompt + caption + `llm.caption_suffix`, right-padded; the labels skip the
    prompt's tokens (BOS included, counted by tokenising the prompt alone, as LAVIS, up to where they
    stop matching the text's: `prompt_lengths`) and padding.
    Encoder-decoder (FlanT5): prefix LM, the encoder reads [visual; prompt + prefix] and the decoder
    learns the rest (+ </s>); the caption is cut by `prefix_lm_split` (in words) unless the batch
    gives `text_input` / `text_output` (then prompt + text_input is the input, text_output the target;
    OPT reads the same pair as prompt + text_input + text_output, learning only text_output).
    """

    name = "stage2"
    stage = 2
    connectors = "any connector with a stage 2 (qformer, linear, mlp, plugins)"
    Options = Stage2Options

    def supports(self, model: "VLBridgeModel") -> str | None:
        if model.llm is None:
            return "the model has no LLM; build it with stage=2"
        if model.stage != 2:
            return f"the model is set to stage {model.stage}; call model.set_stage(2)"
        return None

    def __init__(self, generator: torch.Generator | None = None, **options: Any) -> None:
        super().__init__(generator, **options)
        limit = self.options.max_text_tokens
        self.text_cuts = {"train": TextCuts(limit), "eval": TextCuts(limit)}  # texts cut at max_text_tokens, by the model's mode

    def __call__(self, model: "VLBridgeModel", batch: Mapping[str, Any]) -> Losses:
        self.check(model)
        image_embeds, inputs, targets = self.parts(model, batch)
        # an instruction-aware connector reads the LLM's input text (InstructBLIP's instruction) too
        visual = model.visual_tokens(image_embeds=image_embeds, instructions=inputs)  # (B, M, D)
        who = describe(model.plan.llm)
        cuts = self.text_cuts["train" if model.training else "eval"]
        if model.llm.is_encoder_decoder:
            loss, items = self.encoder_decoder_lm(who, model.llm, visual, format_prompts(who, model.llm, inputs), targets, cuts)
        else:
            fixed_prompt = self.explicit_pairs(batch) is None  # every row's input is the objective's prompt
            loss, items = self.decoder_only_lm(who, model.llm, visual, format_prompts(who, model.llm, inputs), targets, cuts,
                                               fixed_prompt)
        return mean_over_items(total(lm=loss), items)

    def parts(self, model: "VLBridgeModel", batch: Mapping[str, Any]) -> tuple[torch.Tensor, list[str], list[str]]:
        """(image_embeds, LLM input texts, targets) of a batch."""
        pairs = self.explicit_pairs(batch)
        texts = batch_texts(batch) if pairs is None else pairs[1]
        image_embeds = batch_image_embeds(model, batch)
        if image_embeds.shape[0] != len(texts):
            raise VLBridgeError(f"stage 2 needs one text per image: {image_embeds.shape[0]} images, {len(texts)} texts")
        if model.llm.is_encoder_decoder:
            inputs, targets = pairs if pairs is not None else self.prefix_pairs(texts)
        else:
            inputs, targets = (pairs[0] if pairs is not None else [self.options.prompt] * len(texts)), texts
        return image_embeds, inputs, targets

    @property
    def starts(self) -> bool:
        return self.options.soft_prompt_norm != "init"

    def start(self, model: "VLBridgeModel", batch: Mapping[str, Any]) -> str | None:
        """`soft_prompt_norm` llm / vocabulary: scale the connector's output layer to the LLM's embedding norm."""
        if self.options.soft_prompt_norm == "init":
            return None
        from vlbridge.train.soft_prompt_scale import scale_soft_prompt

        self.check(model)
        state = None if self.generator is None else self.generator.get_state()
        with torch.no_grad():
            image_embeds, inputs, targets = self.parts(model, batch)  # a prefix-LM split draws from the generator:
        if state is not None:
            self.generator.set_state(state)  # given back, so the first step splits as it would have
        texts = [" ".join(t for t in pair if t) for pair in zip(inputs, targets)]
        return scale_soft_prompt(model, image_embeds, inputs, texts, self.options.soft_prompt_norm).line()

    def explicit_pairs(self, batch: Mapping[str, Any]) -> tuple[list[str], list[str]] | None:
        """(prompt + text_input, text_output) when the batch gives both, else None."""
        if batch.get("text_input") is None and batch.get("text_output") is None:
            return None
        inputs, outputs = batch_texts(batch, "text_input"), batch_texts(batch, "text_output")
        if len(inputs) != len(outputs):
            raise VLBridgeError(f"{len(inputs)} text_input but {len(outputs)} text_output in the batch")
        return [join_text(self.options.prompt, text) for text in inputs], outputs

    def prefix_pairs(self, captions: Sequence[str]) -> tuple[list[str], list[str]]:
        """Prefix LM: (prompt + the first 1..middle words, the remaining words) per caption."""
        split = prefix_lm_split(captions, self.generator)
        return [join_text(self.options.prompt, prefix) for prefix, _ in split], [rest for _, rest in split]

    def decoder_only_lm(self, who: str, llm: Any, visual: torch.Tensor, inputs: list[str], targets: list[str], cuts: TextCuts,
                        fixed_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[visual; BOS input target suffix]: labels only on target and suffix (pads and input are -100).
        Returns the loss and how many items it averages (target tokens, or samples); a batch whose
        every input filled max_text_tokens has no item: a zero loss over 0 items. `fixed_prompt`
        (every input is the objective's own prompt): then every batch would, which is an error.
        `who` names the LLM in errors."""
        limit = self.options.max_text_tokens
        texts = [join_text(prefix, target) + llm.caption_suffix for prefix, target in zip(inputs, targets)]
        ids, mask = tokenized(who, llm, texts, max_length=limit, padding_side="right")  # (B, T)
        labels = ids.masked_fill(mask.eq(0), IGNORE_INDEX)
        input_ids, input_mask = tokenized(who, llm, inputs, padding_side="right")
        check_placeholder_kept(ids, input_ids, getattr(llm, "image_token_id", None), limit)
        prefix_lengths = prompt_lengths(ids, input_ids, input_mask)  # (B,) with BOS
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        labels = labels.masked_fill(positions < prefix_lengths[:, None], IGNORE_INDEX)
        taught = labels.ne(IGNORE_INDEX).any(dim=1)  # (B,)
        cuts.add(cut_rows(llm, texts, limit, mask), ~taught)
        if fixed_prompt and not taught.any():
            raise VLBridgeError(f"no target token left: the prompt fills all {limit} text tokens; "
                                f"raise {SETTING} or shorten the prompt")
        output = llm(visual, ids, mask, labels=labels)
        aligned = aligned_labels(who, output, labels, visual.shape[1], IGNORE_INDEX)  # padding and input are -100 already
        if not taught.any():
            return no_target_loss(logits_of(who, output)), taught.sum()
        shifted = aligned[:, 1:]  # position t of the prompt predicts token t + 1
        if self.options.loss_average == "tokens":
            return lm_loss(who, output), shifted.ne(IGNORE_INDEX).sum()
        return per_sample_lm_loss(output.logits[:, :-1], shifted), samples_with_targets(shifted)

    def encoder_decoder_lm(self, who: str, llm: Any, visual: torch.Tensor, inputs: list[str], targets: list[str],
                           cuts: TextCuts) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder: [visual; input </s>]; decoder: target </s> (padded targets masked by the wrapper).
        Returns the loss and how many items it averages (target tokens, or samples); `who` names the LLM in errors."""
        limit = self.options.max_text_tokens
        ids, mask = tokenized(who, llm, inputs, max_length=limit, padding_side="right")
        target_ids, target_mask = tokenized(who, llm, targets, max_length=limit, padding_side="right")
        cut = cut_rows(llm, list(inputs), limit, mask) | cut_rows(llm, list(targets), limit, target_mask).to(mask.device)
        cuts.add(cut, target_mask.sum(dim=1).eq(0))  # the target keeps its </s>: always taught
        output = llm(visual, ids, mask, labels=target_ids, decoder_attention_mask=target_mask)
        logits = logits_of(who, output)
        labels = target_ids.to(logits.device).masked_fill(target_mask.to(logits.device).eq(0), IGNORE_INDEX)
        if self.options.loss_average == "tokens":
            return lm_loss(who, output), labels.ne(IGNORE_INDEX).sum()
        return per_sample_lm_loss(logits, labels), samples_with_targets(labels)  # the decoder's logit t predicts label t


def check_placeholder_kept(ids: torch.Tensor, input_ids: torch.Tensor, placeholder: int | None, limit: int) -> None:
    """A prompt template that places the visual tokens (LLaVA's `<image>`) must keep its placeholder
    within `max_text_tokens`: cut off, the row's visual tokens silently went first (or the batch failed)."""
    if placeholder is None:
        return
    lost = (input_ids.to(ids.device).eq(placeholder).any(dim=1) & ~ids.eq(placeholder).any(dim=1)).nonzero().flatten().tolist()
    if lost:
        raise VLBridgeError(f"the image placeholder of the prompt template lies past max_text_tokens {limit} in {len(lost)} "
                            f"text(s) of the batch (rows {lost[:5]}), so it would be cut off with the text after it; raise "
                            "the stage-2 objective's max_text_tokens (e.g. objective: {max_text_tokens: 256}) or shorten the prompt")


def samples_with_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many rows of (B, T) labels have a labelled token (what per_sample_lm_loss averages over)."""
    return labels.ne(IGNORE_INDEX).any(dim=1).sum()


# -- lookup ---------------------------------------------------------------------------------------

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Stage1Objective, Stage2Objective)}


def build_objective(name: str, generator: torch.Generator | None = None, **options: Any) -> Objective:
    """An objective by name ("stage1", "stage2") with its options."""
    if name not in OBJECTIVES:
        raise VLBridgeError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](generator=generator, **options)


def objective_for(model: "VLBridgeModel", generator: torch.Generator | None = None, **options: Any) -> Objective:
    """The objective of the model's current stage, checked against the model."""
    objective = build_objective(f"stage{model.stage}", generator, **options)
    objective.check(model)
    return objective
