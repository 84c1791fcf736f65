"""Captioning, question answering and free generation with a built model, batched.

Defaults follow BLIP-2's evaluation settings: captions with 5 beams and up to 30 new tokens; VQA
with 5 beams, up to 10 new tokens, length penalty 0 (OPT) or -1 (FlanT5), prompt
"Question: {} Short answer:".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from vlbridge.errors import PluginError, VLBridgeError
from vlbridge.plugin.contract import describe, plugin_call, tokenized
from vlbridge.modeling.running import RunningModel, checked_batch_size, evaluating
from vlbridge.modeling.prompts import format_prompts, template_problem
from vlbridge.parts.images import as_image_list
from vlbridge.files.config_fields import StrictNumbers, did_you_mean

CLI_SETTINGS = ("max_new_tokens", "min_new_tokens", "num_beams", "repetition_penalty")  # what caption/ask take as --flags


class GenerationOptions(StrictNumbers):
    """Decoding settings; unknown names are an error rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(30, ge=1, description="most tokens to generate after the prompt")
    min_new_tokens: int = Field(1, ge=0, description="fewest tokens to generate before the end token may win")
    num_beams: int = Field(5, ge=1, description="beam width; 1 = greedy or sampling")
    do_sample: bool = Field(False, description="sample instead of searching")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass (sampling only)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (sampling only)")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeats")
    length_penalty: float = Field(1.0, description="beam-score length exponent; < 0 favours short outputs")
    num_return_sequences: int = Field(1, ge=1, description="outputs per image (<= num_beams when searching)")

    @model_validator(mode="after")
    def _lengths(self) -> "GenerationOptions":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}; "
                             "no output could satisfy both")
        unused = sorted({"top_p", "temperature"} & self.model_fields_set) if not self.do_sample else []
        if unused:
            raise ValueError(f"{' and '.join(unused)} shape sampling, and this call searches (do_sample is off), so "
                             f"{'they' if len(unused) > 1 else 'it'} would be ignored; add do_sample=True or drop "
                             f"{'them' if len(unused) > 1 else 'it'}")
        return self

    def as_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_dump()
        if not self.do_sample:
            kwargs.pop("top_p")
            kwargs.pop("temperature")
        if self.num_beams == 1:
            kwargs.pop("length_penalty")
        return kwargs


def _options(overrides: dict[str, Any], **defaults: Any) -> GenerationOptions:
    try:
        options = GenerationOptions(**{**defaults, **overrides})
    except ValidationError as exc:
        raise VLBridgeError(f"bad generation settings: {'; '.join(_setting_problem(err) for err in exc.errors())}") from None
    if "length_penalty" in overrides and options.num_beams == 1:  # a caller's own value, not a default, would be dropped
        raise VLBridgeError(f"bad generation settings: length_penalty {overrides['length_penalty']!r} scales beam scores by "
                            "length, and num_beams is 1 (no beams), so it would be ignored; give num_beams > 1 or drop "
                            "length_penalty")
    return options


def _setting_problem(err: Any) -> str:
    """One pydantic error as 'name (--flag): what is wrong (got value)', the CLI flag being the name's."""
    name = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if not name:  # a check across settings (min against max)
        return message
    if err["type"] == "extra_forbidden":
        return f"{name}: unknown setting; known: {', '.join(GenerationOptions.model_fields)}{did_you_mean(name, GenerationOptions.model_fields)}"
    got = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
    flag = f" (--{name.replace('_', '-')})" if name in CLI_SETTINGS else ""
    return f"{name}{flag}: {message}{got}"


def _per_image(value: str | Sequence[str] | None, count: int, what: str) -> list[str]:
    if value is None:
        return [""] * count
    if isinstance(value, str):
        return [value] * count
    if isinstance(value, (bytes, dict, set)) or not isinstance(value, Sequence):
        raise VLBridgeError(f"{what} must be a string or a list of strings (one per image), got a {type(value).__name__}")
    values = list(value)
    if len(values) != count:
        raise VLBridgeError(f"got {len(values)} {what} for {count} images; give one per image or a single one")
    wrong = [v for v in values if not isinstance(v, str)]
    if wrong:
        raise VLBridgeError(f"{what} must be strings, got a {type(wrong[0]).__name__} ({wrong[0]!r:.40}); "
                            "an image without one takes \"\"")
    return values


@torch.no_grad()
def generate_batched(model: RunningModel, images: Any, prompts: Sequence[str] | None, options: GenerationOptions,
                     batch_size: int = 16, image_embeds: torch.Tensor | None = None) -> list[str]:
    """Run the LLM on [visual prompt; text prompt] for each image; returns num_return_sequences texts per image.
    `image_embeds` (N, T, W): the frozen encoder's outputs for the N images, computed before (then
    `images` is ignored), so an evaluation that asks several questions per image encodes it once."""
    batch_size = checked_batch_size(batch_size)
    if model.llm is None:
        raise VLBridgeError("this model was built for stage 1 and has no LLM, so it cannot generate text; a stage-1 checkpoint "
                            "never trained its projection into the LLM: train stage 2 from it (init_from), or build the "
                            "assembly with stage=2")
    count = len(image_embeds) if image_embeds is not None else None
    items = as_image_list(images) if image_embeds is None else None
    instructions = _per_image(prompts, count if items is None else len(items), "prompts")  # what a connector may read
    who = describe(model.plan.llm)
    texts = format_prompts(who, model.llm, instructions)  # what the LLM reads
    if options.num_return_sequences > options.num_beams and not options.do_sample:
        raise VLBridgeError(f"num_return_sequences {options.num_return_sequences} exceeds num_beams {options.num_beams}")
    outputs: list[str] = []
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            if items is not None:
                visual = model.visual_tokens(model.pixel_values(items[start:start + batch_size]),
                                             instructions=instructions[start:start + batch_size])
            else:
                visual = model.visual_tokens(image_embeds=image_embeds[start:start + batch_size].to(model.device),
                                             instructions=instructions[start:start + batch_size])
            ids, mask = tokenized(who, model.llm, texts[start:start + batch_size], padding_side="left")
            _check_context(model, visual.shape[1] + ids.shape[1], options.max_new_tokens)
            new_tokens = model.llm.generate(visual, ids.to(model.device), mask.to(model.device), **options.as_kwargs())
            outputs.extend(_decoded(model, new_tokens, visual.shape[0] * options.num_return_sequences, options.max_new_tokens))
    return outputs


def _decoded(model: RunningModel, new_tokens: Any, rows: int, max_new_tokens: int) -> list[str]:
    """The LLM plugin's generate and decode, held to the guide's interface (5.4): a (rows, L) tensor of
    new ids, then one string per row. A decode that returned one string was read as one caption per
    character, silently; a generate that returned the prompt too answered with the question."""
    who = describe(model.plan.llm)
    if not (isinstance(new_tokens, torch.Tensor) and new_tokens.dim() == 2 and new_tokens.shape[0] == rows):
        shown = f"shape {tuple(new_tokens.shape)}" if isinstance(new_tokens, torch.Tensor) else f"a {type(new_tokens).__name__}"
        raise PluginError(f"{who}: generate returned {shown}; it must return the new token ids, a ({rows}, length) tensor "
                          "(batch x num_return_sequences rows)")
    check_new_tokens(who, new_tokens, max_new_tokens)
    texts = plugin_call(who, "decode(token_ids)", model.llm.decode, new_tokens)
    if not (isinstance(texts, (list, tuple)) and len(texts) == rows and all(isinstance(text, str) for text in texts)):
        shown = f"{len(texts)} items" if isinstance(texts, (list, tuple)) else f"a {type(texts).__name__}"
        raise PluginError(f"{who}: decode(token_ids) returned {shown}; it must return a list of {rows} strings, one per row")
    return list(texts)


def check_new_tokens(who: str, new_tokens: torch.Tensor, max_new_tokens: int) -> None:
    """generate returns the new tokens only (an encoder-decoder's may start with its decoder start token):
    more columns than that means it returned the prompt's ids too, which decode would read as output."""
    if new_tokens.shape[1] > max_new_tokens + 1:
        raise PluginError(f"{who}: generate returned {new_tokens.shape[1]} tokens per row for max_new_tokens={max_new_tokens}; "
                          "it must return the new token ids only, not the prompt's input_ids before them")


def hard_context(model: RunningModel) -> int | None:
    """The positions a decoder-only LLM has where they are a hard limit (absolute position embeddings
    have no row past them: a forward there fails deep inside with an index error); None otherwise."""
    dims = model.plan.llm_dims
    if dims is None or dims.encoder_decoder or not dims.context_is_hard:
        return None
    return dims.context_length


def _check_context(model: RunningModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a decoder-only generation that would run past the LLM's positions."""
    context = hard_context(model)
    if context is not None and prompt_tokens + max_new_tokens > context:
        room = context - prompt_tokens
        fix = f"lower max_new_tokens (--max-new-tokens) to at most {room}" if room > 0 else "shorten the prompt"
        raise VLBridgeError(f"the prompt ({prompt_tokens} tokens, visual tokens included) plus max_new_tokens {max_new_tokens} "
                            f"exceeds the LLM's context of {context} positions; {fix}")


def generate(model: RunningModel, images: Any, prompt: str | Sequence[str] | None = None, **generation: Any) -> list[str]:
    """Free generation with explicit settings (defaults: greedy, 30 new tokens)."""
    batch_size = generation.pop("batch_size", 16)
    return generate_batched(model, images, prompt, _options(generation, num_beams=1), batch_size)


def caption(model: RunningModel, images: Any, prompt: str | Sequence[str] | None = None, **generation: Any) -> list[str]:
    """Describe each image (BLIP-2 defaults: 5 beams, up to 30 new tokens)."""
    batch_size = generation.pop("batch_size", 16)
    return generate_batched(model, images, prompt, caption_options(generation), batch_size)


def caption_options(generation: dict[str, Any]) -> GenerationOptions:
    """Captioning's decoding settings: BLIP-2's defaults under `generation`."""
    return _options(generation)


def answer(model: RunningModel, images: Any, questions: str | Sequence[str], prompt: str = "Question: {} Short answer:",
           **generation: Any) -> list[str]:
    """Zero-shot VQA: one question per image, formatted into the prompt."""
    if not isinstance(prompt, str):
        raise VLBridgeError(f"the VQA prompt must be a string with {{}} where the question goes, e.g. "
                            f"'Question: {{}} Short answer:'; got a {type(prompt).__name__}")
    problem = template_problem(prompt, "the VQA prompt")
    if problem:
        raise VLBridgeError(problem)
    if questions is None:
        raise VLBridgeError("answer needs questions: one string for every image, or one per image")
    batch_size = generation.pop("batch_size", 16)
    items = as_image_list(images)  # listed once: a generator of images counted here would be empty below
    asked = _per_image(questions, len(items), "questions")
    empty = [i for i, q in enumerate(asked) if not q.strip()]
    if empty:
        raise VLBridgeError(f"question {empty[0] + 1} is empty; give a question for every image")
    formatted = [prompt.format(q) for q in asked]
    return generate_batched(model, items, formatted, answer_options(model, generation), batch_size)


def answer_options(model: RunningModel, generation: dict[str, Any]) -> GenerationOptions:
    """VQA's decoding settings: BLIP-2's defaults (length penalty by LLM kind) under `generation`."""
    encoder_decoder = model.llm is not None and model.llm.is_encoder_decoder
    return _options(generation, max_new_tokens=10, length_penalty=-1.0 if encoder_decoder else 0.0)
