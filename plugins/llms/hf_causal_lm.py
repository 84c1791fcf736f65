"""Registration of `hf-causal-lm`: any transformers AutoModelForCausalLM (declarations only, no torch).

Llama, Mistral, Qwen2/2.5/3, Gemma, Phi, SmolLM, GPT-2, OPT...: the shape comes from the model's own
config.json (`vlbridge.plugins.llms.hf_dims`), read before anything loads.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugins.llms import hf_dims
from vlbridge.plugins.llms.hf_options import HFLLMOptions, weight_sources
from vlbridge.plugins.tiny_assets import tiny_llm_vocab
from vlbridge.plugin.specs import LLMDims, LLMSpec, SizeEstimate

# The model built when no `model` is given: a tiny random Llama, tokenized by the shipped tiny tokenizer.
TINY_CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": tiny_llm_vocab("opt"), "max_position_embeddings": 256, "tie_word_embeddings": False,
}


class HFCausalLMOptions(HFLLMOptions):
    eos_token: str | None = Field(None, description="the token that ends a caption in training; generation stops at it and at every eos id of the folder's generation config; default: the tokenizer's eos_token")

    plugin_name: ClassVar[str] = "hf-causal-lm"
    tiny_config: ClassVar[dict[str, Any]] = TINY_CONFIG


def dims(opts: HFCausalLMOptions) -> LLMDims:
    return hf_dims.dims(opts.config)


def num_params(opts: HFCausalLMOptions) -> int | SizeEstimate | None:
    return hf_dims.num_params(opts.config)


@hookimpl
def vlbridge_register_llms() -> list[LLMSpec]:
    return [
        LLMSpec(
            name="hf-causal-lm",
            description="any transformers causal LM (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, ...) from a local directory or hub id; plain or chat prompts",
            factory="vlbridge.plugins.llms.hf_causal_lm_model:build",
            options=HFCausalLMOptions,
            dims=dims,
            num_params=num_params,
            weight_sources=weight_sources,
        )
    ]
