"""What every frozen LLM shares: a soft visual prompt put in front of the text embeddings.

BLIP-2 never feeds the connector's output through the LLM's vocabulary: the visual tokens are
vectors in the LLM's input-embedding space, concatenated before the embedded text. This module
holds that concatenation, the padding rules around it, the generation defaults and the wrapper
base class; `hf_causal_lm_model` and `hf_seq2seq_model` add what differs between decoder-only and
encoder-decoder models (`opt_model` and `flan_t5_model` specialise those two).

Where the visual prompt goes. By default (BLIP-2) it comes first: `[visual; text]`. A text may
instead hold the image placeholder token (`<image>`, LLaVA's) once: the visual tokens then replace
it in place, so `<s> USER: <image>\n...` becomes `<s> USER: [visual]\n...` as in LLaVA-1.5. Every
row of a batch must agree (all hold it once, or none does).

Padding rules. A decoder-only model generates after the last position, so for generation every row
is packed with its padding on the left: `[pad..., visual, text]`, whatever side the caller padded
the text on. T5's relative position bias measures distances, so pads between the visual prompt and
the text would change the encoder's output: its rows are packed with padding on the right,
`[visual, text, pad...]`, for training and generation. OPT's training forward keeps the caller's
order (labels stay aligned with logits); OPT derives positions from the attention mask, so pads in
the middle change nothing; models that count positions from 0 whatever the mask (Llama and most
others) get explicit `position_ids` wherever a prompt is padded on the left.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar, Literal, Sequence

import torch

from vlbridge.errors import VLBridgeError
from vlbridge.parts.freeze import FrozenPart
from vlbridge.plugins.llms.embed_scale import ids_only_scale

IGNORE_INDEX = -100  # the label value transformers' cross-entropy skips
DEFAULT_MAX_NEW_TOKENS = 30  # BLIP-2's caption length
_LENGTH_ALIASES = (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens"))
PadSide = Literal["left", "right"]


def prepend_visual(visual: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`[visual; text]` embeddings and `[ones; mask]`: the visual prompt is always attended to."""
    visual = visual.to(device=text_embeds.device, dtype=text_embeds.dtype)
    ones = attention_mask.new_ones(visual.shape[:2])
    return torch.cat([visual, text_embeds], dim=1), torch.cat([ones, attention_mask], dim=1)


def splice_visual(visual: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor, slots: torch.Tensor,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row's text with its placeholder at `slots[row]` replaced by the visual tokens (attended,
    labelled IGNORE_INDEX); every row grows by `visual tokens - 1`."""
    visual = visual.to(device=text_embeds.device, dtype=text_embeds.dtype)
    count = visual.shape[1]
    rows_e, rows_m, rows_l = [], [], []
    for row, slot in enumerate(slots.tolist()):
        rows_e.append(torch.cat([text_embeds[row, :slot], visual[row], text_embeds[row, slot + 1:]]))
        ones = attention_mask.new_ones(count)
        rows_m.append(torch.cat([attention_mask[row, :slot], ones, attention_mask[row, slot + 1:]]))
        if labels is not None:
            ignored = labels.new_full((count,), IGNORE_INDEX)
            rows_l.append(torch.cat([labels[row, :slot], ignored, labels[row, slot + 1:]]))
    return torch.stack(rows_e), torch.stack(rows_m), torch.stack(rows_l) if labels is not None else None


def pack_padding(embeds: torch.Tensor, attention_mask: torch.Tensor, side: PadSide, labels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Move every row's padded positions to one side, keeping the order of the real positions (and
    moving the labels, if given, with them)."""
    order = torch.sort(attention_mask.ne(0).long(), dim=1, descending=(side == "right"), stable=True).indices
    gathered = torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds))
    moved = torch.gather(labels, 1, order) if labels is not None else None
    return gathered, torch.gather(attention_mask, 1, order), moved


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2... over the attended positions of each row (0 on padding), as transformers' generate counts them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask.eq(0), 0)


def ignore_padding(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Labels with IGNORE_INDEX wherever the mask is 0, so padding never enters the loss."""
    if mask is None:
        return labels
    if labels.shape != mask.shape:
        raise VLBridgeError(f"labels {tuple(labels.shape)} and their attention mask {tuple(mask.shape)} must have the same shape")
    return labels.masked_fill(mask.eq(0), IGNORE_INDEX)


def takes_argument(model: Any, name: str) -> bool:
    """Whether the model's forward has a parameter of this name (transformers' models differ)."""
    return name in inspect.signature(model.forward).parameters


def check_generates_from_embeddings(model: Any, family: str) -> None:
    """transformers' generate takes `inputs_embeds` for a decoder-only model only where the model's
    `prepare_inputs_for_generation` names them (Bamba, Zamba, Falcon-H1, Nemotron-H, CTRL... do not),
    and the visual prompt has no other way in: refuse by name before transformers refuses it."""
    if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise VLBridgeError(f"{family}: transformers cannot generate from inputs_embeds with {type(model).__name__} ({kind!r}): "
                            "its prepare_inputs_for_generation takes none, and the visual prompt reaches the LLM only as input "
                            "embeddings, so this model can be trained on but cannot caption or answer; choose a model family "
                            "that generates from inputs_embeds (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, ...)")


def penalise_every_new_token(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`repetition_penalty` on every generated token of every row, as for an unpadded prompt.

    A decoder-only model generating from `inputs_embeds` has no prompt ids, yet transformers skips
    each row's leading padding in the ids it penalises (its prompt_ignore_length): the first tokens a
    left-padded row generates went unpenalised, so a batch generated otherwise than each prompt alone.
    The penalty goes in as a processor of our own instead, which transformers runs before its
    sampling warpers (temperature, top-k, top-p), as it runs its own."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    penalty = kwargs.get("repetition_penalty")
    given = LogitsProcessorList(kwargs.get("logits_processor") or [])
    if penalty is None or penalty == 1.0 or any(isinstance(p, RepetitionPenaltyLogitsProcessor) for p in given):
        return kwargs
    given.append(RepetitionPenaltyLogitsProcessor(penalty))
    return {**{k: v for k, v in kwargs.items() if k != "repetition_penalty"}, "logits_processor": given}


def merge_generation_kwargs(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The caller's settings over the defaults, with lengths counted in new tokens.

    transformers counts the embedded prompt in `max_length`/`min_length` for decoder-only models
    fed `inputs_embeds`, and the decoder start token for encoder-decoders; here `max_length` and
    `min_length` mean new tokens for every architecture (aliases of `max_new_tokens` and
    `min_new_tokens`), which is what BLIP-2's generate meant by them.
    """
    kwargs = dict(given)
    for alias, name in _LENGTH_ALIASES:
        if alias in kwargs:
            value = kwargs.pop(alias)
            if kwargs.get(name) is not None and value is not None:
                raise VLBridgeError(f"give {name} or {alias} (its alias: both count new tokens), not both")
            if value is not None:
                kwargs[name] = value
    for forbidden in ("inputs_embeds", "input_ids", "attention_mask"):
        if forbidden in kwargs:
            raise VLBridgeError(f"generate builds {forbidden} itself from the visual prompt and the text; drop {forbidden}=")
    for name, value in {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **defaults}.items():
        if kwargs.get(name) is None:
            kwargs[name] = value
    return kwargs


class SoftPromptLLM(FrozenPart):
    """A frozen transformers LLM that takes a soft visual prompt before its text (base class).

    `prompt_template` ("{}" = the prompt as given) and `chat` (render through the tokenizer's chat
    template, one user turn) decide how `format_prompt` turns a task prompt into the LLM's text;
    `image_token_id` is the placeholder token that marks where the visual prompt goes (None: first).
    """

    caption_suffix: str = ""
    is_encoder_decoder: ClassVar[bool] = False
    family: ClassVar[str] = "llm"  # the component name, for messages
    generate_pad_side: ClassVar[PadSide] = "left"
    explicit_positions: bool = False  # pass position_ids counted from the mask (for models that count from 0 regardless)

    def __init__(self, model: Any, tokenizer: Any, *, prompt_template: str = "{}", chat: bool = False,
                 image_token_id: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.chat = chat
        self.image_token_id = image_token_id
        self.text_scale = ids_only_scale(model)  # applied by the model to embedded ids only (Pegasus, Marian...)
        self.freeze()

    def format_prompt(self, text: str) -> str:
        """A task prompt ("", "Question: ... Short answer:") as this LLM reads it: through the
        prompt template, then (chat) the tokenizer's chat template with the generation prompt."""
        text = self.prompt_template.format(text)
        if not self.chat:
            return text
        messages = [{"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def embed_width(self) -> int:
        """Width of the input embeddings: where the visual prompt goes (before any projection). Read
        from the base layer: LoRA on the embeddings (peft's wrapper) has no `embedding_dim` of its own."""
        embeddings = self.model.get_input_embeddings()
        base = embeddings.get_base_layer() if hasattr(embeddings, "get_base_layer") else embeddings
        return base.embedding_dim

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> input embeddings, exactly what the model computes from ids itself (the image
        placeholder, which may lie outside the vocabulary, embeds as padding: it is replaced anyway)."""
        input_ids = input_ids.to(self.device)
        if self.image_token_id is not None:
            input_ids = input_ids.masked_fill(input_ids.eq(self.image_token_id), self.tokenizer.pad_token_id or 0)
        embeds = self.model.get_input_embeddings()(input_ids)
        return embeds if self.text_scale == 1.0 else embeds * self.text_scale

    def tokenize(self, texts: str | Sequence[str], *, max_length: int | None = None, padding_side: PadSide = "right",
                 add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids, attention_mask) padded to the longest, truncated to max_length if given.
        Chat-formatted texts carry their special tokens already, so none are added to them."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if padding_side not in ("left", "right"):
            raise VLBridgeError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        encoded = self.tokenizer(batch, padding="longest", truncation=max_length is not None, max_length=max_length,
                                 padding_side=padding_side, add_special_tokens=add_special_tokens and not self.chat,
                                 return_tensors="pt")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Token ids (B, L) -> texts, special tokens skipped and whitespace stripped."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(row) for row in ids]
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def visual_prompt(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pad_side: PadSide | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`[visual; embed(ids)]` (or the visual tokens in place of the placeholder) and its mask,
        optionally packed so padding sits on one side."""
        embeds, mask, _ = self.place_visual(visual_embeds, input_ids, attention_mask, pad_side=pad_side)
        return embeds, mask

    def place_visual(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor | None = None, pad_side: PadSide | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Embeddings, mask and (if given, aligned with `input_ids`) labels of the whole prompt: the
        visual tokens first or at the placeholder, never labelled; optionally packed to one side."""
        self._check_visual(visual_embeds, input_ids)
        attention_mask = attention_mask.to(self.device)
        labels = labels.to(self.device) if labels is not None else None
        text = self.embed_tokens(input_ids)
        slots = self._placeholder_slots(input_ids.to(self.device), attention_mask)
        if slots is None:
            embeds, mask = prepend_visual(visual_embeds, text, attention_mask)
            if labels is not None:
                labels = torch.cat([labels.new_full(visual_embeds.shape[:2], IGNORE_INDEX), labels], dim=1)
        else:
            embeds, mask, labels = splice_visual(visual_embeds, text, attention_mask, slots, labels)
        return (embeds, mask, labels) if pad_side is None else pack_padding(embeds, mask, pad_side, labels)

    def _placeholder_slots(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Where each row's image placeholder stands, or None when no row has one."""
        if self.image_token_id is None:
            return None
        hits = input_ids.eq(self.image_token_id) & attention_mask.ne(0)
        counts = hits.sum(dim=1)
        if not counts.any():
            return None
        if not counts.eq(1).all():
            raise VLBridgeError(f"{self.family}: each text must hold the image placeholder (token id {self.image_token_id}) "
                                f"exactly once, or no text of the batch may hold it; got counts {counts.tolist()}")
        return hits.long().argmax(dim=1)

    def generation_defaults(self) -> dict[str, Any]:
        """Settings used where the caller gives none (subclasses add their end token)."""
        return {"pad_token_id": self.tokenizer.pad_token_id}

    def new_tokens(self, sequences: torch.Tensor) -> torch.Tensor:
        """transformers' generate output -> the generated tokens only (subclasses strip what is not new)."""
        return sequences

    @torch.no_grad()
    def generate(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 **generation_kwargs: Any) -> torch.Tensor:
        """Generate after `[visual; text]` for a batch; returns the new token ids (B * num_return_sequences, L_new)."""
        if not self.is_encoder_decoder:
            check_generates_from_embeddings(self.model, self.family)
        embeds, mask = self.visual_prompt(visual_embeds, input_ids, attention_mask, self.generate_pad_side)
        kwargs = merge_generation_kwargs(generation_kwargs, self.generation_defaults())
        if not self.is_encoder_decoder:
            kwargs = penalise_every_new_token(kwargs)
        expand = kwargs.get("num_beams") or 1
        if expand == 1 and kwargs.get("do_sample"):
            expand = kwargs.get("num_return_sequences") or 1
        if not self.is_encoder_decoder and expand > 1 and embeds.shape[1] > 1 and "cache" not in kwargs:
            cache = self._shared_prefix_cache(embeds, mask, expand, room=kwargs["max_new_tokens"] + 1)
            if cache is not None:
                kwargs["cache"] = cache
        with warnings.catch_warnings():
            # With only inputs_embeds the prompt has no ids to penalise: BLIP-2 behaves the same.
            warnings.filterwarnings("ignore", message=".*with `inputs_embeds` and without `input_ids`.*")
            try:
                output = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            except ValueError as exc:  # RWKV's state: transformers refuses at the first beam step
                if "cannot be reordered" not in str(exc):
                    raise
                raise VLBridgeError(f"{self.family}: {type(self.model).__name__} cannot beam-search: transformers cannot reorder "
                                    "its cache between beams; generate with num_beams: 1") from exc
        sequences = output.sequences if hasattr(output, "sequences") else output
        return self.new_tokens(sequences)

    def _shared_prefix_cache(self, embeds: torch.Tensor, mask: torch.Tensor, expand: int, room: int) -> Any:
        """Run the prompt (all but its last position) once per image and give its key/value cache to
        every beam. transformers would run the whole prompt once per beam: with a 32-token visual
        prompt and 5 beams that is 5x the prefill work for the same numbers (outputs are identical).
        Where the cache is a plain DynamicCache, the beams get buffers with `room` positions to grow
        in place, whose reorders leave the shared prompt where it is (`beam_cache`). None where the
        model's cache cannot be handed over so (a recurrent state with no repeat, a model that returns
        none: Mamba, RecurrentGemma): transformers' beam search then runs the prompt per beam itself."""
        from vlbridge.plugins.llms.beam_cache import share_prompt

        extra = {"position_ids": positions_from_mask(mask[:, :-1])} if self.explicit_positions else {}
        if takes_argument(self.model, "logits_to_keep"):
            extra["logits_to_keep"] = 1  # the prompt's logits are never read: skip the vocabulary projection
        out = self.model(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **extra)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or share_prompt(cache, expand, room):
            return cache
        if not callable(getattr(cache, "batch_repeat_interleave", None)) or \
                not all(callable(getattr(layer, "batch_repeat_interleave", None)) for layer in getattr(cache, "layers", ())):
            return None
        cache.batch_repeat_interleave(expand)
        return cache

    def _check_visual(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Refuse a visual prompt the LLM cannot take, naming both shapes."""
        if visual_embeds.dim() != 3 or visual_embeds.shape[-1] != self.embed_width:
            raise VLBridgeError(f"{self.family}: the visual prompt must be (batch, tokens, {self.embed_width}), "
                                f"got {tuple(visual_embeds.shape)}")
        if visual_embeds.shape[0] != input_ids.shape[0]:
            raise VLBridgeError(f"{self.family}: {visual_embeds.shape[0]} visual prompts for {input_ids.shape[0]} texts; "
                                "give one per text")
