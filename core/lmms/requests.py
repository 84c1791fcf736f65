"""lmms-eval's requests as plain records: the image, the task's text and the generation settings.

lmms-eval hands a model `Instance.args` tuples whose shape depends on the request type; this module
reads them once, so the model class only computes. What a vlbridge model cannot answer (no image,
several images, a video, an unconditional text-only likelihood) is refused here with the task's
name and what is missing: a wrong answer would look like a real score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlbridge.errors import VLBridgeError

IMAGE_TAG = "<image>"  # llava-style tasks mark the image in the text; vlbridge places the visual prompt itself
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
# generation_kwargs lmms-eval tasks set for other models' code paths; they do not change a vlbridge answer
IGNORED_KWARGS = ("image_aspect_ratio", "modalities", "use_cache", "image_sizes", "stopping_criteria")
GENERATION_KEYS = ("num_beams", "top_p", "length_penalty", "repetition_penalty", "min_new_tokens")


class TaskRefused(VLBridgeError):
    """A request a vlbridge model cannot answer as it is (named task, what is missing)."""


@dataclass
class Request:
    """One request: the image, the task's text and either generation settings or a continuation."""

    task: str
    doc_id: Any
    image: Any
    text: str
    until: list[str] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    continuation: str | None = None
    ignored: list[str] = field(default_factory=list)  # generation_kwargs for other models' code paths


def clean_text(context: str) -> str:
    """The task's text without llava-style image tags (the visual prompt goes where the LLM puts it)."""
    return context.replace(IMAGE_TAG, "").strip() if IMAGE_TAG in context else context


def one_image(task: str, doc_id: Any, visuals: Any) -> Any:
    """The request's single image (PIL or a file path); anything else is refused by name."""
    items = [] if visuals is None else list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    if not items:
        raise TaskRefused(f"lmms-eval task {task!r} (doc {doc_id}) gives no image; a vlbridge model answers about one "
                          "image per prompt, so text-only tasks are not supported")
    if len(items) > 1:
        raise TaskRefused(f"lmms-eval task {task!r} (doc {doc_id}) gives {len(items)} images in one request; a vlbridge "
                          "model reads one image per prompt (its connector was trained that way), so multi-image tasks "
                          "are not supported: use a single-image task")
    image = items[0]
    if isinstance(image, (str, Path)) and str(image).lower().endswith(VIDEO_SUFFIXES):
        raise TaskRefused(f"lmms-eval task {task!r} (doc {doc_id}) gives a video ({image}); vlbridge models read images only")
    if isinstance(image, dict) or not (isinstance(image, (str, Path)) or hasattr(image, "convert")):
        raise TaskRefused(f"lmms-eval task {task!r} (doc {doc_id}) gives a {type(image).__name__} as its visual; "
                          "expected a PIL image or an image file path")
    if not hasattr(image, "convert"):
        return str(image)
    from vlbridge.parts.images import to_rgb  # torchvision: only where there is an image to convert

    return to_rgb(image, f"the visual of lmms-eval task {task!r} (doc {doc_id})")


def generation_settings(task: str, kwargs: dict[str, Any] | None, max_new_tokens: int) -> tuple[list[str], dict[str, Any], list[str]]:
    """(stop strings, GenerationOptions fields, ignored keys) from a task's generation_kwargs.

    temperature 0 (or none) with no do_sample is greedy (beam search with num_beams > 1);
    a temperature above 0 samples unless do_sample is false."""
    given = dict(kwargs or {})
    until = given.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(stop, str) for stop in until):
        raise TaskRefused(f"lmms-eval task {task!r}: generation_kwargs.until must be a string or a list of strings, got {until!r}")
    temperature = float(given.pop("temperature", 0.0) or 0.0)
    do_sample = bool(given.pop("do_sample", temperature > 0))
    out: dict[str, Any] = {"max_new_tokens": int(given.pop("max_new_tokens", given.pop("max_gen_toks", max_new_tokens))),
                           "num_beams": 1, "do_sample": do_sample}
    if do_sample:
        if temperature <= 0:
            raise TaskRefused(f"lmms-eval task {task!r} asks to sample (do_sample: true) at temperature {temperature}; "
                              "give a temperature above 0, or do_sample: false for greedy decoding")
        out["temperature"] = temperature
    for key in GENERATION_KEYS:
        value = given.pop(key, None)
        if value is not None:
            out[key] = value
    if out.get("top_p") is not None and not do_sample:
        out.pop("top_p")  # a nucleus for greedy decoding means nothing; tasks set it regardless
    ignored = sorted(given)
    unknown = [key for key in ignored if key not in IGNORED_KWARGS]
    if unknown:
        raise TaskRefused(f"lmms-eval task {task!r}: generation_kwargs {unknown} are not decoding settings vlbridge knows; "
                          f"it reads until, max_new_tokens, temperature, do_sample, {', '.join(GENERATION_KEYS)}")
    return until, out, ignored


def stop_at(text: str, until: list[str]) -> str:
    """The text up to the first stop string (as lmms-eval's models cut their answers)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def read_generation(args: tuple, task_docs: Callable[[str, str], Any], max_new_tokens: int) -> Request:
    """(context, generation_kwargs, doc_to_visual, doc_id, task, split) -> Request."""
    context, kwargs, doc_to_visual, doc_id, task, split = args
    doc = task_docs(task, split)[doc_id]
    until, generation, ignored = generation_settings(task, kwargs, max_new_tokens)
    return Request(task, doc_id, one_image(task, doc_id, doc_to_visual(doc)), clean_text(context), until, generation,
                   ignored=ignored)


def read_likelihood(args: tuple, task_docs: Callable[[str, str], Any]) -> Request:
    """(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split) -> Request."""
    if len(args) != 6:
        raise TaskRefused(f"an lmms-eval loglikelihood request without an image ({args[:2]!r}): a task asking for "
                          "unconditional likelihoods (acc_mutual_info) needs a text-only model; vlbridge conditions "
                          "on an image, so drop acc_mutual_info from the task's metrics")
    context, continuation, doc_to_visual, doc_id, task, split = args
    doc = task_docs(task, split)[doc_id]
    if callable(continuation):
        continuation = continuation(doc)
    if not isinstance(continuation, str) or not continuation:
        raise TaskRefused(f"lmms-eval task {task!r} (doc {doc_id}): the continuation to score must be a non-empty string, "
                          f"got {continuation!r}")
    return Request(task, doc_id, one_image(task, doc_id, doc_to_visual(doc)), clean_text(context), continuation=continuation)
