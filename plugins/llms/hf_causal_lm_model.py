"""Any transformers causal LM as the frozen LLM: the visual prompt enters through `inputs_embeds`.

Captions end with the tokenizer's end token (the `eos_token` option overrides it). Generation stops
where transformers' generate stops for the same folder, at every eos id of its generation config
(`stop_ids`), and at the caption end token too where that list lacks it. Training rows are packed with padding on the right and get explicit `position_ids`, so
models that number positions 0, 1, 2... whatever the mask (Llama, Qwen, Gemma, GPT-2) see the same
positions as for an unpadded prompt; generation pads on the left and transformers' generate derives
positions from the mask, as does the shared-prefix cache here. OPT (`opt_model`) specialises this.
"""

from __future__ import annotations

from typing import Any

import torch

from vlbridge.errors import VLBridgeError
from vlbridge.parts.freeze import torch_dtype
from vlbridge.plugins.llms.hf_causal_lm import HFCausalLMOptions
from vlbridge.plugins.llms.loading import check_vocab, load_pretrained, prompting, tiny_tokenizer
from vlbridge.plugins.llms.stop_ids import finished_pad_id, stop_ids
from vlbridge.plugins.llms.soft_prompt import PadSide, SoftPromptLLM, ignore_padding, positions_from_mask, takes_argument


class CausalLM(SoftPromptLLM):
    """A frozen decoder-only transformers model with a soft visual prompt (first, or at the placeholder)."""

    is_encoder_decoder = False
    family = "hf-causal-lm"
    generate_pad_side = "left"
    train_pad_side: PadSide | None = "right"  # where training rows put their padding (None: as the caller did)
    folder_stops = True  # stop at the generation config's eos ids too (OPT, as BLIP-2, stops at its end token alone)

    def __init__(self, model: Any, tokenizer: Any, *, end_token_id: int | None, caption_suffix: str, **prompting: Any) -> None:
        super().__init__(model, tokenizer, **prompting)
        self.caption_suffix = caption_suffix
        self.end_token_id = end_token_id
        self.explicit_positions = takes_argument(model, "position_ids")

    def forward(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None) -> Any:
        """Logits over the whole prompt, and with `labels` (aligned with `input_ids`) the mean shifted CE.

        Labels at padded positions are set to -100 here; the caller sets -100 on any prompt it does not
        want to train on; the visual positions never count. The output's `labels` are the labels as
        aligned with its logits (visual positions and packing included).
        """
        if decoder_attention_mask is not None:
            raise VLBridgeError(f"{self.family} is decoder-only: it has no decoder_attention_mask; pass the text mask as attention_mask")
        if labels is not None:
            labels = ignore_padding(labels.to(self.device), attention_mask.to(self.device))
        embeds, mask, labels = self.place_visual(visual_embeds, input_ids, attention_mask, labels, pad_side=self.train_pad_side)
        extra = {"position_ids": positions_from_mask(mask)} if self.explicit_positions else {}
        output = self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **extra)
        if labels is not None:
            output["labels"] = labels
        return output

    @property
    def stop_token_ids(self) -> list[int]:
        """The ids generation stops at: the folder's eos ids (transformers' own) and the caption end token."""
        if not self.folder_stops:
            return [self.end_token_id] if self.end_token_id is not None else []
        return stop_ids(self.model, self.end_token_id)

    def generation_defaults(self) -> dict[str, Any]:
        """Stop at every stop id (transformers' generate takes the list) and pad finished rows as it does."""
        defaults = super().generation_defaults()
        stops = self.stop_token_ids
        if not stops:
            return defaults
        pad = finished_pad_id(self.model, stops, defaults["pad_token_id"]) if self.folder_stops else defaults["pad_token_id"]
        return {**defaults, "pad_token_id": pad, "eos_token_id": stops if len(stops) > 1 else stops[0]}


def end_token(family: str, tokenizer: Any, override: str | None) -> tuple[str, int]:
    """(text, id) of the token that ends a caption: the override, else the tokenizer's eos_token."""
    text = override if override is not None else tokenizer.eos_token
    if not text:
        raise VLBridgeError(f"{family}: the tokenizer has no eos_token, so a caption has no end; set options.eos_token "
                            "to the token that ends a text for this model")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise VLBridgeError(f"{family}: the end token {text!r} tokenizes to {len(ids)} tokens {ids}; give options.eos_token "
                            "a single token of this tokenizer")
    return text, ids[0]


def tiny_model(tokenizer: Any) -> Any:
    """A random model of the `tiny` config (a small Llama) for tests; the shipped tokenizer fits its vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlbridge.plugins.llms.hf_causal_lm import TINY_CONFIG

    fields = {key: value for key, value in TINY_CONFIG.items() if key != "model_type"}
    config = AutoConfig.for_model(TINY_CONFIG["model_type"], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **fields)
    check_vocab("hf-causal-lm", tokenizer, config.vocab_size)
    return AutoModelForCausalLM.from_config(config)


def load(opts: HFCausalLMOptions) -> tuple[Any, Any]:
    """(model, tokenizer): the options' local directory or hub id, or the tiny random model."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(opts.dtype)
    if opts.model is None:
        tokenizer = tiny_tokenizer("opt")
        return tiny_model(tokenizer).to(dtype), tokenizer
    return load_pretrained("hf-causal-lm", AutoModelForCausalLM, opts.model, "", opts.model, dtype, pad_from_eos=True)


def build(opts: HFCausalLMOptions) -> CausalLM:
    """The frozen causal LM of the options, its tokenizer ready for visual placeholders and chat prompts."""
    model, tokenizer = load(opts)
    suffix, end_id = end_token("hf-causal-lm", tokenizer, opts.eos_token)
    return CausalLM(model, tokenizer, end_token_id=end_id, caption_suffix=suffix, **prompting("hf-causal-lm", tokenizer, opts))
