"""Any transformers encoder-decoder LM as the frozen LLM: `[visual; text]` to the encoder, targets to the decoder.

The encoder's rows are packed with padding on the right (T5's relative positions measure distances,
so pads between the visual prompt and the text would change its output); the tokenizer ends texts
itself (T5's and BART's append </s>), so captions get no suffix. FlanT5 (`flan_t5_model`) specialises this.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from vlbridge.errors import VLBridgeError
from vlbridge.parts.freeze import torch_dtype
from vlbridge.plugins.llms.flan_t5_tiny import tiny_model
from vlbridge.plugins.llms.hf_seq2seq import HFSeq2SeqOptions
from vlbridge.plugins.llms.loading import load_pretrained, prompting, tiny_tokenizer
from vlbridge.plugins.llms.soft_prompt import SoftPromptLLM, ignore_padding


class Seq2SeqLM(SoftPromptLLM):
    """A frozen encoder-decoder transformers model whose encoder reads a soft visual prompt."""

    caption_suffix = ""  # the tokenizer appends </s> itself
    is_encoder_decoder = True
    family = "hf-seq2seq"
    generate_pad_side = "right"

    def forward(self, visual_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None) -> Any:
        """Decoder logits for `labels` given `[visual; text]`, and the mean CE over the labelled tokens.

        `labels` are the target ids (the decoder's inputs are them shifted right); where
        `decoder_attention_mask` is 0 they are set to -100 here, so padded targets never count.
        """
        if labels is None:
            raise VLBridgeError(f"{self.family} is encoder-decoder: forward needs labels (the target ids the decoder reads, "
                                "shifted right) and their decoder_attention_mask")
        embeds, mask = self.visual_prompt(visual_embeds, input_ids, attention_mask, pad_side="right")
        labels = labels.to(self.device)
        if decoder_attention_mask is not None:
            decoder_attention_mask = decoder_attention_mask.to(self.device)
        labels = ignore_padding(labels, decoder_attention_mask)
        return self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                          decoder_attention_mask=decoder_attention_mask)

    def new_tokens(self, sequences: torch.Tensor) -> torch.Tensor:
        """Drop the decoder start token that transformers puts first in every encoder-decoder output."""
        return sequences[:, 1:]


def build(opts: HFSeq2SeqOptions) -> Seq2SeqLM:
    """The frozen encoder-decoder LM of the options: a local directory or hub id, or the tiny random T5."""
    from transformers import AutoModelForSeq2SeqLM

    dtype = torch_dtype(opts.dtype)
    if opts.model is None:
        tokenizer = tiny_tokenizer("flan-t5")
        model = tiny_model(tokenizer).to(dtype)
    else:
        model, tokenizer = load_pretrained("hf-seq2seq", AutoModelForSeq2SeqLM, opts.model, "", opts.model, dtype, pad_from_eos=True)
    check_encoder_reads_embeddings(model)
    return Seq2SeqLM(model, tokenizer, **prompting("hf-seq2seq", tokenizer, opts))


def check_encoder_reads_embeddings(model: Any) -> None:
    """The visual prompt enters the encoder as `inputs_embeds`; an encoder whose forward requires
    `input_ids` (FSMT's, which derives its positions from them) cannot read it."""
    given = inspect.signature(model.get_encoder().forward).parameters.get("input_ids")
    if given is not None and given.default is inspect.Parameter.empty:
        raise VLBridgeError(f"hf-seq2seq: {type(model).__name__}'s encoder needs input_ids (its forward has no default for them), "
                            "so it cannot read the visual prompt, which enters as inputs_embeds; choose an encoder-decoder "
                            "model whose encoder takes inputs_embeds alone (T5, BART, mBART, Pegasus, ...)")
