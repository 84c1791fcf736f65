"""Registration of `hf-seq2seq`: any transformers AutoModelForSeq2SeqLM (declarations only, no torch).

T5, mT5, UL2, BART-style models; the visual prompt goes to the encoder and the loss is BLIP-2's
prefix-LM loss, as for `flan-t5`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugins.llms import hf_dims
from vlbridge.plugins.llms.flan_t5 import ARCH as T5_ARCH
from vlbridge.plugins.llms.hf_options import HFLLMOptions, weight_sources
from vlbridge.plugin.specs import LLMDims, LLMSpec, SizeEstimate

_T5 = T5_ARCH["tiny"]
# The model built when no `model` is given: the tiny FlanT5 layout, tokenized by its shipped tokenizer.
TINY_CONFIG: dict[str, Any] = {
    "model_type": "t5", "is_encoder_decoder": True, "d_model": _T5["d_model"], "d_ff": _T5["d_ff"], "num_heads": _T5["heads"],
    "d_kv": _T5["d_kv"], "num_layers": _T5["layers"], "num_decoder_layers": _T5["layers"], "vocab_size": _T5["vocab"],
    "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
}


class HFSeq2SeqOptions(HFLLMOptions):
    encoder_decoder: ClassVar[bool] = True
    plugin_name: ClassVar[str] = "hf-seq2seq"
    tiny_config: ClassVar[dict[str, Any]] = TINY_CONFIG


def dims(opts: HFSeq2SeqOptions) -> LLMDims:
    return hf_dims.dims(opts.config)


def num_params(opts: HFSeq2SeqOptions) -> int | SizeEstimate | None:
    return hf_dims.num_params(opts.config)


@hookimpl
def vlbridge_register_llms() -> list[LLMSpec]:
    return [
        LLMSpec(
            name="hf-seq2seq",
            description="any transformers encoder-decoder LM (T5, mT5, UL2, BART, ...) from a local directory or hub id; prefix-LM loss",
            factory="vlbridge.plugins.llms.hf_seq2seq_model:build",
            options=HFSeq2SeqOptions,
            dims=dims,
            num_params=num_params,
            weight_sources=weight_sources,
        )
    ]
