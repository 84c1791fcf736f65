"""Registration of `flan-t5`: T5ForConditionalGeneration through transformers (declarations only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugin.sources import WeightSource, local_or_hub
from vlbridge.files.hf_config import local_config
from vlbridge.plugins.tiny_assets import tiny_llm_vocab
from vlbridge.plugin.specs import LLMDims, LLMSpec, Options, Precision

# From the released google/flan-t5-* config.json files (gated-GELU FFN, untied LM head).
ARCH: dict[str, dict[str, int]] = {
    "small": {"d_model": 512, "d_ff": 1024, "heads": 6, "d_kv": 64, "layers": 8, "vocab": 32128},
    "base": {"d_model": 768, "d_ff": 2048, "heads": 12, "d_kv": 64, "layers": 12, "vocab": 32128},
    "large": {"d_model": 1024, "d_ff": 2816, "heads": 16, "d_kv": 64, "layers": 24, "vocab": 32128},
    "xl": {"d_model": 2048, "d_ff": 5120, "heads": 32, "d_kv": 64, "layers": 24, "vocab": 32128},
    "xxl": {"d_model": 4096, "d_ff": 10240, "heads": 64, "d_kv": 64, "layers": 24, "vocab": 32128},
    "tiny": {"d_model": 64, "d_ff": 128, "heads": 4, "d_kv": 16, "layers": 2, "vocab": tiny_llm_vocab("flan-t5")},
}
CONTEXT = 512  # the length T5 was trained on; relative positions make it a soft limit
RELATIVE_BUCKETS = 32


class FlanT5Options(Options):
    variant: Literal["small", "base", "large", "xl", "xxl", "tiny"] = Field("xl", description="model size; 'tiny' is a small random-weight model with a shipped tokenizer (no download); a local model directory's config.json replaces it")
    model: str | None = Field(None, description="local directory or hub id of the weights and tokenizer; default google/flan-t5-<variant>. A local directory's config.json decides the architecture")
    dtype: Precision = Field("fp32", description="dtype of the frozen LLM (BLIP-2 uses bf16; never fp16 for T5)")

    @model_validator(mode="after")
    def _check_model(self) -> "FlanT5Options":
        config = local_config(self.model)
        if config is not None and config.get("model_type") != "t5":
            raise ValueError(f"{self.model} holds a {config.get('model_type')!r} model, not T5")
        return self

    @property
    def arch(self) -> dict[str, int]:
        config = local_config(self.model)
        if config is None:
            return ARCH[self.variant]
        return {
            "d_model": config["d_model"], "d_ff": config["d_ff"], "heads": config["num_heads"], "d_kv": config["d_kv"],
            "layers": config["num_layers"], "vocab": config["vocab_size"],
        }


def dims(opts: FlanT5Options) -> LLMDims:
    a = opts.arch
    return LLMDims(embed_width=a["d_model"], context_length=CONTEXT, encoder_decoder=True, context_is_hard=False, vocab_size=a["vocab"])


def num_params(opts: FlanT5Options) -> int:
    a = opts.arch
    d, inner, ff = a["d_model"], a["heads"] * a["d_kv"], a["d_ff"]
    attention = 4 * d * inner + d  # q, k, v, o (no bias) + RMS norm
    ffn = 3 * d * ff + d  # wi_0, wi_1, wo + RMS norm
    encoder = a["layers"] * (attention + ffn) + RELATIVE_BUCKETS * a["heads"] + d
    decoder = a["layers"] * (2 * attention + ffn) + RELATIVE_BUCKETS * a["heads"] + d
    return 2 * a["vocab"] * d + encoder + decoder  # shared embedding + untied lm_head


def weight_sources(opts: FlanT5Options, stage: int) -> list[WeightSource]:
    """`model`, by default google/flan-t5-<variant> from the hub; the tiny variant without one loads nothing."""
    default = None if opts.variant == "tiny" else f"google/flan-t5-{opts.variant}"
    return local_or_hub("model", opts.model or default, default=not opts.model)


@hookimpl
def vlbridge_register_llms() -> list[LLMSpec]:
    return [
        LLMSpec(
            name="flan-t5",
            description="Google's FlanT5 (small to xxl), encoder-decoder; the visual prompt goes to the encoder",
            factory="vlbridge.plugins.llms.flan_t5_model:build",
            options=FlanT5Options,
            dims=dims,
            num_params=num_params,
            weight_sources=weight_sources,
        )
    ]
