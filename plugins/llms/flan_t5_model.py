"""FlanT5 (encoder-decoder) as BLIP-2's frozen LLM: `[visual; text]` to the encoder, targets to the decoder.

T5 overflows in fp16 (its activations exceed 65504), so fp16 is refused; BLIP-2 runs it in bf16.
FlanT5 has an untied LM head and no decoder-output scaling. transformers 5 always ties T5's word
embeddings in a freshly built model (`T5Config` forces `tie_word_embeddings=True`, and keeps the
caller's `False` only as `scale_decoder_outputs=False`), so the `tiny` model unties its head by hand;
checkpoints that store both matrices load untied.
"""

from __future__ import annotations

from vlbridge.errors import VLBridgeError
from vlbridge.parts.freeze import torch_dtype
from vlbridge.plugins.llms.flan_t5 import FlanT5Options
from vlbridge.plugins.llms.flan_t5_tiny import tiny_model
from vlbridge.plugins.llms.loading import load_pretrained, tiny_tokenizer
from vlbridge.plugins.llms.hf_seq2seq_model import Seq2SeqLM


class FlanT5LLM(Seq2SeqLM):
    """Frozen `T5ForConditionalGeneration` whose encoder reads a soft visual prompt before the text."""

    family = "flan-t5"


def build(opts: FlanT5Options) -> FlanT5LLM:
    """The frozen FlanT5 of the options: `model` dir / hub id, the default hub id, or a random `tiny` one."""
    from transformers import T5ForConditionalGeneration

    if opts.dtype == "fp16":
        raise VLBridgeError("flan-t5: dtype fp16 is refused: T5 overflows in fp16 (inf/NaN activations); "
                            "use dtype: bf16 (as BLIP-2 does) or fp32")
    dtype = torch_dtype(opts.dtype)
    if opts.model is None and opts.variant == "tiny":
        tokenizer = tiny_tokenizer("flan-t5")
        model = tiny_model(tokenizer).to(dtype)
    else:
        model, tokenizer = load_pretrained("flan-t5", T5ForConditionalGeneration, opts.model, opts.variant, f"google/flan-t5-{opts.variant}", dtype)
    return FlanT5LLM(model, tokenizer)
