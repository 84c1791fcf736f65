"""Registration of `opt`: OPTForCausalLM through transformers, decoder-only (declarations only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugin.sources import WeightSource, local_or_hub
from vlbridge.files.hf_config import local_config
from vlbridge.plugins.tiny_assets import tiny_llm_vocab
from vlbridge.plugin.specs import LLMDims, LLMSpec, Options, Precision

# From the released config.json files. OPT-350m embeds tokens at 512 and projects in/out of 1024,
# and normalises after (not before) each block, so it has no final LayerNorm.
ARCH: dict[str, dict[str, int]] = {
    "125m": {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, "embed": 768, "vocab": 50272, "positions": 2048, "pre_norm": 1},
    "350m": {"hidden": 1024, "layers": 24, "heads": 16, "ffn": 4096, "embed": 512, "vocab": 50272, "positions": 2048, "pre_norm": 0},
    "1.3b": {"hidden": 2048, "layers": 24, "heads": 32, "ffn": 8192, "embed": 2048, "vocab": 50272, "positions": 2048, "pre_norm": 1},
    "2.7b": {"hidden": 2560, "layers": 32, "heads": 32, "ffn": 10240, "embed": 2560, "vocab": 50272, "positions": 2048, "pre_norm": 1},
    "6.7b": {"hidden": 4096, "layers": 32, "heads": 32, "ffn": 16384, "embed": 4096, "vocab": 50272, "positions": 2048, "pre_norm": 1},
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "ffn": 256, "embed": 64, "vocab": tiny_llm_vocab("opt"), "positions": 128, "pre_norm": 1},
}


class OPTOptions(Options):
    variant: Literal["125m", "350m", "1.3b", "2.7b", "6.7b", "tiny"] = Field("2.7b", description="model size; 'tiny' is a small random-weight model with a shipped tokenizer (no download); a local model directory's config.json replaces it")
    model: str | None = Field(None, description="local directory or hub id of the weights and tokenizer; default facebook/opt-<variant>. A local directory's config.json decides the architecture")
    dtype: Precision = Field("fp32", description="dtype of the frozen LLM (BLIP-2 uses fp16)")
    eos_token: str | None = Field(None, description="the token that ends a caption in training and stops generation; default "
                                  "'\\n', as BLIP-2's OPT models (an import sets the one its checkpoint's config stops at)")

    @model_validator(mode="after")
    def _check_model(self) -> "OPTOptions":
        config = local_config(self.model)
        if config is not None and config.get("model_type") != "opt":
            raise ValueError(f"{self.model} holds a {config.get('model_type')!r} model, not OPT")
        return self

    @property
    def arch(self) -> dict[str, int]:
        config = local_config(self.model)
        return ARCH[self.variant] if config is None else arch_of(config)


def arch_of(config: dict) -> dict[str, int]:
    """The architecture numbers of an OPT config.json (also what `hf-causal-lm` counts an OPT by)."""
    hidden = config["hidden_size"]
    return {
        "hidden": hidden, "layers": config["num_hidden_layers"], "heads": config["num_attention_heads"],
        "ffn": config["ffn_dim"], "embed": config.get("word_embed_proj_dim") or hidden,
        "vocab": config["vocab_size"], "positions": config["max_position_embeddings"],
        "pre_norm": int(config.get("do_layer_norm_before", True)),
    }


def dims(opts: OPTOptions) -> LLMDims:
    a = opts.arch
    return LLMDims(embed_width=a["embed"], context_length=a["positions"], encoder_decoder=False, vocab_size=a["vocab"])


def num_params(opts: OPTOptions) -> int:
    return count_params(opts.arch)


def count_params(a: dict[str, int]) -> int:
    """OPT's parameters from its architecture numbers (checked against the built modules in tests)."""
    h, f, e = a["hidden"], a["ffn"], a["embed"]
    embeddings = a["vocab"] * e + (a["positions"] + 2) * h  # OPT offsets learned positions by 2
    projections = 2 * e * h if e != h else 0  # project_in / project_out, no bias
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    return embeddings + projections + a["layers"] * layer + (2 * h if a["pre_norm"] else 0)  # lm_head is tied


def weight_sources(opts: OPTOptions, stage: int) -> list[WeightSource]:
    """`model`, by default facebook/opt-<variant> from the hub; the tiny variant without one loads nothing."""
    default = None if opts.variant == "tiny" else f"facebook/opt-{opts.variant}"
    return local_or_hub("model", opts.model or default, default=not opts.model)


@hookimpl
def vlbridge_register_llms() -> list[LLMSpec]:
    return [
        LLMSpec(
            name="opt",
            description="Meta's OPT (125m to 6.7b), decoder-only; the visual prompt goes before the text",
            factory="vlbridge.plugins.llms.opt_model:build",
            options=OPTOptions,
            dims=dims,
            num_params=num_params,
            weight_sources=weight_sources,
        )
    ]
