"""A plugin's declaration functions (output, preprocess, dims, num_params, activations), called to
validate an assembly. They are third-party code: an exception or an answer of the wrong type is a
PluginError naming the component and the function, as a build's faults are, never vlbridge's own
internal error. Torch-free, like all of validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlbridge.errors import PluginError
from vlbridge.plugin.contract import describe, plugin_call
from vlbridge.plugin.specs import ConnectorSpec, EncoderSpec, LLMDims, LLMSpec, Preprocess, SizeEstimate, TokenShape


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _call(spec: Any, what: str, fn: Callable[..., Any], args: tuple[Any, ...], valid: Callable[[Any], bool], expected: str) -> Any:
    who = describe(spec)
    result = plugin_call(who, what, fn, *args)
    if not valid(result):
        raise PluginError(f"{who}: {what} returned {result!r}; it must return {expected}")
    return result


def _size(value: object) -> bool:
    """A frozen size: an exact count, a SizeEstimate (a count or None, with a note), or None."""
    if isinstance(value, SizeEstimate):
        return (value.count is None or _count(value.count)) and isinstance(value.note, str)
    return value is None or _count(value)


SIZE_EXPECTED = ("an exact count (an int, 0 or more), a vlbridge.SizeEstimate(count, note) (count such an int, or None "
                 "where unknown; note a str saying what is guessed), or None")


def _token_shape(value: object) -> bool:
    return isinstance(value, TokenShape) and _count(value.num_tokens) and _count(value.width) and value.num_tokens > 0 and value.width > 0


def _stage_counts(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(stage, int) and _count(count) for stage, count in value.items())


def _llm_dims(value: object) -> bool:
    """An LLMDims whose fields hold what their annotations say: a width of "64" or a context of None
    would fail later, blamed on the connector or as an internal error."""
    if not isinstance(value, LLMDims):
        return False
    positive = (value.embed_width, value.context_length) + (() if value.vocab_size is None else (value.vocab_size,))
    return (all(_count(n) and n > 0 for n in positive)
            and isinstance(value.encoder_decoder, bool) and isinstance(value.context_is_hard, bool))


def encoder_declared(spec: EncoderSpec, options: Any) -> tuple[TokenShape, Preprocess, int | SizeEstimate | None]:
    """The encoder's output shape, preprocessing and frozen size (None: not known from the options)."""
    out = _call(spec, "output()", spec.output, (options,), _token_shape, "a TokenShape of positive ints")
    preprocess = _call(spec, "preprocess()", spec.preprocess, (options,), lambda v: isinstance(v, Preprocess), "a vlbridge.Preprocess")
    params = None
    if spec.num_params is not None:
        params = _call(spec, "num_params()", spec.num_params, (options,), _size, SIZE_EXPECTED)
    return out, preprocess, params


def llm_declared(spec: LLMSpec, options: Any) -> tuple[LLMDims, int | SizeEstimate | None]:
    """The LLM's dims and frozen size."""
    dims = _call(spec, "dims()", spec.dims, (options,), _llm_dims,
                 "a vlbridge.LLMDims of positive ints (embed_width, context_length, vocab_size or None) and bools")
    params = None
    if spec.num_params is not None:
        params = _call(spec, "num_params()", spec.num_params, (options,), _size, SIZE_EXPECTED)
    return dims, params


def connector_output(spec: ConnectorSpec, options: Any, encoder_out: TokenShape, llm_width: int) -> TokenShape:
    """The visual tokens fed to the LLM; an IncompatibleError (the pair cannot be joined) passes through."""
    return _call(spec, "output()", spec.output, (options, encoder_out, llm_width), _token_shape, "a TokenShape of positive ints")


def connector_counts(spec: ConnectorSpec, options: Any, encoder_out: TokenShape, llm_width: int,
                     text_tokens: int) -> tuple[dict[int, int], dict[int, int]]:
    """({stage: trainable parameters}, {stage: stored activation values per sample}); {} where undeclared."""
    expected = "a dict {stage: count}"
    counts = (_call(spec, "num_params()", spec.num_params, (options, encoder_out, llm_width), _stage_counts, expected)
              if spec.num_params is not None else {})
    stored = (_call(spec, "activations()", spec.activations, (options, encoder_out, llm_width, text_tokens), _stage_counts, expected)
              if spec.activations is not None else {})
    return counts, stored
