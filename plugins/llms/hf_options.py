"""Options shared by the generic transformers LLM plugins (`hf-causal-lm`, `hf-seq2seq`), torch-free."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vlbridge.files.hf_config import model_config
from vlbridge.plugin.sources import WeightSource, local_or_hub
from vlbridge.modeling.prompts import template_problem
from vlbridge.plugin.specs import Options, Precision

MULTIMODAL = {"llava": "vlbridge import hf-llava", "blip-2": "vlbridge import hf-blip2"}


class HFLLMOptions(Options):
    """Which model, in which dtype, and how a task prompt becomes the LLM's text."""

    model: str | None = Field(None, description="local directory written by save_pretrained (config.json, weights, tokenizer), or a hub id where the hub is reachable; none = a tiny random model with a shipped tokenizer, for tests (no download)")
    dtype: Precision = Field("fp32", description="dtype of the frozen LLM")
    prompt_format: Literal["plain", "chat"] = Field("plain", description="plain: the prompt as given, visual tokens first (BLIP-2); chat: the tokenizer's chat template, one user turn holding the visual tokens (LLaVA-1.5, instruction-tuned models)")
    prompt_template: str | None = Field(None, description="format string applied to each prompt, '{}' where the prompt goes and the image token where the visual tokens go, e.g. LLaVA-1.5's 'USER: <image>\\n{} ASSISTANT:'; default '{}' (plain) or '<image>\\n{}' (chat)")
    image_token: str | None = Field("<image>", description="placeholder text marking where the visual tokens go (added to the tokenizer if it lacks it); a text without it gets them first; null = always first")

    encoder_decoder: ClassVar[bool] = False
    plugin_name: ClassVar[str] = "hf"
    tiny_config: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check(self) -> "HFLLMOptions":
        if self.prompt_template is not None:
            problem = template_problem(self.prompt_template, "prompt_template", "USER: <image>\n{} ASSISTANT:")
            if problem:
                raise ValueError(problem)
            if self.image_token is not None and self.prompt_template.count(self.image_token) > 1:
                raise ValueError(f"prompt_template holds the image token {self.image_token!r} more than once; one image, one placeholder")
        if self.model is None:
            return self
        config = self.config
        kind = config.get("model_type")
        if kind in MULTIMODAL:
            raise ValueError(f"{self.model} holds a multimodal {kind!r} model; turn it into a vlbridge assembly with "
                             f"`{MULTIMODAL[kind]} {self.model} OUT`")
        if isinstance(config.get("vision_config"), dict):  # Gemma 3 (4b and up), Qwen2-VL, PaliGemma, Mistral 3...
            raise ValueError(f"{self.model} holds a multimodal {kind!r} model (its config has a vision_config): {self.plugin_name} "
                             "takes a text-only LLM, and transformers' generate refuses inputs_embeds for many such models; "
                             "give a text-only checkpoint, or save the language model alone with save_pretrained")
        if bool(config.get("is_encoder_decoder", False)) != self.encoder_decoder:
            other = "hf-seq2seq" if not self.encoder_decoder else "hf-causal-lm"
            what = "an encoder-decoder" if not self.encoder_decoder else "a decoder-only"
            raise ValueError(f"{self.model} holds {what} model ({kind!r}); use the {other} LLM")
        return self

    @property
    def config(self) -> dict[str, Any]:
        """The model's config.json (local, cached or known), or the tiny model's."""
        return dict(self.tiny_config) if self.model is None else model_config(self.model)

    @property
    def resolved_template(self) -> str:
        if self.prompt_template is not None:
            return self.prompt_template
        return "{}" if self.prompt_format == "plain" or self.image_token is None else self.image_token + "\n{}"


def weight_sources(opts: HFLLMOptions, stage: int) -> list[WeightSource]:
    """`model`, a local directory or hub id; without one the tiny random model loads nothing."""
    return local_or_hub("model", opts.model)
