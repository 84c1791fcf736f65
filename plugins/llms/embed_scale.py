"""The factor a transformers model puts on its token embeddings outside the embedding module, and
only when it embeds ids itself.

A soft prompt feeds the LLM `inputs_embeds`, so the text part must be embedded exactly as the model
embeds its own ids. Most models scale inside the embedding module (Gemma's sqrt(hidden), BART's and
mBART's `scale_embedding`), which `get_input_embeddings()` already applies. Some do it in the forward
of the module that reads the ids, for ids only: the encoders of Pegasus, Marian, MVP, BlenderbotSmall
and FSMT (`embed_scale`, sqrt(d_model) where `scale_embedding`), and Falcon-H1's decoder
(`embedding_multiplier`). Unscaled, their text would reach the frozen model up to sqrt(d_model) too
small, silently. Granite multiplies `inputs_embeds` too (whatever their origin), so it needs nothing.
"""

from __future__ import annotations

from typing import Any

# Decoder-only model types whose base model scales embedded ids (and only them) by this attribute.
_DECODER_SCALES = {"falcon_h1": "embedding_multiplier"}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ids_only_scale(model: Any) -> float:
    """What the model multiplies `embed_tokens(input_ids)` by, on top of `get_input_embeddings()`; 1.0 for most."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and callable(getattr(model, "get_encoder", None)):
        encoder = model.get_encoder()
        embeddings = getattr(encoder, "embed_tokens", None)
        if _number(getattr(embeddings, "embed_scale", None)) is None:  # not applied by the embedding module itself
            scale = _number(getattr(encoder, "embed_scale", None))
            return 1.0 if scale is None else scale
        return 1.0
    name = _DECODER_SCALES.get(str(getattr(config, "model_type", "")))
    scale = _number(getattr(getattr(model, "base_model", None), name, None)) if name else None
    return 1.0 if scale is None else scale
